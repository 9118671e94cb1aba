"""The `Detector` interface every model family meets, and the detector registry.

The trainer, distiller, evaluator and exporter only use this interface:
``forward(images) -> raw``, ``loss(raw, targets, ignore) -> (total, parts)``,
``predict(raw, conf_thres, iou_thres) -> list[Detections]``, ``taps`` and ``input_size``.

Conventions (DESIGN.md):
  * images: float32 (B, 3, H, W) in [0, 1], letterboxed to ``input_size``.
  * input_size: (height, width) in pixels.
  * targets: one tensor (N, 6) per batch, rows ``(image_index, class, x1, y1, x2, y2)`` in
    input pixels; ignore: a list of B tensors (M_i, 4) of DontCare boxes x1y1x2y2 in input
    pixels, which are neither positive nor negative in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kd_bnn.registry import Registry

#: name -> factory(**kwargs) -> Detector (e.g. "darknet", "mobilenet_yolo", "ultralytics").
DETECTORS = Registry("detector")


@dataclass
class Detections:
    """Detections of one image: boxes x1y1x2y2 in input pixels, scores, integer labels."""

    boxes: torch.Tensor  # (K, 4) float
    scores: torch.Tensor  # (K,) float
    labels: torch.Tensor  # (K,) int64

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))

    @staticmethod
    def empty(device=None) -> Detections:
        return Detections(torch.zeros((0, 4), device=device), torch.zeros(0, device=device),
                          torch.zeros(0, dtype=torch.long, device=device))


class Detector(nn.Module):
    """Base class of every detector family.

    Attributes:
        input_size: (height, width) the network expects.
        class_names: names of the classes predicted, in label order.
        taps: named feature points -> module paths (``dict(model.named_modules())`` keys), used
            by the distiller to hook intermediate maps (e.g. ``{"stride16": "backbone.12"}``).
    """

    input_size: tuple[int, int]
    class_names: list[str]
    taps: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, images: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement Detector.forward")

    def loss(self, raw, targets: torch.Tensor, ignore: list[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement Detector.loss")

    def predict(self, raw, conf_thres: float = 0.005, iou_thres: float = 0.45,
                max_det: int = 300) -> list[Detections]:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement Detector.predict")


def build_detector(family: str, **kwargs) -> Detector:
    """Build a registered detector family by name (see ``DETECTORS.list()``)."""
    return DETECTORS.build(family, **kwargs)
