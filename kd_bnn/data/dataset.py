"""`KittiDataset`: KITTI 2D object frames in the official folder layout, as detection samples.

Layout (as the official download unpacks, Geiger et al., CVPR 2012)::

    root/training/image_2/000000.png ...   left colour images
    root/training/label_2/000000.txt ...   labels (15 fields per object)
    root/training/calib/000000.txt ...     optional, unused for 2D detection
    root/ImageSets/train.txt, val.txt      split id lists (optional)

`root` may also be the `training` folder itself.

Bad input (see also `kd_bnn.data.kitti`):

* label files are read with ``strict_boxes``: a box with x2 < x1 or y2 < y1 is a
  `KittiFormatError` naming file and line (the evaluator on result folders keeps such ground
  truth, as the devkit does; here it would be a meaningless training target);
* object types outside `KITTI_TYPES` (case-sensitive) are ignored, counted in
  ``unknown_types`` and reported in one `KittiDataWarning` per split, with a case hint;
  zero-area boxes (x2 == x1 or y2 == y1) are dropped from the targets, with one warning;
* `check_images` (run by the preflight) checks that every image exists, that its header decodes,
  that its size is plausible and that the file is not cut short;
* an image that still fails to decode during a run does not stop it: the sample is replaced by
  the next readable frame of the split (deterministic), with one `KittiDataWarning` naming the
  file; `kd_bnn.data.loader.build_loader` reports it from the main process and, for an
  evaluation pass, warns with the count of skipped frames.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from kd_bnn.data.kitti import (
    DEFAULT_CLASSES,
    KITTI_TYPES,
    FrameLabels,
    KittiDataWarning,
    read_label_file,
    read_split,
)
from kd_bnn.data.transforms import IGNORE_KIND

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
KITTI_URL = "https://www.cvlibs.net/datasets/kitti/eval_object.php?obj_benchmark=2d"
#: Plausible image sides in pixels (KITTI: about 1242 x 375).
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 16, 16384
#: End-of-image marker of each format, looked for in the last `_TAIL_BYTES` of a file: a file
#: cut short (an interrupted copy or download) has none.
_END_MARKERS = {".png": (b"IEND", "PNG end chunk IEND"), ".jpg": (b"\xff\xd9", "JPEG end marker"),
                ".jpeg": (b"\xff\xd9", "JPEG end marker")}
_TAIL_BYTES = 4096
#: `KittiDataWarning` messages already shown in this process (once per run, not per dataset or epoch).
_REPORTED: set[str] = set()


class KittiDatasetError(ValueError):
    """A KITTI folder, split, frame list or image that cannot be used."""


class ImageDecodeError(OSError):
    """An image file that cannot be decoded (missing, cut short, corrupt or not an image)."""


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def warn_once(message: str, stacklevel: int = 3, all_ranks: bool = False) -> None:
    """A `KittiDataWarning`, shown once per process (and, unless `all_ranks`, only on rank 0 of a
    distributed run: every rank reads the same labels, but each decodes its own images)."""
    if message in _REPORTED or not (all_ranks or _is_rank_zero()):
        return
    _REPORTED.add(message)
    warnings.warn(message, KittiDataWarning, stacklevel=stacklevel)


def _tail_problem(path: Path, suffix: str, data: bytes | None = None) -> str | None:
    """Why the file looks cut short (its format's end marker is not in its last bytes), or None."""
    marker = _END_MARKERS.get(suffix.lower())
    if marker is None:
        return None
    if data is None:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _TAIL_BYTES))
            tail = fh.read()
    else:
        tail = data[-_TAIL_BYTES:]
    if marker[0] not in tail:
        return f"truncated file: no {marker[1]} at its end"
    return None


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image after cheap checks, without decoding its pixels.

    The file must exist, its header must decode (PIL reads only the header), its size must be
    within `MIN_IMAGE_SIDE`..`MAX_IMAGE_SIDE` on each side and, for PNG and JPEG, its end marker
    must be present (a file cut short has none). Damage inside the pixel data is only found when
    the image is decoded: `KittiDataset` then skips the frame with a warning.

    Raises:
        KittiDatasetError: ``"<path>: <what is wrong>"``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
    except FileNotFoundError:
        raise KittiDatasetError(f"{path}: image file does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise KittiDatasetError(f"{path}: not a readable image: {exc}") from None
    except Exception as exc:  # e.g. a third-party patch of Image.open (Ultralytics' HEIF installer) failing
        raise KittiDatasetError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if not (MIN_IMAGE_SIDE <= w <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= h <= MAX_IMAGE_SIDE):
        raise KittiDatasetError(f"{path}: implausible image size {w}x{h} (expected {MIN_IMAGE_SIDE} to "
                                f"{MAX_IMAGE_SIDE} px on each side; KITTI images are about 1242x375)")
    suffix = {"PNG": ".png", "JPEG": ".jpg"}.get(fmt or "", path.suffix)
    try:
        problem = _tail_problem(path, suffix)
    except OSError as exc:
        raise KittiDatasetError(f"{path}: cannot read image file: {exc}") from None
    if problem:
        raise KittiDatasetError(f"{path}: {problem} (re-copy or re-extract it)")
    return w, h


def check_images(paths: Sequence[str | os.PathLike], what: str = "images", max_listed: int = 5) -> int:
    """Run `check_image` on every path; returns how many were checked.

    Raises:
        KittiDatasetError: listing every bad file (the first `max_listed`) with its problem.
    """
    bad = []
    for p in paths:
        try:
            check_image(p)
        except KittiDatasetError as exc:
            bad.append(str(exc))
    if bad:
        listed = "\n  ".join(bad[:max_listed])
        more = f"\n  ... and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        raise KittiDatasetError(
            f"{len(bad)} of {len(paths)} {what} cannot be used:\n  {listed}{more}\n"
            "fix or replace these files, or remove their frame ids from the split")
    return len(paths)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file.

    Raises:
        ImageDecodeError: ``"<path>: <why>"``: the file is missing, cut short, corrupt or not an image.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read image file: {exc.strerror or exc}") from None
    problem = _tail_problem(path, path.suffix, data)
    if problem:
        raise ImageDecodeError(f"{path}: {problem}")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        if _IMREAD_RGB is not None:  # OpenCV >= 4.10 decodes straight to RGB
            img = cv2.imdecode(buf, _IMREAD_RGB)
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            img = None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    except cv2.error as exc:
        raise ImageDecodeError(f"{path}: cannot decode image: {str(exc).strip()}") from None
    if img is None:
        raise ImageDecodeError(f"{path}: cannot decode image (corrupt or not an image)")
    return img


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


