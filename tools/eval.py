"""Evaluate KITTI result files like the official devkit, or a trained model (checkpoint or .kdbnn).

The same as ``kd-bnn val`` (kd_bnn/cli/val.py): ``python tools/eval.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.val import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
