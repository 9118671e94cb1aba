"""Augmentation and letterboxing for KITTI detection samples.

A transform is a callable ``t(image, boxes, kinds) -> dict`` where ``image`` is an RGB uint8
array (H, W, 3), ``boxes`` an (N, 4) array of x1y1x2y2 boxes in image pixels and ``kinds`` an (N,)
int array: the class index of an object, or ``IGNORE_KIND`` (-1) for a DontCare region. Objects
and DontCare regions travel as one box list so every geometric step moves them together. The
result holds the new ``image`` (input_size, uint8), ``boxes``, ``kinds`` and a ``meta`` dict with
the exact geometry, so predictions map back to the original image with `letterbox_to_original`:

    x_input = scale * x_m + pad_left,  y_input = scale * y + pad_top,
    x_m = orig_width - x if flipped else x.

Coordinates are continuous pixel-edge coordinates (a box covering pixel columns 0..9 is
x1=0, x2=10), the convention of KITTI labels and of OpenCV's resize. The letterbox (resize
keeping aspect ratio, grey 114 padding) is one `cv2.warpAffine` with the same scale on both
axes, so the recorded ``scale``/``pad`` are exact for the image content as well as the boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from kd_bnn.config import AugmentConfig
from kd_bnn.offline import offline_env

IGNORE_KIND = -1  # `kinds` value of a DontCare / ignore region
PAD_VALUE = 114  # grey of letterbox padding (as Ultralytics/YOLOv5)


def _check_input_size(input_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size: expected (height, width), found {input_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"input_size: expected positive (height, width), found {input_size!r}")
    return h, w


def _warp(image: np.ndarray, scale: float, tx: float, ty: float, out_hw: tuple[int, int]) -> np.ndarray:
    """Image content mapped by u' = scale * u + (tx, ty) (edge coordinates) onto a grey canvas.

    Downscaling first goes through `cv2.INTER_AREA` (no aliasing) to the nearest integer size;
    the small residual scale is then folded into the warp, so the total map stays exact.
    """
    h, w = image.shape[:2]
    sx = sy = scale
    if scale < 1.0:
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        sx, sy = scale * w / nw, scale * h / nh
    # warpAffine works on pixel centres: idx' = s * idx + (s - 1) / 2 + t.
    m = np.array([[sx, 0.0, tx + 0.5 * (sx - 1.0)], [0.0, sy, ty + 0.5 * (sy - 1.0)]])
    return cv2.warpAffine(image, m, (out_hw[1], out_hw[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_VALUE,) * 3)


def _map_boxes(boxes: np.ndarray, scale: float, tx: float, ty: float) -> np.ndarray:
    out = boxes.astype(np.float64) * scale
    out[:, [0, 2]] += tx
    out[:, [1, 3]] += ty
    return out


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def _clip_and_filter(boxes: np.ndarray, kinds: np.ndarray, window: tuple[float, float, float, float],
                     min_visible: float, min_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to `window`; objects keeping < `min_visible` of their area or thinner than
    `min_size` px become ignore regions; empty regions are removed."""
    x0, y0, x1, y1 = window
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], x0, x1)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], y0, y1)
    kinds = kinds.copy()
    full, kept = _area(boxes), _area(clipped)
    wh_ok = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    lost = (kinds != IGNORE_KIND) & ((kept < min_visible * np.maximum(full, 1e-12)) | ~wh_ok)
    kinds[lost] = IGNORE_KIND
    nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[nonempty], kinds[nonempty]


