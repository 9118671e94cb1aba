"""Deployment: bit-packed ``.kdbnn`` export, packed binary kernels, a CPU runtime.

``export(model, path)`` writes a ``.kdbnn`` (a trained experiment: `kd_bnn.engine.export`);
``Runtime(path)`` runs it (``Runtime(path)(images) -> raw``, ``.predict(images)``);
``export_onnx`` writes a float-equivalent ONNX graph.
"""

from kd_bnn.deploy.export import ExportError, export
from kd_bnn.deploy.format import FormatError
from kd_bnn.deploy.onnx import export_onnx, float_equivalent
from kd_bnn.deploy.runtime import PackedBinaryConv, Runtime

__all__ = ["ExportError", "FormatError", "PackedBinaryConv", "Runtime", "export", "export_onnx", "float_equivalent"]
