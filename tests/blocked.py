"""Shared by tests of binary blocks: a block model's BN statistics and block parameters moved away
from their identity initialisation, so that a runtime that dropped any of them would differ."""

from __future__ import annotations

import torch
from torch import nn

from kd_bnn.binary.blocks import BinaryBlock, RPReLU


def randomise_blocks(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
        if isinstance(m, RPReLU):
            for p in (m.gamma, m.zeta):
                p.data.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
        if isinstance(m, BinaryBlock) and not isinstance(m.move, nn.Identity):
            m.move.bias.data.copy_(torch.rand(m.move.bias.shape, generator=g) * 0.4 - 0.2)
    return model
