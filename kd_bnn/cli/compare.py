"""Compare binary students (copy of the teacher, BinaryDenseNet-YOLO, Bi-Real-YOLO), each
without and with knowledge transfer, at an equal training budget on the same teacher.

    kd-bnn compare --teacher runs/demo/teacher/best.pt --epochs 10 \\
        configs/demo.yaml configs/demo_binary_densenet.yaml configs/demo_bireal.yaml

A config may carry its own overrides after '@' (a variant), e.g. an XNOR copy of the teacher
and BWN versions of the two students, for a like-for-like comparison per binarization mode:

    kd-bnn compare --teacher runs/demo/teacher/best.pt --epochs 10 \\
        configs/demo.yaml@student.binary.mode=xnor \\
        configs/demo_binary_densenet.yaml@student.binary.mode=bwn

Rows already measured in OUT/compare_students.json are kept (an interrupted run resumes).
(python tools/compare_students.py takes the same arguments.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="student experiment configs, PATH[@key=value...]")
    ap.add_argument("--teacher", required=True, help="trained teacher checkpoint (runs/<name>/teacher/best.pt)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of every student (equal budget)")
    ap.add_argument("--out", default="runs/compare_students")
    ap.add_argument("--threads", type=int, default=1, help="threads of the runtime latency measurement")
    ap.add_argument("--set", nargs="*", default=[], dest="overrides", help="key=value overrides for every config")
    args = ap.parse_args(argv)

    from kd_bnn.engine.compare import compare_students, format_comparison

    if not Path(args.teacher).is_file():
        print(f"error: teacher checkpoint {args.teacher} does not exist (run `make demo` first)", file=sys.stderr)
        return 2
    rows = compare_students(args.configs, args.teacher, args.epochs, args.out, args.overrides, args.threads)
    print(format_comparison(rows, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
