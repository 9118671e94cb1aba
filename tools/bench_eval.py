"""Time kd_bnn's KITTI evaluator against the official devkit.

The same as ``kd-bnn bench-eval`` (kd_bnn/cli/bench_eval.py): ``python tools/bench_eval.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.bench_eval import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
