"""Deployment: bit-packed ``.kdbnn`` export, packed binary kernels, a CPU runtime, benchmarks.

``export(model, path)`` / ``export_checkpoint(config, checkpoint, out)`` write a ``.kdbnn``;
``Runtime(path)`` runs it (``Runtime(path)(images) -> raw``, ``.predict(images)``).
"""

from kd_bnn.deploy.export import (
           ExportError,
           export,
           export_checkpoint,
           export_onnx,
           float_equivalent,
)
from kd_bnn.deploy.format import FormatError
from kd_bnn.deploy.runtime import PackedBinaryConv, Runtime

__all__ = ["ExportError", "FormatError", "PackedBinaryConv", "Runtime", "export", "export_checkpoint",
           "export_onnx", "float_equivalent"]
