"""Read a model state dict from a user's file without running code from it.

A ``.safetensors`` file, or a torch file read with ``weights_only=True`` (PyTorch's restricted
unpickler: tensors and plain containers only). Anything else - a pickle that names code, a
truncated or foreign file - is a `ValueError` naming the file, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_state_dict_file"]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a safetensors file or a ``weights_only`` torch file.

    A torch file holding ``{"state_dict": {...}}`` or ``{"model": {...}}`` yields the inner dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ...: one line naming the file
            raise ValueError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (code in the pickle), RuntimeError (not a torch file)
        raise ValueError(
            f"{path}: not a state dict this toolkit reads safely (a .safetensors file, or a torch file "
            f"of plain tensors loaded with weights_only=True; a pickle that names code is refused): "
            f"{_first_line(exc)}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
