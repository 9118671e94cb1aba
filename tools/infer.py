"""Run a .kdbnn model on a folder of images: KITTI result files and images with boxes drawn.

    python tools/infer.py --model model.kdbnn --images DIR --out DIR [--conf 0.3] [--iou 0.45]
        -> DIR/data/<image stem>.txt (KITTI result format), DIR/images/<image stem>.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=".kdbnn file written by tools/export.py")
    ap.add_argument("--images", required=True, help="folder of .png/.jpg images")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--conf", type=float, default=0.3, help="confidence threshold (default 0.3)")
    ap.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    ap.add_argument("--threads", type=int, default=None, help="torch/kernel threads")
    ap.add_argument("--no-draw", action="store_true", help="write result files only")
    args = ap.parse_args(argv)

    from kd_bnn.deploy.format import FormatError
    from kd_bnn.deploy.runtime import Runtime, infer_directory

    try:
        rt = Runtime(args.model, threads=args.threads)
        res = infer_directory(rt, args.images, args.out, args.conf, args.iou, draw=not args.no_draw)
    except (FormatError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(res["detections"].values())
    print(f"{rt}: {res['images']} images, {total} detections (conf >= {args.conf}) -> {res['out']}/data, "
          f"{'' if args.no_draw else res['out'] + '/images'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
