"""Devices and DDP: the device a process trains on, the process group under ``torchrun``
(`distributed_session`), and rank 0 deciding or holding something for every rank (the run
folder, a checkpoint read from its disk, evaluation metrics).

Under ``torchrun`` (single node: ``--nproc_per_node N``; several: ``--nnodes M --node_rank i
--rdzv-endpoint HOST:PORT``) every process runs the whole experiment; `distributed_session`
initialises the process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``): NCCL when the process trains on a CUDA
device (``cuda:LOCAL_RANK``), gloo on CPU. Only rank 0 writes files; every file another rank
needs (a checkpoint to resume or to load the teacher from) is read by rank 0 and broadcast, so
the nodes need not share a file system for the run folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

#: how long a rank waits in a collective: the other ranks wait while rank 0 alone evaluates
#: (a whole KITTI val split) and writes checkpoints, longer than NCCL's default 10 minutes
TIMEOUT = timedelta(minutes=60)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def env_world_size() -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 outside torchrun)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def launched_rank() -> int:
    """``RANK`` of torchrun's environment (0 outside torchrun): which process prints a command's
    result, also after the process group is gone."""
    return _env_int("RANK", 0)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> the local CUDA device when available, else CPU. Under torchrun (and for a
    plain ``"cuda"``) the local device is ``cuda:LOCAL_RANK``."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", _env_int("LOCAL_RANK", 0))
        return torch.device("cpu")
    if spec == "cuda" and env_world_size() > 1:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device(spec)


def init_distributed(backend: str | None = None, device: str | torch.device | None = "auto") -> tuple[int, int]:
    """Initialise the process group from torchrun's env when ``WORLD_SIZE > 1``.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default NCCL when `device` resolves to a CUDA device
            (which becomes this process's current device), else gloo.
        device: the device the process trains on (``cfg.device``).

    Returns:
        (rank, world_size); (0, 1) when not distributed.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if env_world_size() <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = resolve_device(device)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0, or not distributed: the process that writes files and prints."""
    return dist_info()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist_info()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def distributed_session(device: str | torch.device | None = "auto", backend: str | None = None
                        ) -> Iterator[tuple[int, int]]:
    """``with distributed_session(cfg.device) as (rank, world):`` the process group of a torchrun
    launch (`init_distributed`) for the block, destroyed at its end when this call created it
    (after a barrier when the block ended normally). Outside torchrun: (0, 1), nothing done;
    inside an existing group: that group, left as it is."""
    created = env_world_size() > 1 and not (dist.is_available() and dist.is_initialized())
    info = init_distributed(backend, device)
    ok = False
    try:
        yield info
        ok = True
    finally:
        if created and dist.is_initialized():
            if ok:
                with contextlib.suppress(Exception):
                    barrier()
            dist.destroy_process_group()


def decide_on_rank0(fn: Callable[[], T], errors: tuple[type[Exception], ...] = ()) -> T:
    """``fn()`` run on rank 0 only, its (picklable) result given to every rank.

    An exception of one of the `errors` types raised by ``fn`` on rank 0 is raised on every rank
    (as the first of `errors` it is an instance of, with its message); anything else propagates
    on rank 0 only (torchrun then stops the other ranks). Without a process group this is just
    ``fn()``.
    """
    rank, world = dist_info()
    if world <= 1:
        return fn()
    msg: list[Any] = [None]
    if rank == 0:
        try:
            msg = [(None, fn())]
        except errors as exc:
            msg = [(next(i for i, e in enumerate(errors) if isinstance(exc, e)), str(exc))]
    dist.broadcast_object_list(msg, src=0)
    kind, value = msg[0]
    if kind is None:
        return value
    raise errors[kind](value)


def all_gather(obj: T) -> list[T]:
    """Every rank's (picklable) `obj`, in rank order, on every rank; ``[obj]`` alone."""
    world = dist_info()[1]
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` is true on any rank (`flag` alone without a process group)."""
    if dist_info()[1] <= 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@torch.no_grad()
def broadcast_module(*modules: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers of `modules` (in place)."""
    if dist_info()[1] <= 1:
        return
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            dist.broadcast(t.data, 0)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` keeping the forward hooks (distillation taps)
    that were registered on the BatchNorm modules it replaces."""
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in model.named_modules():
        if name in hooks:
            fwd, pre = hooks[name]
            m._forward_hooks.update(fwd)
            m._forward_pre_hooks.update(pre)
    return model


__all__ = ["TIMEOUT", "all_gather", "any_rank", "barrier", "broadcast_module", "convert_sync_batchnorm",
           "decide_on_rank0", "dist_info", "distributed_session", "env_world_size", "init_distributed",
           "is_main_process", "launched_rank", "resolve_device"]
