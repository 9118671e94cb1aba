"""Training engine: the `Trainer` and what plugs into it (callbacks, optimizer and schedule, EMA,
DDP), weights-only checkpoints, run logging, evaluation and training-step benchmarks.

The evaluation and benchmark names build detectors (they import `kd_bnn.models`, and through it
torchvision), so they are imported on first use (PEP 562 module ``__getattr__``): importing a
light submodule such as ``kd_bnn.engine.checkpoint`` does not load every detector family.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kd_bnn.engine.callbacks import EVENTS, BinaryCallback
from kd_bnn.engine.checkpoint import (
    CheckpointError,
    check_resume_config,
    check_safe,
    eval_state_dict,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from kd_bnn.engine.distributed import dist_info, init_distributed, resolve_device
from kd_bnn.engine.ema import ModelEMA
from kd_bnn.engine.logging import RunLogger
from kd_bnn.engine.optim import LRSchedule, build_optimizer, param_groups
from kd_bnn.engine.trainer import NonFiniteLossError, Trainer

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; at run time see _LAZY
    from kd_bnn.engine.bench import benchmark_train, benchmark_train_step
    from kd_bnn.engine.evaluate import evaluate_model, flatten_kitti_result, kitti_ground_truth

#: submodule -> the names it provides lazily
_LAZY_MODULES = {
    "bench": ("benchmark_train", "benchmark_train_step"),
    "evaluate": ("evaluate_model", "flatten_kitti_result", "kitti_ground_truth"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

__all__ = [
    "CheckpointError", "check_resume_config", "check_safe", "eval_state_dict", "get_rng_state", "load_checkpoint",
    "save_checkpoint", "set_rng_state", "RunLogger", "LRSchedule", "ModelEMA", "NonFiniteLossError",
    "Trainer", "BinaryCallback", "EVENTS", "benchmark_train", "benchmark_train_step", "build_optimizer",
    "dist_info", "init_distributed", "evaluate_model", "flatten_kitti_result", "kitti_ground_truth", "param_groups",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    """Import an evaluation or benchmark name on first access, and cache it in the module."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
