"""Checkpoints that load with ``torch.load(weights_only=True)``, written atomically.

A checkpoint holds only tensors and primitive containers: model / optimizer / EMA state dicts,
the schedule position, epoch and iteration, the RNG states of torch, numpy and Python (as
tensors and lists), the resolved config dict and the best metric.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_bnn.config import diff_configs
from kd_bnn.io import atomic_path

_PRIMITIVES = (str, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or resumed from."""


def check_safe(obj: Any, where: str = "checkpoint") -> None:
    """Raise if `obj` holds anything but tensors and primitive containers (it would need pickle).

    Raises:
        CheckpointError: naming the key path of the first offending value.
    """
    if torch.is_tensor(obj) or isinstance(obj, _PRIMITIVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} of type {type(k).__name__} is not str/int")
            check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_safe(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored in a weights-only "
                          "checkpoint (only tensors, numbers, strings and lists/dicts of them)")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically (temp file + rename) after checking it is weights-only."""
    check_safe(state)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


#: Suffixes a kd_bnn training checkpoint may have (others are left to the model family's loader).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def try_load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state of a kd_bnn (weights-only) checkpoint, or None for any other file: another suffix,
    missing, or a pickle that needs code (e.g. an Ultralytics .pt, which the family loads with ``trust``)."""
    p = Path(path)
    if p.suffix not in CHECKPOINT_SUFFIXES or not p.is_file():
        return None
    try:
        return load_checkpoint(p)
    except CheckpointError:
        return None


def training_progress(path: str | os.PathLike) -> dict[str, Any] | None:
    """Where the training that wrote the checkpoint `path` (a ``last.pt``) stopped, or None when
    there is no such file: ``{"epoch": epochs completed, "epoch_complete": False when Ctrl-C
    stopped it inside the next epoch, "pending_eval": True when the last epoch's evaluation did
    not finish}``."""
    path = Path(path)
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    return {"epoch": int(state.get("epoch", 0)), "epoch_complete": bool(state.get("epoch_complete", True)),
            "pending_eval": state.get("pending_eval") is not None}


def training_finished(path: str | os.PathLike, epochs: int) -> bool:
    """Whether the checkpoint `path` holds a training of `epochs` epochs that ran to its end
    (every epoch trained and its final evaluation done)."""
    p = training_progress(path)
    return p is not None and p["epoch"] >= int(epochs) and p["epoch_complete"] and not p["pending_eval"]


def eval_state_dict(state: dict[str, Any], prefer_ema: bool = True) -> dict[str, Any]:
    """The weights to evaluate / export from a training checkpoint: the EMA weights when the run
    kept an EMA (and `prefer_ema`), else the trained model's."""
    ema = state.get("ema")
    if prefer_ema and isinstance(ema, dict) and ema.get("state"):
        return ema["state"]
    if "model" not in state:
        raise CheckpointError(f"checkpoint has no 'model' weights; keys: {sorted(state)}")
    return state["model"]


def get_rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy, Python and an optional loader generator."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    if loader_generator is not None:
        out["loader"] = loader_generator.get_state()
    return out


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what `get_rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"].cpu())


def check_resume_config(saved: dict | None, current: dict | None, path: str | os.PathLike = "checkpoint",
                        ignore: tuple[str, ...] = ()) -> None:
    """Raise `CheckpointError` listing the dotted keys where the configs differ.

    The saved config is read through the current schema first, so a key added to the toolkit since
    the checkpoint was written counts as its default (resuming an older run is not refused because
    a new option exists, only when the run asks for something else than the default)."""
    if saved is None or current is None:
        return
    from kd_bnn.config import ConfigError, config_to_dict, validate

    try:
        saved = config_to_dict(validate(saved, str(path)))
    except ConfigError:
        pass  # a key the toolkit no longer has: compare as written (the difference is listed)
    keys = [k for k in diff_configs(saved, current) if not any(k == i or k.startswith(i + ".") for i in ignore)]
    if keys:
        lines = []
        for k in keys:
            a, b = _lookup(saved, k), _lookup(current, k)
            lines.append(f"  {k}: checkpoint {a!r}, now {b!r}")
        raise CheckpointError(f"cannot resume from {path}: the config differs in {len(keys)} key(s):\n"
                              + "\n".join(lines))


def _lookup(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node
