"""Imports run one way between the package's rooms (docs/architecture.md, "Rooms")."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kd_bnn"

#: room -> tier; a module may import from its own room and from rooms of a lower tier only.
TIERS = {
    "kd_bnn": -1,  # the top-level modules: config, io, registry, offline
    "data": 0, "binary": 0,
    "eval": 1, "models": 1,
    "distill": 2, "deploy": 2,
    "engine": 3,
    "cli": 4,  # the kd-bnn commands: argument parsing and printing over every other room
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PKG / parts[1]).is_dir()) else "kd_bnn"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names[:1] if n.startswith("kd_bnn")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kd_bnn")]
    return out


def test_rooms_import_one_way():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        me = _room(".".join(rel.parts))
        for line, target in _imports(path):
            other = _room(target)
            if other != me and TIERS[other] >= TIERS[me]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {me} (tier {TIERS[me]}) imports {target} "
                           f"({other}, tier {TIERS[other]})")
    assert not bad, "imports against the room order:\n" + "\n".join(bad)


def test_every_room_has_a_tier():
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms <= set(TIERS), f"rooms without a tier: {sorted(rooms - set(TIERS))}"
