"""Shared test fixtures: paths to the real KITTI reference data in ../shared/kitti."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# tests import Ultralytics directly too (pytest.importorskip): keep that import offline as well
for _k, _v in {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_VERBOSE": "False",
               "NO_ALBUMENTATIONS_UPDATE": "1"}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_KITTI = REPO.parent / "shared" / "kitti"


@pytest.fixture(scope="session")
def shared_kitti() -> Path:
    """Root of the shared real KITTI data; skips the test when it is absent."""
    if not SHARED_KITTI.is_dir():
        pytest.skip(f"real KITTI reference data not found at {SHARED_KITTI} (see ../shared/kitti/README.md)")
    return SHARED_KITTI


_PIL_OPEN = __import__("PIL.Image", fromlist=["open"]).open


@pytest.fixture(autouse=True)
def _pil_open_unpatched():
    """`pytest.importorskip("ultralytics")` imports Ultralytics directly, which replaces
    PIL.Image.open process-wide (kd_bnn's own import path undoes it: kd_bnn.offline); keep every
    test on the real PIL.Image.open whatever ran before it."""
    from PIL import Image

    Image.open = _PIL_OPEN
    yield
