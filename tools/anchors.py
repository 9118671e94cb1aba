"""Anchors by k-means (IoU distance, YOLOv2) on KITTI labels.

The same as ``kd-bnn anchors`` (kd_bnn/cli/anchors.py): ``python tools/anchors.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.anchors import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
