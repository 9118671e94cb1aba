#!/usr/bin/env python
"""Train a teacher or a binary student from a config: ``kd-bnn train`` (see kd_bnn/cli/train.py).

    python tools/train.py configs/demo.yaml [key=value ...] [--resume] [--no-progress] [--json OUT]
    torchrun --nproc_per_node 4 tools/train.py configs/kitti/darknet_yolov2_bwn_kt.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_bnn.cli.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
