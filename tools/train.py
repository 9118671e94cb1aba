#!/usr/bin/env python
"""Train a teacher or a binary student from a config.

    python tools/train.py configs/demo.yaml [key=value ...] [--resume] [--no-progress]

Overrides use dotted paths (``train.epochs=5 data.batch_size=4``). Under torchrun the run is
distributed (DDP); rank 0 writes ``runs/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.config import ConfigError, load_config  # noqa: E402
from kd_bnn.engine.checkpoint import CheckpointError  # noqa: E402
from kd_bnn.engine.experiment import run_experiment  # noqa: E402
from kd_bnn.engine.preflight import check_experiment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="experiment YAML (configs/...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    ap.add_argument("--resume", action="store_true", help="continue from runs/<name>/last.pt")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = Path(cfg.output_dir) / cfg.name / "last.pt"
    try:
        check_experiment(cfg)  # missing dataset / teacher weights, class mismatch: fail before any work
        results = run_experiment(cfg, resume=last if args.resume else None,
                                 progress=False if args.no_progress else None)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
