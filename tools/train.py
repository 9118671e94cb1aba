#!/usr/bin/env python
"""Train a teacher or a binary student from a config.

    python tools/train.py configs/demo.yaml [key=value ...] [--resume] [--no-progress]

Overrides use dotted paths (``train.epochs=5 data.batch_size=4``). Under torchrun the run is
distributed (DDP); rank 0 writes the run folder.

The run folder is ``runs/<name>/``; when it already exists a new run goes to ``runs/<name>-2/``
(``-3``, ...) so that no earlier run is overwritten, unless ``exist_ok=true`` (which reuses it).
``--resume`` continues the run in ``runs/<name>/`` (``name=<name>-2`` for an incremented one)
at the phase that was in progress. Ctrl-C stops the whole run (exit status 130) after saving
what resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.config import ConfigError, load_config  # noqa: E402
from kd_bnn.engine.cli import run_command  # noqa: E402
from kd_bnn.engine.experiment import run_experiment  # noqa: E402
from kd_bnn.engine.preflight import check_experiment  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="experiment YAML (configs/...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in runs/<name>/ at the phase that was in progress")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def train():
        check_experiment(cfg)  # missing dataset / teacher weights, class mismatch: fail before any work
        return run_experiment(cfg, resume=args.resume, progress=False if args.no_progress else None)

    rc, results = run_command(train, "train", [args.config], args.overrides)
    if rc:
        return rc
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