def letterbox_params(orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float, float]:
    """(scale, pad_left, pad_top) of the centred letterbox of an image of size `orig_hw`."""
    h, w = orig_hw
    H, W = input_hw
    scale = min(H / h, W / w)
    return scale, float((W - w * scale) // 2), float((H - h * scale) // 2)


class Letterbox:
    """Eval transform: resize keeping the aspect ratio, centre on a grey canvas (no randomness)."""

    def __init__(self, input_size: Sequence[int]):
        self.input_size = _check_input_size(input_size)

    def set_seed(self, seed: int | None) -> None:
        """No randomness; present so loaders can seed every transform alike."""

    def __call__(self, image: np.ndarray, boxes: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
        h, w = image.shape[:2]
        scale, tx, ty = letterbox_params((h, w), self.input_size)
        out = _warp(image, scale, tx, ty, self.input_size)
        b = _map_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scale, tx, ty)
        window = (max(tx, 0.0), max(ty, 0.0), min(tx + w * scale, self.input_size[1]),
                  min(ty + h * scale, self.input_size[0]))
        b, k = _clip_and_filter(b, np.asarray(kinds, dtype=np.int64).reshape(-1), window, 0.0, 0.0)
        meta = {"orig_size": (h, w), "scale": scale, "pad": (tx, ty), "flipped": False}
        return {"image": out, "boxes": b, "kinds": k, "meta": meta}

    def __repr__(self) -> str:
        return f"Letterbox(input_size={self.input_size})"


class TrainTransform:
    """Train transform: albumentations flip + colour jitter, then a random scale/crop letterbox.

    Steps: (1) albumentations `HorizontalFlip` on the original image, objects and DontCare
    boxes as one bbox list with a `kinds` label field (`ColorJitter` runs on the warped output); (2) with probability
    `augment.crop` a random scale s in `augment.scale` relative to the letterbox scale and a random
    offset (a crop when the scaled image exceeds the input, a random placement when it is
    smaller), otherwise the centred eval letterbox; (3) boxes clipped to the visible image, and
    objects that keep less than `min_visible` of their area (or get thinner than `min_size` px)
    turned into ignore regions, so the loss neither rewards nor punishes the visible rest.
    """

    def __init__(self, input_size: Sequence[int], augment: AugmentConfig | None = None,
                 min_visible: float = 0.5, min_size: float = 2.0, seed: int | None = None):
        with offline_env():  # albumentations checks for updates online at import unless told not to
            import albumentations as A  # lazy: heavy import, only needed for training

        self.input_size = _check_input_size(input_size)
        self.augment = augment if augment is not None else AugmentConfig()
        aug = self.augment
        if not 0.0 <= aug.hflip <= 1.0 or not 0.0 <= aug.crop <= 1.0:
            raise ValueError(f"augment.hflip and augment.crop are probabilities in [0, 1], "
                             f"found hflip={aug.hflip}, crop={aug.crop}")
        if aug.hsv < 0 or not 0 < aug.scale[0] <= aug.scale[1]:
            raise ValueError(f"augment: expected hsv >= 0 and 0 < scale[0] <= scale[1], "
                             f"found hsv={aug.hsv}, scale={aug.scale}")
        self.min_visible, self.min_size = float(min_visible), float(min_size)
        ops = [A.HorizontalFlip(p=aug.hflip)] if aug.hflip > 0 else []
        # boxes go through albumentations only for the geometric op (the flip)
        self._geometric = aug.hflip > 0
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["kinds"], clip=True,
                                   filter_invalid_bboxes=True) if self._geometric else None
        self.compose = A.Compose(ops, bbox_params=bbox_params, save_applied_params=True,
                                 seed=seed) if ops else None
        # colour jitter runs after the letterbox warp, on the (much smaller) network input
        self.photometric = None
        if aug.hsv > 0:
            j = aug.hsv
            self.photometric = A.Compose([A.ColorJitter(
                brightness=(max(0.0, 1 - j), 1 + j), contrast=(max(0.0, 1 - j), 1 + j),
                saturation=(max(0.0, 1 - j), 1 + j), hue=(0.0, 0.0), p=0.8)], seed=seed)
        self.rng = np.random.default_rng(seed)

    def set_seed(self, seed: int | None) -> None:
        """Reseed both the albumentations pipeline and the scale/crop generator."""
        if self.compose is not None:
            self.compose.set_random_seed(seed)
        if self.photometric is not None:
            self.photometric.set_random_seed(None if seed is None else seed + 1)
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, kinds: np.ndarray) -> dict[str, Any]:
        h, w = image.shape[:2]
        H, W = self.input_size
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        kinds = np.asarray(kinds, dtype=np.int64).reshape(-1)
        flipped = False
        if self.compose is not None:
            res = self.compose(image=image, bboxes=boxes, kinds=kinds)
            boxes = np.asarray(res["bboxes"], dtype=np.float64).reshape(-1, 4)
            kinds = np.asarray(res["kinds"], dtype=np.int64).reshape(-1)
            image = res["image"]
            flipped = any(name == "HorizontalFlip" for name, _ in res["applied_transforms"])

        scale, tx, ty = letterbox_params((h, w), (H, W))
        if self.augment.crop > 0 and self.rng.random() < self.augment.crop:
            scale *= self.rng.uniform(*self.augment.scale)
            free_x, free_y = W - w * scale, H - h * scale
            tx = self.rng.uniform(min(free_x, 0.0), max(free_x, 0.0))
            ty = self.rng.uniform(min(free_y, 0.0), max(free_y, 0.0))
        out = _warp(image, scale, tx, ty, (H, W))
        if self.photometric is not None:
            out = self.photometric(image=out)["image"]
        window = (max(tx, 0.0), max(ty, 0.0), min(tx + w * scale, W), min(ty + h * scale, H))
        b, k = _clip_and_filter(_map_boxes(boxes, scale, tx, ty), kinds, window,
                                self.min_visible, self.min_size)
        meta = {"orig_size": (h, w), "scale": scale, "pad": (tx, ty), "flipped": flipped}
        return {"image": out, "boxes": b, "kinds": k, "meta": meta}

    def __repr__(self) -> str:
        return f"TrainTransform(input_size={self.input_size}, augment={self.augment!r})"


