"""Generate a synthetic KITTI set in the official layout (see kd_bnn.data.synthetic).

    kd-bnn make-synthetic --out data/synthetic   # the make-demo set: 1000 frames, 300 train / 700 val
    kd-bnn make-synthetic --fit-stats ../shared/kitti/labels_trainval/label_2
    kd-bnn make-synthetic --describe data/synthetic/training/label_2
    (python tools/make_synthetic.py takes the same arguments.)
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (gets training/{image_2,label_2,calib} and ImageSets)")
    ap.add_argument("--num", type=int, default=1000, help="number of frames (default 1000, as configs/demo.yaml)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--size", default="1242x375", help="WIDTHxHEIGHT (default 1242x375)")
    ap.add_argument("--val-fraction", type=float, default=0.7,
                    help="share of frames in val (default 0.7, as configs/demo.yaml)")
    ap.add_argument("--overwrite", action="store_true", help="replace images/labels already in --out")
    ap.add_argument("--fit-stats", metavar="LABEL_DIR",
                    help="print the KITTI_STATS constant fitted to a KITTI label_2 folder and exit")
    ap.add_argument("--describe", metavar="LABEL_DIR", help="print per-class label statistics as JSON and exit")
    args = ap.parse_args(argv)

    from kd_bnn.data.synthetic import (
        describe_labels,
        fit_kitti_statistics,
        generate,
        statistics_source,
    )

    try:
        if args.fit_stats:
            print(statistics_source(fit_kitti_statistics(args.fit_stats)), end="")
            return 0
        if args.describe:
            print(json.dumps(describe_labels(args.describe), indent=1))
            return 0
        if not args.out:
            ap.error("--out is required (or use --fit-stats / --describe)")
        summary = generate(args.out, args.num, args.seed, args.size, args.val_fraction, args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
