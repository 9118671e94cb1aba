"""A tiny experiment config for tests that train through the tools: the demo Darknet cfg at 64x192
on a small synthetic set, one epoch, runs under ``tmp_path/runs``."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, root: Path, extra: str = "", name: str = "tiny") -> Path:
    """Write ``tmp_path/c.yaml`` (plus the YAML in ``extra``) and return its path."""
    p = tmp_path / "c.yaml"
    p.write_text(f"""
name: {name}
device: cpu
output_dir: {tmp_path / 'runs'}
data: {{root: {root}, input_size: [64, 192], batch_size: 2}}
teacher: {{family: darknet, cfg: {REPO / 'configs' / 'darknet' / 'yolov2-demo.cfg'}}}
train: {{epochs: 1, lr: 0.001}}
{extra}
""")
    return p
