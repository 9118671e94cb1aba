"""Detector families behind one `Detector` interface (see `kd_bnn.models.detector`).

Importing this package registers every family in `DETECTORS`: ``darknet``,
``mobilenet_yolo``, ``ultralytics`` (which imports the Ultralytics package only when a model
is built), ``binary_densenet`` and ``bireal``.
"""

from kd_bnn.models import binary_students, darknet, mobilenet_yolo, ultralytics  # noqa: F401  (register families)
from kd_bnn.models.detector import DETECTORS, Detections, Detector, build_detector

__all__ = ["DETECTORS", "Detections", "Detector", "build_detector"]
