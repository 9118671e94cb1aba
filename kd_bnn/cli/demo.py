"""`make demo`: the whole pipeline on synthetic KITTI, then the paper's ablation table.

Generates the synthetic set if absent, trains the float teacher, binarizes it, trains the BWN
student without and with knowledge transfer (same budget), evaluates all three with the official
KITTI protocol and prints params, float32 MB, packed MB, compression and AP_R40 (E/M/H).

    kd-bnn demo [--config configs/demo.yaml] [key=value ...] [--resume] [--json OUT]
    (the same as: python tools/demo.py ...)

Runs land in ``runs/<name>/`` (``runs/demo/``); a re-run goes to ``runs/demo-2/`` (``-3``, ...)
rather than replace an earlier one, unless ``exist_ok=true``. Ctrl-C stops it (exit status 130);
``--resume`` (with ``name=`` of that folder) continues it at the phase that was in progress.
"""

from __future__ import annotations

import json
import time

from kd_bnn.cli.common import load_config_or_report, parser, run_command

TOOL = "python tools/demo.py"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = parser(__doc__, prog, full_doc=True)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    progress = ap.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", help="show progress bars (default: only on a terminal)")
    progress.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--resume", action="store_true",
                    help="continue the demo in runs/<name>/ at the phase that was in progress")
    ap.add_argument("--json", default=None, help="also write the ablation rows as JSON to this file")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags

    from kd_bnn.engine.experiment import format_ablation, run_ablation, run_dir_for

    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return 2
    t0 = time.perf_counter()
    show = False if args.no_progress else (args.progress or None)

    def demo():
        from kd_bnn.engine.distributed import distributed_session

        with distributed_session(cfg.device):  # under torchrun: rank 0 chooses the folder for all
            run_dir = run_dir_for(cfg, args.resume)
            return run_dir, run_ablation(cfg, progress=show, resume=args.resume, run_dir=run_dir)

    rc, out = run_command(demo, prog or TOOL, ["--config", args.config], args.overrides)
    from kd_bnn.engine.distributed import launched_rank

    if rc or launched_rank() != 0:  # under torchrun rank 0 prints and writes
        return rc
    run_dir, rows = out
    minutes = (time.perf_counter() - t0) / 60
    print()
    print(format_ablation(rows))
    print(f"demo finished in {minutes:.1f} min; runs in {run_dir}/")
    if args.json:
        from kd_bnn.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
