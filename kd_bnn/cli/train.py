"""Train a teacher or a binary student from a config.

    kd-bnn train configs/demo.yaml [key=value ...] [--resume] [--no-progress] [--json OUT]
    (the same as: python tools/train.py configs/demo.yaml ...)
    torchrun --nproc_per_node 4 tools/train.py configs/kitti/darknet_yolov2_bwn_kt.yaml

Overrides use dotted paths (``train.epochs=5 data.batch_size=4``). Under torchrun the run is
distributed (DDP: one process per GPU, NCCL; gloo on CPU; ``data.batch_size`` per process; several
nodes with ``--nnodes N --node_rank I --rdzv-endpoint HOST:PORT``); rank 0 writes the run folder
and prints. The run ends with a summary (run folder, each phase's best epoch and Car /
Pedestrian / Cyclist AP_R40 moderate, checkpoints, results.json); ``--json OUT`` also writes the
results there.

The run folder is ``runs/<name>/``; when it already exists a new run goes to ``runs/<name>-2/``
(``-3``, ...) so that no earlier run is overwritten, unless ``exist_ok=true`` (which reuses it).
``--resume`` continues the run in ``runs/<name>/`` (``name=<name>-2`` for an incremented one)
at the phase that was in progress. Ctrl-C stops the whole run (exit status 130) after saving
what resumes it.
"""

from __future__ import annotations

import json

from kd_bnn.cli.common import load_config_or_report, parser, run_command

TOOL = "python tools/train.py"


def train(cfg, resume: bool = False, progress: bool | None = None):
    """Preflight `cfg` (missing dataset / teacher weights, class mismatch: fail before any work),
    then `kd_bnn.engine.experiment.run_experiment` it; returns its results."""
    from kd_bnn.engine.experiment import run_experiment
    from kd_bnn.engine.preflight import check_experiment

    check_experiment(cfg)
    return run_experiment(cfg, resume=resume, progress=progress)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = parser(__doc__, prog, full_doc=True)
    ap.add_argument("config", help="experiment YAML (configs/...)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in runs/<name>/ at the phase that was in progress")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--json", help="also write the results (as runs/<name>/results.json) to this file")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags

    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return 2

    rc, results = run_command(
        lambda: train(cfg, resume=args.resume, progress=False if args.no_progress else None),
        prog or TOOL, [args.config], args.overrides)
    from kd_bnn.engine.distributed import launched_rank
    from kd_bnn.engine.experiment import format_run_summary
    from kd_bnn.io import atomic_write_text

    if rc or launched_rank() != 0:  # under torchrun rank 0 prints and writes
        return rc
    print(format_run_summary(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
