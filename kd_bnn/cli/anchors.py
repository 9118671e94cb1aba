"""Anchors by k-means (IoU distance, YOLOv2) on KITTI labels at a given network input size.

Example:
    kd-bnn anchors --labels ../shared/kitti/labels_trainval/label_2 --k 5 \\
        --input-size 384x1248 --grid-units 32
    (python tools/anchors.py takes the same arguments.)
"""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 384x1248, found {text!r}") from None
    return h, w


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--labels", required=True, help="KITTI label_2 folder")
    ap.add_argument("--k", type=int, default=5, help="number of anchors")
    ap.add_argument("--input-size", type=_size, default=(384, 1248), help="network input HEIGHTxWIDTH")
    ap.add_argument("--grid-units", type=int, default=None, metavar="STRIDE",
                    help="also print the anchors divided by this stride (YOLOv2 [region] units)")
    ap.add_argument("--classes", default="Car,Pedestrian,Cyclist", help="comma-separated KITTI types")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from kd_bnn.models.anchors import anchors_from_kitti

    classes = [c for c in args.classes.split(",") if c]
    anchors, miou = anchors_from_kitti(args.labels, classes, args.input_size, args.k, seed=args.seed)
    h, w = args.input_size
    print(f"input {h}x{w}, k={args.k}, classes {','.join(classes)}")
    print("pixels:     " + ",  ".join(f"{a[0]:.0f},{a[1]:.0f}" for a in anchors))
    if args.grid_units:
        g = anchors / args.grid_units
        print(f"grid/{args.grid_units}:   " + ", ".join(f"{a[0]:.4f},{a[1]:.4f}" for a in g))
    print(f"mean IoU:   {miou:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
