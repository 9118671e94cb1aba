"""Exponential moving average of the trained weights (the model the `Trainer` evaluates and
saves as ``ema`` when ``train.ema`` is on)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from kd_bnn.distill.taps import remove_tap_hooks, unwrap_model


class ModelEMA:
    """Exponential moving average of a model's weights (Polyak averaging).

    ``ema = d * ema + (1 - d) * w`` with ``d = decay * (1 - exp(-updates / tau))``, a ramp that
    lets the average follow the fast early changes (as YOLOv5's ModelEMA does). Buffers (BN
    statistics) are copied. The copy carries no `FeatureTaps` hooks.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0, updates: int = 0) -> None:
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        remove_tap_hooks(self.module)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = int(updates)

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = unwrap_model(model).state_dict()
        for k, v in self.module.state_dict().items():
            s = src[k].detach()
            if v.dtype.is_floating_point:
                v.mul_(d).add_(s.to(v.dtype), alpha=1.0 - d)
            else:
                v.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state"])
        self.updates = int(state["updates"])


__all__ = ["ModelEMA"]
