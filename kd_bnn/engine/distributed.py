"""Devices and DDP: the device a process trains on, the process group under ``torchrun``, and
rank 0 deciding something for every rank (e.g. the run folder)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> the local CUDA device when available (LOCAL_RANK under torchrun), else CPU."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(spec)


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the process group from torchrun's env when ``WORLD_SIZE > 1``.

    Returns:
        (rank, world_size); (0, 1) when not distributed.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decide_on_rank0(fn: Callable[[], T], errors: tuple[type[Exception], ...] = ()) -> T:
    """``fn()`` run on rank 0 only, its (picklable) result given to every rank.

    An exception of one of the `errors` types raised by ``fn`` on rank 0 is raised on every rank
    (as the first of `errors` it is an instance of, with its message); anything else propagates
    on rank 0 only. Without a process group this is just ``fn()``.
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


__all__ = ["decide_on_rank0", "dist_info", "init_distributed", "resolve_device"]