def train_transforms(input_size: Sequence[int], augment_cfg: AugmentConfig | None = None,
                     seed: int | None = None) -> TrainTransform:
    """Training pipeline: hflip, colour jitter, random scale/crop, letterbox to `input_size` (h, w)."""
    return TrainTransform(input_size, augment_cfg, seed=seed)


def eval_transforms(input_size: Sequence[int]) -> Letterbox:
    """Evaluation pipeline: letterbox to `input_size` (h, w) only."""
    return Letterbox(input_size)


def read_letterboxed(path: Any, input_size: Sequence[int]) -> tuple[np.ndarray, torch.Tensor, dict[str, Any]]:
    """An image file as a model input: ``(rgb, x, meta)`` with ``rgb`` the original RGB uint8
    image, ``x`` its letterbox to ``input_size`` as a float ``(3, H, W)`` tensor in [0, 1] and
    ``meta`` the geometry (`letterbox_to_original` inverts it). OSError naming the file when it
    cannot be read as an image."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"{path}: cannot read image (missing, truncated or not an image)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    sample = eval_transforms(input_size)(rgb, np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    x = torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1))).float().div_(255.0)
    return rgb, x, sample["meta"]


def _as_float64(boxes):
    if isinstance(boxes, torch.Tensor):
        return boxes.detach().to("cpu", torch.float64).numpy().reshape(-1, 4), boxes
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), None


def _like(out: np.ndarray, ref):
    if ref is not None:
        return torch.from_numpy(out).to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    return out


def original_to_letterbox(boxes, meta: dict[str, Any]):
    """Map x1y1x2y2 boxes from original image pixels to input pixels with the geometry in `meta`.

    No clipping. Accepts and returns a numpy array or a torch tensor.
    """
    b, ref = _as_float64(boxes)
    if meta.get("flipped", False):
        w = meta["orig_size"][1]
        b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
    s = float(meta["scale"])
    px, py = (float(v) for v in meta["pad"])
    out = b * s
    out[:, [0, 2]] += px
    out[:, [1, 3]] += py
    return _like(out, ref)


def letterbox_to_original(boxes, meta: dict[str, Any], clip: bool = True):
    """Map x1y1x2y2 boxes (e.g. predictions) from input pixels back to original image pixels.

    Inverts the exact geometry recorded in `meta` (scale, pad, and for training samples the
    flip); `clip` clips to the original image. Accepts and returns a numpy array or a tensor.
    """
    b, ref = _as_float64(boxes)
    s = float(meta["scale"])
    px, py = (float(v) for v in meta["pad"])
    out = b.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - px) / s
    out[:, [1, 3]] = (out[:, [1, 3]] - py) / s
    h, w = meta["orig_size"]
    if meta.get("flipped", False):
        out = np.stack([w - out[:, 2], out[:, 1], w - out[:, 0], out[:, 3]], axis=1)
    if clip:
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
    return _like(out, ref)
