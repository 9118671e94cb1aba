"""Run a model (.kdbnn or checkpoint) on an image, a folder or a glob: KITTI result files, drawn images.

The same as ``kd-bnn predict`` (kd_bnn/cli/predict.py): ``python tools/infer.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.predict import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
