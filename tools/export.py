"""Export a binary student to a bit-packed .kdbnn file (and optionally ONNX).

The same as ``kd-bnn export`` (kd_bnn/cli/export.py): ``python tools/export.py --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.export import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
