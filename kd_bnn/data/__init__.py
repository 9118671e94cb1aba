"""KITTI data: labels and splits (`kitti`), the dataset, augmentation and batching.

Label I/O (`kd_bnn.data.kitti`) needs only NumPy and is imported here at once. The dataset, the
loader and the transforms need torch and OpenCV, so their names are imported on first use
(PEP 562 module ``__getattr__``): ``from kd_bnn.data import KittiDataset`` works as before, while
``import kd_bnn.data`` or ``from kd_bnn.data import read_label_file`` (what the evaluator of
result files does) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kd_bnn.data.kitti import (
    DEFAULT_CLASSES,
    DIFFICULTIES,
    KITTI_TYPES,
    FrameLabels,
    KittiDataWarning,
    KittiFormatError,
    difficulty_of,
    format_label_line,
    format_labels,
    frame_ids_in,
    parse_label_lines,
    read_label_file,
    read_split,
    write_label_file,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; at run time see _LAZY
    from kd_bnn.data.dataset import (
        ImageDecodeError,
        KittiDataset,
        KittiDatasetError,
        check_image,
        check_images,
        how_to_get_kitti,
        split_frames,
    )
    from kd_bnn.data.loader import Batch, KittiLoader, build_datasets, build_loader, collate
    from kd_bnn.data.transforms import (
        IGNORE_KIND,
        Letterbox,
        TrainTransform,
        eval_transforms,
        letterbox_to_original,
        original_to_letterbox,
        train_transforms,
    )

#: submodule -> the names it provides lazily (each of these submodules imports torch).
_LAZY_MODULES = {
    "dataset": ("ImageDecodeError", "KittiDataset", "KittiDatasetError", "check_image",
                "check_images", "how_to_get_kitti", "split_frames"),
    "loader": ("Batch", "KittiLoader", "build_datasets", "build_loader", "collate"),
    "transforms": ("IGNORE_KIND", "Letterbox", "TrainTransform", "eval_transforms",
                   "letterbox_to_original", "original_to_letterbox", "train_transforms"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

__all__ = [
    "DEFAULT_CLASSES", "DIFFICULTIES", "IGNORE_KIND", "KITTI_TYPES", "Batch", "FrameLabels",
    "ImageDecodeError", "KittiDataWarning", "KittiDataset", "KittiDatasetError", "KittiFormatError",
    "KittiLoader", "Letterbox", "TrainTransform", "build_datasets", "build_loader", "check_image",
    "check_images", "collate", "difficulty_of", "eval_transforms",
    "format_label_line", "format_labels", "frame_ids_in", "how_to_get_kitti", "letterbox_to_original",
    "original_to_letterbox", "parse_label_lines", "read_label_file", "read_split", "split_frames",
    "train_transforms", "write_label_file",
]


def __getattr__(name: str) -> Any:
    """Import a torch-using name (or one of the submodules the package used to import eagerly,
    ``dataset``, ``loader``, ``transforms``) on first access, and cache it in the module."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_MODULES))
