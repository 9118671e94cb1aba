#!/usr/bin/env python
"""Generate a synthetic KITTI set in the official layout.

The same as ``kd-bnn make-synthetic`` (kd_bnn/cli/make_synthetic.py): ``python tools/make_synthetic.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.make_synthetic import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
