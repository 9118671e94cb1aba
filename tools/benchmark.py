"""Benchmarks: binary kernels, a whole .kdbnn model, training steps.

The same as ``kd-bnn benchmark`` (kd_bnn/cli/benchmark.py): ``python tools/benchmark.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.benchmark import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
