#!/usr/bin/env python
"""`make demo`: the whole pipeline on synthetic KITTI, then the paper's ablation table.

The same as ``kd-bnn demo`` (kd_bnn/cli/demo.py): ``python tools/demo.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.demo import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
