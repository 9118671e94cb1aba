"""Optimizer and LR schedule of the `Trainer`: parameter groups (no weight decay on norm
parameters, biases and binary scales), SGD / AdamW / Adam, linear warmup then cosine / step /
constant."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.config import TrainConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float,
                 extra: Iterable[nn.Module | nn.Parameter] = ()) -> list[dict[str, Any]]:
    """Two groups: decayed conv/linear weights, and no decay for norm parameters, biases and
    binary scale parameters (decaying them shrinks the layer's output, not its complexity).

    `extra` adds modules (e.g. the distiller's adapters) or bare parameters, split alike.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()

    def visit(mod: nn.Module) -> None:
        for m in mod.modules():
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                is_binary_extra = isinstance(m, BinaryConv2d) and name != "weight"
                if (isinstance(m, _NORM_TYPES) or name == "bias" or p.ndim <= 1 or "scale" in name
                        or is_binary_extra):
                    no_decay.append(p)
                else:
                    decay.append(p)

    visit(model)
    for e in extra:
        if isinstance(e, nn.Module):
            visit(e)
        elif e.requires_grad and id(e) not in seen:
            seen.add(id(e))
            (no_decay if e.ndim <= 1 else decay).append(e)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum), AdamW or Adam over `groups` at ``cfg.lr``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    if cfg.optimizer == "adam":
        # Adam's L2 penalty goes through the gradient (coupled), as torch.optim.Adam defines it
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"train.optimizer: expected sgd, adamw or adam, found {cfg.optimizer!r}")


class LRSchedule:
    """LR multiplier per iteration: linear warmup, then cosine / step / constant.

    * warmup (``warmup_epochs * iters_per_epoch`` iterations): ``(it + 1) / warmup_iters``;
    * cosine: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the
      post-warmup iterations done and ``r = min_lr_ratio`` (Loshchilov & Hutter, SGDR, 2017);
    * step: ``gamma ** (number of milestones (epochs) passed)``;
    * constant: 1.
    """

    def __init__(self, cfg: TrainConfig, iters_per_epoch: int, min_lr_ratio: float = 0.01) -> None:
        self.kind = cfg.scheduler
        self.iters_per_epoch = max(int(iters_per_epoch), 1)
        self.total = max(cfg.epochs * self.iters_per_epoch, 1)
        self.warmup = min(int(round(cfg.warmup_epochs * self.iters_per_epoch)), self.total)
        self.milestones = sorted(int(m) for m in cfg.step_milestones)
        self.gamma = float(cfg.step_gamma)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return (it + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            epoch = it // self.iters_per_epoch
            return self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        span = max(self.total - self.warmup, 1)
        p = min((it - self.warmup) / span, 1.0)
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))


__all__ = ["LRSchedule", "build_optimizer", "param_groups"]
