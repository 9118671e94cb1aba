"""Training engine: the `Trainer`, weights-only checkpoints, run logging and plots."""

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
from kd_bnn.engine.logging import RunLogger
from kd_bnn.engine.trainer import (
    LRSchedule,
    ModelEMA,
    NonFiniteLossError,
    Trainer,
    benchmark_train,
    benchmark_train_step,
    build_optimizer,
    dist_info,
    flatten_kitti_result,
    init_distributed,
    make_kitti_evaluate_fn,
    param_groups,
    resolve_device,
    unpack_batch,
)

__all__ = [
    "CheckpointError", "check_resume_config", "check_safe", "eval_state_dict", "get_rng_state", "load_checkpoint",
    "save_checkpoint", "set_rng_state", "RunLogger", "LRSchedule", "ModelEMA", "NonFiniteLossError",
    "Trainer", "benchmark_train", "benchmark_train_step", "build_optimizer", "dist_info",
    "init_distributed", "flatten_kitti_result", "make_kitti_evaluate_fn", "param_groups", "resolve_device", "unpack_batch",
]
