#!/usr/bin/env python
"""Compare binary students, each without and with knowledge transfer, at an equal budget.

The same as ``kd-bnn compare`` (kd_bnn/cli/compare.py): ``python tools/compare_students.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.compare import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
