#!/usr/bin/env python
"""`make demo`: the whole pipeline on synthetic KITTI, then the paper's ablation table.

Generates the synthetic set if absent, trains the float teacher, binarizes it, trains the BWN
student without and with knowledge transfer (same budget), evaluates all three with the official
KITTI protocol and prints params, float32 MB, packed MB, compression and AP_R40 (E/M/H).

    python tools/demo.py [--config configs/demo.yaml] [key=value ...] [--resume]

Runs land in ``runs/<name>/`` (``runs/demo/``); a re-run goes to ``runs/demo-2/`` (``-3``, ...)
rather than replace an earlier one, unless ``exist_ok=true``. Ctrl-C stops it (exit status 130);
``--resume`` (with ``name=`` of that folder) continues it at the phase that was in progress.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.config import ConfigError, load_config  # noqa: E402
from kd_bnn.engine.cli import run_command  # noqa: E402
from kd_bnn.engine.experiment import format_ablation, run_ablation, run_dir_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    ap.add_argument("--resume", action="store_true",
                    help="continue the demo in runs/<name>/ at the phase that was in progress")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def demo():
        run_dir = run_dir_for(cfg, args.resume)
        return run_dir, run_ablation(cfg, progress=args.progress or None, resume=args.resume, run_dir=run_dir)

    rc, out = run_command(demo, "demo", ["--config", args.config], args.overrides)
    if rc:
        return rc
    run_dir, rows = out
    minutes = (time.perf_counter() - t0) / 60
    print()
    print(format_ablation(rows))
    print(f"demo finished in {minutes:.1f} min; runs in {run_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