def training_dir(root: str | os.PathLike) -> Path:
    """The folder holding ``image_2`` and ``label_2``: ``root/training`` or `root` itself.

    Raises:
        FileNotFoundError: saying what is missing and how to get KITTI.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(how_to_get_kitti(root))
    for cand in (root / "training", root):
        if (cand / "image_2").is_dir() and (cand / "label_2").is_dir():
            return cand
    missing = [str(root / "training" / d) for d in ("image_2", "label_2")
               if not (root / "training" / d).is_dir()]
    raise FileNotFoundError(f"{root}: missing {', '.join(missing)}\n" + how_to_get_kitti(root))


def resolve_split(root: str | os.PathLike, split: str | os.PathLike | None
                  ) -> tuple[list[str], Path | None]:
    """(frame ids, split file) of a split name (``root/ImageSets/<split>.txt``), an id-list path,
    or None (every label file, which must then cover every image)."""
    root = Path(root)
    train_dir = training_dir(root)
    image_dir, label_dir = train_dir / "image_2", train_dir / "label_2"
    if split is None:
        label_ids = sorted(p[:-4] for p in os.listdir(label_dir) if p.endswith(".txt"))
        image_ids = {Path(p).stem for p in os.listdir(image_dir) if Path(p).suffix.lower() in IMAGE_SUFFIXES}
        no_label = sorted(image_ids - set(label_ids))
        if no_label:
            raise FileNotFoundError(
                f"{label_dir}: no label file for {len(no_label)} image(s) in {image_dir}: "
                f"{_first_few(no_label)}")
        if not label_ids:
            raise KittiDatasetError(f"{label_dir}: empty split: no label files (*.txt) found")
        return label_ids, None
    path = Path(split)
    named = root / "ImageSets" / f"{split}.txt"
    if named.is_file():
        split_file = named
    elif path.is_file():
        split_file = path
    else:
        raise FileNotFoundError(
            f"split {str(split)!r}: expected a file {named} or a path to an id list, found neither")
    return read_split(split_file), split_file  # raises on an empty file or a non-numeric id


def match_files(ids: Sequence[str], image_dir: Path, label_dir: Path, split_file: Path | None = None
                ) -> list[Path]:
    """Image path of every id; a FileNotFoundError listing the first ids without an image or label."""
    images: dict[str, str] = {}
    for name in os.listdir(image_dir):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(stem, name)
    labels = {p[:-4] for p in os.listdir(label_dir) if p.endswith(".txt")}
    where = f" (split {split_file})" if split_file else ""
    no_image = [i for i in ids if i not in images]
    no_label = [i for i in ids if i not in labels]
    problems = []
    if no_image:
        problems.append(f"{len(no_image)} frame(s) without an image in {image_dir}: {_first_few(no_image)}")
    if no_label:
        problems.append(f"{len(no_label)} frame(s) without a label in {label_dir}: {_first_few(no_label)}")
    if problems:
        raise FileNotFoundError(f"KITTI frames missing{where}:\n  " + "\n  ".join(problems))
    return [image_dir / images[i] for i in ids]


def split_frames(root: str | os.PathLike, split: str | os.PathLike | None, max_images: int | None = None
                 ) -> tuple[list[str], list[Path], Path | None]:
    """(ids, image paths, split file) of a split, as `KittiDataset` resolves it (without reading
    labels or images): every id must have an image and a label file."""
    if max_images is not None and max_images < 1:
        raise KittiDatasetError(f"max_images: expected a positive number or None, found {max_images}")
    train_dir = training_dir(root)
    ids, split_file = resolve_split(root, split)
    if max_images is not None:
        ids = ids[:max_images]
    return ids, match_files(ids, train_dir / "image_2", train_dir / "label_2", split_file), split_file


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
        unknown_types: Counter of type names not in `KITTI_TYPES` (ignored) in this split; reported
            in one `KittiDataWarning` (once per process), with the right case where a name
            differs from a KITTI type only by case (``car`` -> ``Car``).
        type_counts: Counter of every type name in this split.
        empty_boxes: number of zero-area boxes (x2 == x1 or y2 == y1) dropped from the training
            targets (`frame_labels`, the ground truth of evaluation, keeps them, as the devkit does).
        bad_images: {index: reason} of the images found unreadable so far (in this process).

    Raises (construction):
        KittiFormatError: a malformed label line, naming file, line and field: also a non-finite
            number and a box with x2 < x1 or y2 < y1 (``strict_boxes``, see the module docstring).

    Each sample is a dict: `image` float32 (3, H, W) in [0, 1]; `boxes` (K, 4) float32 x1y1x2y2
    in input pixels; `labels` (K,) int64; `ignore` (M, 4) float32; `meta` dict with `image_id`,
    `orig_size` (h, w), `scale`, `pad` (left, top), `flipped` (see `letterbox_to_original`).

    A frame whose image cannot be decoded is replaced by the next readable frame of the split
    (index + 1, + 2, ... wrapping around: the same choice in every run); that sample's ``meta``
    then also holds ``skipped`` = {``index``, ``image_id``, ``path``, ``reason``} of the frame it
    replaces, and the file is named in one `KittiDataWarning`.
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
        train_dir = training_dir(self.root)
        self.image_dir, self.label_dir = train_dir / "image_2", train_dir / "label_2"
        self.calib_dir = train_dir / "calib"
        ids, self._image_paths, self.split_file = split_frames(self.root, split, max_images)
        self.ids = ids
        self.unknown_types: Counter[str] = Counter()
        self.type_counts: Counter[str] = Counter()
        self.empty_boxes = 0
        self._empty_box_file: Path | None = None
        self.bad_images: dict[int, str] = {}
        #: set by `build_loader` for worker processes: the loader reports skipped images from the
        #: main process (a warning inside a worker would repeat with every epoch's new workers)
        self.report_skips_in_loader = False
        self._frames: list[FrameLabels] = []
        self._targets: list[tuple[np.ndarray, np.ndarray]] = []
        for fid in ids:
            path = self.label_dir / f"{fid}.txt"
            labels = read_label_file(path, with_score=False, strict_boxes=True)
            self._frames.append(labels)
            self._targets.append(self._encode(labels, path))
        self._report_labels()

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

    def _encode(self, labels: FrameLabels, path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
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
        # x2 < x1 / y2 < y1 was refused when reading (strict_boxes): only zero-area boxes remain
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        n_empty = int((~valid).sum())
        if n_empty:
            self.empty_boxes += n_empty
            self._empty_box_file = self._empty_box_file or path
        return boxes[valid], kinds_arr[valid]

    def _describe(self) -> str:
        which = f"split {self.split_file}" if self.split_file else "all label files"
        return f"KITTI labels in {self.label_dir} ({which}, {len(self.ids)} frames)"

    def _report_labels(self) -> None:
        """One warning for the unknown types of this split, one for its zero-area boxes."""
        if self.unknown_types:
            by_lower = {t.lower(): t for t in KITTI_TYPES}
            parts = []
            for name, k in sorted(self.unknown_types.items(), key=lambda kv: (-kv[1], kv[0])):
                hint = by_lower.get(name.lower())
                parts.append(f"{name!r} x{k}" + (f" (did you mean {hint!r}? type names are case-sensitive)"
                                                  if hint else ""))
            total = sum(self.unknown_types.values())
            warn_once(f"{self._describe()}: {total} object(s) of unknown type ignored: {', '.join(parts)}; "
                       f"KITTI types are {', '.join(KITTI_TYPES)}", stacklevel=4)
        if self.empty_boxes:
            warn_once(f"{self._describe()}: {self.empty_boxes} zero-area box(es) (x2 == x1 or y2 == y1) "
                       f"dropped from the targets, e.g. in {self._empty_box_file}", stacklevel=4)

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
        ``cache_images``: PNG decoding dominates the cost of a small CPU training step).

        Raises:
            ImageDecodeError (an OSError): naming the file: missing, cut short, corrupt or not an image.
        """
        cached = self._image_cache.get(index)
        if cached is not None:
            return cached
        img = decode_image(self._image_paths[index])
        if self.cache_images:
            img.setflags(write=False)  # shared across epochs: transforms must not write in place
            self._image_cache[index] = img
        return img

    def note_bad_image(self, index: int, reason: str) -> bool:
        """Record that frame `index` cannot be decoded (its samples are then replaced without trying
        again) and warn once, naming the file; returns whether it was new here."""
        if index in self.bad_images:
            return False
        self.bad_images[index] = reason
        worker = torch.utils.data.get_worker_info() is not None
        if not (worker and self.report_skips_in_loader):
            warn_once(f"{reason}; frame {self.ids[index]} skipped: its samples are replaced by the next "
                       "readable frame of the split (fix or replace the file)", stacklevel=3, all_ranks=True)
        return True

    def _readable(self, index: int) -> tuple[int, np.ndarray]:
        """(index, image) of the first frame from `index` on (wrapping) whose image decodes."""
        n = len(self)
        for k in range(n):
            j = (index + k) % n
            if j in self.bad_images:
                continue
            try:
                return j, self.read_image(j)
            except ImageDecodeError as exc:
                self.note_bad_image(j, str(exc))
        raise KittiDatasetError(f"{self.image_dir}: none of the {n} images of this split can be decoded, "
                                f"e.g. {self.bad_images.get(index, '')}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        used, image = self._readable(index)
        boxes, kinds = self._targets[used]
        h, w = image.shape[:2]
        if self.transforms is not None:
            out = self.transforms(image, boxes, kinds)
            image, boxes, kinds, meta = out["image"], out["boxes"], out["kinds"], dict(out["meta"])
        else:
            meta = {"orig_size": (h, w), "scale": 1.0, "pad": (0.0, 0.0), "flipped": False}
        meta["image_id"] = self.ids[used]
        if used != index:
            meta["skipped"] = {"index": int(index), "image_id": self.ids[index],
                               "path": str(self._image_paths[index]), "reason": self.bad_images[index]}
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
