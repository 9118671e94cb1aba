"""Time kd_bnn's KITTI evaluator against the official devkit on the same result files.

Synthetic detections are made from the real ground truth (several seeds); both evaluators read
the same folders; every AP (3 classes x 3 difficulties x R11/R40) is compared. Without --devkit
only our evaluator is timed.

Example:
    kd-bnn bench-eval --gt-dir ../shared/kitti/labels_trainval/label_2 \\
        --split ../shared/kitti/ImageSets/val.txt --devkit /tmp/kitti_devkit/evaluate_object_2d
    (python tools/bench_eval.py takes the same arguments.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--gt-dir", required=True, help="ground-truth label_2 folder")
    ap.add_argument("--split", required=True, help="frame id list, e.g. ImageSets/val.txt")
    ap.add_argument("--devkit", help="devkit 2D binary: BINARY GT_DIR RESULT_DIR SPLIT (see kd_bnn.eval.bench)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the synthetic detections")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per seed (median reported)")
    ap.add_argument("--work-dir", help="where the temporary result folders go")
    ap.add_argument("--tolerance", type=float, default=0.01, help="largest AP difference accepted")
    args = ap.parse_args(argv)

    from kd_bnn.data.kitti import DIFFICULTIES
    from kd_bnn.eval.bench import benchmark

    if args.devkit and not Path(args.devkit).is_file():
        print(f"error: devkit binary {args.devkit} does not exist", file=sys.stderr)
        return 2
    if not args.devkit:
        print("devkit not available (no --devkit): timing kd_bnn only")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = benchmark(args.gt_dir, args.split, seeds, args.devkit, args.repeats, args.work_dir)
    ok = True
    for r in rows:
        print(f"\nseed {r.seed}")
        for c, kinds in r.ours.ap.items():
            for kind in ("R11", "R40"):
                ours = " ".join(f"{kinds[kind][d]:8.4f}" for d in DIFFICULTIES)
                line = f"  {c:<11}{kind}  ours {ours}"
                if r.devkit is not None and c in r.devkit:
                    dev = " ".join(f"{r.devkit[c][kind][d]:8.4f}" for d in DIFFICULTIES)
                    line += f"   devkit {dev}"
                print(line)
        t = f"  time (median/min of {args.repeats}): kd_bnn {r.ours_s:.3f}/{r.ours_min_s:.3f} s"
        if r.devkit_s is not None:
            t += (f", devkit {r.devkit_s:.3f}/{r.devkit_min_s:.3f} s, "
                  f"ratio {r.ours_s / r.devkit_s:.2f}x/{r.ours_min_s / r.devkit_min_s:.2f}x")
            t += f"\n  max |AP diff| {r.max_abs_diff:.2e} (devkit prints 6 decimals)"
            if r.max_precision_diff is not None:
                t += f"; max |precision curve diff| {r.max_precision_diff:.2e}"
            t += f"; printed digits identical: {'yes' if r.same_digits else 'no'}"
            ok &= r.max_abs_diff <= args.tolerance
        print(t)
    if rows and rows[0].devkit_s is not None:
        print(f"\n{'all agree' if ok else 'DISAGREEMENT'} within {args.tolerance} AP")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
