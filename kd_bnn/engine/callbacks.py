"""What plugs into the `Trainer`'s loop: callbacks ``fn(event, trainer)``.

The trainer fires, in order:

* ``"train_start"``: once, when `Trainer.fit` starts;
* ``"epoch_start"``: before each epoch's first step (``trainer.epoch`` = the epoch about to run);
* ``"optimizer_step"``: in each step right after the optimizer step (and the AMP scaler update),
  before the EMA update and before ``trainer.iteration`` counts the step: the place for changes
  to the weights that the EMA must average;
* ``"step_end"``: after each step (``trainer.iteration`` counted);
* ``"epoch_end"``: after each epoch's evaluation, checkpoint and log row;
* ``"train_end"``: once, when `fit` returns (also after an interruption).

Callbacks run in list order, and what one raises propagates as if the loop had raised it.
Setting ``trainer.stop_requested`` stops the run after the current step (a step inside an epoch
ends it as an interruption, ``last.pt`` saved; at ``"epoch_end"`` as ``"stopped"``).

`BinaryCallback` is what binary-weight training adds to the loop; the `Trainer` runs one first
(``binary_policy``), so the trainer itself knows nothing of binarization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kd_bnn.binary.convert import apply_stages
from kd_bnn.binary.layers import clip_latent_weights

#: The events a `Callback` receives, in the order the loop fires them.
EVENTS = ("train_start", "epoch_start", "optimizer_step", "step_end", "epoch_end", "train_end")

Callback = Callable[[str, Any], None]


class BinaryCallback:
    """Staged binarization and BinaryConnect latent-weight clipping in the training loop.

    * ``"epoch_start"``: `apply_stages` of `policy` (a `BinaryConfig`) to the model and to its EMA
      copy: the binary layers whose stage has started by this epoch run binary, the others as
      float convs; logs ``epoch N: K binary layer(s) enabled``;
    * ``"optimizer_step"``: the latent weights of the enabled `BinaryConv2d` layers are clamped
      to their ``clip`` (Courbariaux et al., BinaryConnect, NeurIPS 2015), before the EMA
      averages them.

    With ``policy=None`` only the clipping runs (a model built binary, no stages); on a float
    model both are no-ops.
    """

    def __init__(self, policy: Any = None) -> None:
        self.policy = policy

    @property
    def leaves_parameters_unused(self) -> bool:
        """Staged binarization leaves a disabled layer's learned scale unused in the forward:
        DDP must be built with ``find_unused_parameters``."""
        return bool(getattr(self.policy, "stages", None))

    def __call__(self, event: str, trainer: Any) -> None:
        if event == "epoch_start" and self.policy is not None:
            enabled = apply_stages(trainer.model, self.policy, trainer.epoch)
            if trainer.ema is not None:
                apply_stages(trainer.ema.module, self.policy, trainer.epoch)
            trainer.logger.info(f"epoch {trainer.epoch + 1}: {len(enabled)} binary layer(s) enabled")
        elif event == "optimizer_step":
            clip_latent_weights(trainer.model)


__all__ = ["EVENTS", "BinaryCallback", "Callback"]
