"""KITTI data: labels and splits (`kitti`), the dataset, augmentation and batching."""

from kd_bnn.data.dataset import (
    ImageDecodeError,
    KittiDataset,
    KittiDatasetError,
    check_image,
    check_images,
    how_to_get_kitti,
    split_frames,
)
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

__all__ = [
    "DEFAULT_CLASSES", "DIFFICULTIES", "IGNORE_KIND", "KITTI_TYPES", "Batch", "FrameLabels",
    "ImageDecodeError", "KittiDataWarning", "KittiDataset", "KittiDatasetError", "KittiFormatError",
    "KittiLoader", "Letterbox", "TrainTransform", "build_datasets", "build_loader", "check_image",
    "check_images", "collate", "difficulty_of", "eval_transforms",
    "format_label_line", "format_labels", "frame_ids_in", "how_to_get_kitti", "letterbox_to_original",
    "original_to_letterbox", "parse_label_lines", "read_label_file", "read_split", "split_frames",
    "train_transforms", "write_label_file",
]
