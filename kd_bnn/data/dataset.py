"""`KittiDataset`: KITTI 2D object frames in the official folder layout, as detection samples.

Layout (as the official download unpacks, Geiger et al., CVPR 2012)::

    root/training/image_2/000000.png ...   left colour images
    root/training/label_2/000000.txt ...   labels (15 fields per object)
    root/training/calib/000000.txt ...     optional, unused for 2D detection
    root/ImageSets/train.txt, val.txt      split id lists (optional)

`root` may also be the `training` folder itself.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from kd_bnn.data.kitti import DEFAULT_CLASSES, KITTI_TYPES, FrameLabels, read_label_file, read_split
from kd_bnn.data.transforms import IGNORE_KIND

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
KITTI_URL = "https://www.cvlibs.net/datasets/kitti/eval_object.php?obj_benchmark=2d"


class KittiDatasetError(ValueError):
    """A KITTI folder, split or frame list that cannot be used."""


def how_to_get_kitti(root: str | os.PathLike) -> str:
    """The help text shown when a KITTI root is missing or incomplete."""
    return (
        f"KITTI data not found at '{root}'.\n"
        f"  Real KITTI: register at {KITTI_URL}\n"
        f"  and download 'left color images of object data set' (data_object_image_2.zip, 12 GB) and\n"
        f"  'training labels of object data set' (data_object_label_2.zip); unzip both into data/kitti/\n"
        f"  so that data/kitti/training/image_2/*.png and data/kitti/training/label_2/*.txt exist\n"
        f"  (the train/val id lists ship in data/kitti/ImageSets), then use data.root=data/kitti.\n"
        f"  No download: generate the synthetic set with\n"
        f"  `python tools/make_synthetic.py --out data/synthetic` and use data.root=data/synthetic."
    )


def _first_few(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


class KittiDataset(Dataset):
    """KITTI frames as detection samples.

    Args:
        root: dataset folder holding `training/{image_2,label_2}` (or the `training` folder).
        split: a split name resolved as `root/ImageSets/<split>.txt`, a path to an id list, or
            None for every label file.
        classes: class names in label order (KITTI type names).
        transforms: a callable `(image, boxes, kinds) -> dict` (see `kd_bnn.data.transforms`);
            None keeps the original image and boxes.
        merge: type -> class name, e.g. {"Van": "Car"}; other types are dropped except DontCare,
            which is kept as ignore regions.
        max_images: keep only the first `max_images` frames of the split.

    Attributes:
        ids: frame ids in sample order.
        class_names: `classes` as a list.
        unknown_types: Counter of type names not in `KITTI_TYPES` (ignored) in this split.
        type_counts: Counter of every type name in this split.

    Each sample is a dict: `image` float32 (3, H, W) in [0, 1]; `boxes` (K, 4) float32 x1y1x2y2
    in input pixels; `labels` (K,) int64; `ignore` (M, 4) float32; `meta` dict with `image_id`,
    `orig_size` (h, w), `scale`, `pad` (left, top), `flipped` (see `letterbox_to_original`).
    """

    def __init__(self, root: str | os.PathLike, split: str | os.PathLike | None,
                 classes: Sequence[str] = DEFAULT_CLASSES, transforms: Callable | None = None,
                 merge: Mapping[str, str] | None = None, max_images: int | None = None,
                 cache_images: bool = False):
        self.root = Path(root)
        self.cache_images = bool(cache_images)
        self._image_cache: dict[int, np.ndarray] = {}
        self.transforms = transforms
        self.class_names = list(classes)
        self.class_map = self._class_map(self.class_names, dict(merge or {}))
        train_dir = self._training_dir(self.root)
        self.image_dir, self.label_dir = train_dir / "image_2", train_dir / "label_2"
        self.calib_dir = train_dir / "calib"
        self.split_file: Path | None = None
        ids = self._resolve_split(split)
        if max_images is not None:
            if max_images < 1:
                raise KittiDatasetError(f"max_images: expected a positive number or None, found {max_images}")
            ids = ids[:max_images]
        self._image_paths = self._match_files(ids)
        self.ids = ids
        self.unknown_types: Counter[str] = Counter()
        self.type_counts: Counter[str] = Counter()
        self._frames: list[FrameLabels] = []
        self._targets: list[tuple[np.ndarray, np.ndarray]] = []
        for fid in ids:
            labels = read_label_file(self.label_dir / f"{fid}.txt", with_score=False)
            self._frames.append(labels)
            self._targets.append(self._encode(labels))

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _class_map(classes: list[str], merge: dict[str, str]) -> dict[str, int]:
        known = set(KITTI_TYPES) - {"DontCare"}
        if not classes:
            raise KittiDatasetError("classes: expected at least one class name, found none")
        bad = [c for c in classes if c not in known]
        if bad or len(set(classes)) != len(classes):
            raise KittiDatasetError(
                f"classes: expected distinct KITTI types from {sorted(known)}, found {classes}")
        cmap = {c: i for i, c in enumerate(classes)}
        for src, dst in merge.items():
            if src not in known or src in cmap:
                raise KittiDatasetError(
                    f"merge: key {src!r} must be a KITTI type that is not itself a class "
                    f"(types: {sorted(known - set(classes))})")
            if dst not in cmap:
                raise KittiDatasetError(f"merge: {src!r} -> {dst!r}: expected a target in classes {classes}")
            cmap[src] = cmap[dst]
        return cmap

    @staticmethod
    def _training_dir(root: Path) -> Path:
        if not root.is_dir():
            raise FileNotFoundError(how_to_get_kitti(root))
        for cand in (root / "training", root):
            if (cand / "image_2").is_dir() and (cand / "label_2").is_dir():
                return cand
        missing = [str(root / "training" / d) for d in ("image_2", "label_2")
                   if not (root / "training" / d).is_dir()]
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}\n" + how_to_get_kitti(root))

    def _resolve_split(self, split: str | os.PathLike | None) -> list[str]:
        if split is None:
            label_ids = sorted(p[:-4] for p in os.listdir(self.label_dir) if p.endswith(".txt"))
            image_ids = {Path(p).stem for p in os.listdir(self.image_dir)
                         if Path(p).suffix.lower() in IMAGE_SUFFIXES}
            no_label = sorted(image_ids - set(label_ids))
            if no_label:
                raise FileNotFoundError(
                    f"{self.label_dir}: no label file for {len(no_label)} image(s) in {self.image_dir}: "
                    f"{_first_few(no_label)}")
            if not label_ids:
                raise KittiDatasetError(f"{self.label_dir}: empty split: no label files (*.txt) found")
            return label_ids
        path = Path(split)
        named = self.root / "ImageSets" / f"{split}.txt"
        if named.is_file():
            self.split_file = named
        elif path.is_file():
            self.split_file = path
        else:
            raise FileNotFoundError(
                f"split {str(split)!r}: expected a file {named} or a path to an id list, found neither")
        ids = read_split(self.split_file)  # raises on an empty file or a non-numeric id
        return ids

    def _match_files(self, ids: list[str]) -> list[Path]:
        """Image path of every id; an error listing the first ids without an image or label."""
        images: dict[str, str] = {}
        for name in os.listdir(self.image_dir):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                images.setdefault(stem, name)
        labels = {p[:-4] for p in os.listdir(self.label_dir) if p.endswith(".txt")}
        where = f" (split {self.split_file})" if self.split_file else ""
        no_image = [i for i in ids if i not in images]
        no_label = [i for i in ids if i not in labels]
        problems = []
        if no_image:
            problems.append(f"{len(no_image)} frame(s) without an image in {self.image_dir}: {_first_few(no_image)}")
        if no_label:
            problems.append(f"{len(no_label)} frame(s) without a label in {self.label_dir}: {_first_few(no_label)}")
        if problems:
            raise FileNotFoundError(f"KITTI frames missing{where}:\n  " + "\n  ".join(problems))
        return [self.image_dir / images[i] for i in ids]

    def _encode(self, labels: FrameLabels) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4) float64, kinds (N,) int64) of mapped objects and DontCare regions."""
        keep, kinds = [], []
        for j, typ in enumerate(labels.types):
            self.type_counts[typ] += 1
            if typ in self.class_map:
                keep.append(j)
                kinds.append(self.class_map[typ])
            elif typ == "DontCare":
                keep.append(j)
                kinds.append(IGNORE_KIND)
            elif typ not in KITTI_TYPES:
                self.unknown_types[typ] += 1
        boxes = labels.boxes[keep].reshape(-1, 4).astype(np.float64)
        kinds_arr = np.asarray(kinds, dtype=np.int64)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[valid], kinds_arr[valid]

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_path(self, index: int) -> Path:
        return self._image_paths[index]

    def label_path(self, index: int) -> Path:
        return self.label_dir / f"{self.ids[index]}.txt"

    def frame_labels(self, index: int) -> FrameLabels:
        """All parsed objects of a frame, every type, in original image pixels."""
        return self._frames[index]

    def read_image(self, index: int) -> np.ndarray:
        """RGB uint8 image (H, W, 3) of a frame (kept in memory after the first read when
        ``cache_images``: PNG decoding dominates the cost of a small CPU training step)."""
        cached = self._image_cache.get(index)
        if cached is not None:
            return cached
        path = self._image_paths[index]
        if _IMREAD_RGB is not None:  # OpenCV >= 4.10 decodes straight to RGB
            img = cv2.imread(str(path), _IMREAD_RGB)
        else:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img is None:
            raise OSError(f"{path}: cannot read image (missing, truncated or not an image)")
        if self.cache_images:
            img.setflags(write=False)  # shared across epochs: transforms must not write in place
            self._image_cache[index] = img
        return img

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.read_image(index)
        boxes, kinds = self._targets[index]
        h, w = image.shape[:2]
        if self.transforms is not None:
            out = self.transforms(image, boxes, kinds)
            image, boxes, kinds, meta = out["image"], out["boxes"], out["kinds"], dict(out["meta"])
        else:
            meta = {"orig_size": (h, w), "scale": 1.0, "pad": (0.0, 0.0), "flipped": False}
        meta["image_id"] = self.ids[index]
        obj = kinds != IGNORE_KIND
        chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {
            "image": chw.to(torch.float32).div_(255.0),
            "boxes": torch.from_numpy(np.asarray(boxes[obj], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.asarray(kinds[obj], dtype=np.int64)),
            "ignore": torch.from_numpy(np.asarray(boxes[~obj], dtype=np.float32).reshape(-1, 4)),
            "meta": meta,
        }

    def __repr__(self) -> str:
        return (f"KittiDataset(root='{self.root}', frames={len(self)}, classes={self.class_names}, "
                f"transforms={self.transforms!r})")
