"""One trainer for the teacher (detection loss only) and the student (with a `Distiller`).

SGD / AdamW / Adam with no weight decay on BN parameters, biases and binary scales; linear
warmup by iterations then cosine / step / constant LR; gradient clipping; EMA; AMP on CUDA;
latent-weight clipping (BinaryConnect) after each step and staged binarization at each epoch
start; evaluation every ``eval_interval`` epochs; atomic weights-only checkpoints with exact
resume; DDP under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.config import TrainConfig
from kd_bnn.distill.distiller import Distiller
from kd_bnn.distill.taps import remove_tap_hooks, unwrap_model
from kd_bnn.engine.checkpoint import (
    CheckpointError,
    check_resume_config,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from kd_bnn.engine.logging import RunLogger, is_tty

try:  # the binary room is optional for float-only use
    from kd_bnn.binary.convert import apply_stages as _apply_stages
    from kd_bnn.binary.layers import BinaryConv2d as _BinaryConv2d
    from kd_bnn.binary.layers import clip_latent_weights as _clip_latent_weights
except Exception:  # pragma: no cover - binary room not importable
    _apply_stages = None
    _BinaryConv2d = None
    _clip_latent_weights = None

CHECKPOINT_FORMAT = "kd_bnn.checkpoint/1"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped, the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Devices and distributed
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA
# --------------------------------------------------------------------------------------------
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
                is_binary_extra = _BinaryConv2d is not None and isinstance(m, _BinaryConv2d) and name != "weight"
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


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None, list]:
    """(images, targets, ignore, meta) of a `kd_bnn.data.loader.Batch` or an (images, targets
    [, ignore [, meta]]) tuple."""
    if hasattr(batch, "images") and hasattr(batch, "targets"):
        return batch.images, batch.targets, getattr(batch, "ignore", None), list(getattr(batch, "meta", []) or [])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        ignore = batch[2] if len(batch) > 2 else None
        meta = list(batch[3]) if len(batch) > 3 else []
        return batch[0], batch[1], ignore, meta
    raise TypeError(f"a batch must be a Batch or (images, targets[, ignore]) tuple, found {type(batch).__name__}")


def _reseed_transforms(dataset: Any, seed: int) -> None:
    """Reseed the dataset's transforms (if they have ``set_seed``) so each epoch's augmentation
    depends only on (seed, epoch): an interrupted run resumes with the same stream."""
    seen = 0
    while dataset is not None and seen < 8:
        t = getattr(dataset, "transforms", None)
        if t is not None and hasattr(t, "set_seed"):
            t.set_seed(seed)
            return
        dataset = getattr(dataset, "dataset", None)
        seen += 1


def _generators(loader: Any) -> list[torch.Generator]:
    out: list[torch.Generator] = []
    for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
Callback = Callable[[str, "Trainer"], None]


class Trainer:
    """Train a Detector, optionally against a teacher through a `Distiller`.

    Args:
        model: the Detector to train (the student when `distiller` is given).
        train_loader, val_loader: loaders of `Batch`es (or (images, targets, ignore) tuples).
        cfg: the `TrainConfig` (optimizer, schedule, EMA, AMP, eval interval, best metric).
        run_dir: ``runs/<name>``: checkpoints, config.yaml, train.log, metrics.csv, plots.
        distiller: a `Distiller` whose student is `model`; its adapters are optimised too.
        binary_policy: a `BinaryConfig`; its stages are applied at each epoch start.
        evaluate_fn: ``fn(model) -> {flat metric: value}`` (e.g. "Car/moderate/R40"), or
            ``(metrics, result)`` where `result` has ``precision`` / ``recall`` for PR plots.
        device: "auto", "cpu", "cuda:0", ...
        config_dict: the resolved experiment config saved in checkpoints and config.yaml and
            compared on resume (default: ``cfg``'s dict).
        seed: base seed of the per-epoch augmentation reseeding.
        callbacks: ``fn(event, trainer)`` for events "train_start", "epoch_start", "step_end",
            "epoch_end", "train_end".
        progress: tqdm bars; None = only on a TTY.
        resume: a ``last.pt`` to continue from (exactly, on CPU).
        plots: draw loss curves / PR curves / a validation grid at the end of `fit`.
        min_lr_ratio: final LR of the cosine schedule as a fraction of ``cfg.lr``.
        resume_ignore: dotted config keys (or sections) allowed to differ on resume.

    Resume is exact (bitwise on CPU) from end-of-epoch checkpoints. A checkpoint that Ctrl-C
    wrote inside an epoch (``epoch_complete`` False) restarts that epoch with the weights at the
    interruption. ``last.pt`` is written before an epoch's evaluation too (``pending_eval`` holds
    the epoch's log row): a crash or Ctrl-C during evaluation keeps the trained epoch, and a
    resume from it runs that evaluation first (still exact).

    Example:
        >>> student, _ = binarize(copy.deepcopy(teacher), cfg.student.binary)
        >>> d = Distiller(teacher, student, cfg.distill.terms)
        >>> t = Trainer(student, train_loader, val_loader, cfg.train, "runs/demo", distiller=d,
        ...             binary_policy=cfg.student.binary, config_dict=config_to_dict(cfg),
        ...             evaluate_fn=make_kitti_evaluate_fn(val_loader, student.class_names))
        >>> t.fit()
    """

    def __init__(self, model: nn.Module, train_loader: Iterable, val_loader: Iterable | None = None,
                 cfg: TrainConfig | None = None, run_dir: str | os.PathLike = "runs/exp",
                 distiller: Distiller | None = None, binary_policy: Any = None,
                 evaluate_fn: Callable[[nn.Module], Any] | None = None, device: str | torch.device = "auto",
                 config_dict: dict | None = None, seed: int = 0, callbacks: Sequence[Callback] = (),
                 progress: bool | None = None, resume: str | os.PathLike | None = None, plots: bool = True,
                 min_lr_ratio: float = 0.01, tensorboard: bool = True, console: bool = True,
                 class_names: Sequence[str] | None = None,
                 resume_ignore: Sequence[str] = ()) -> None:
        self.cfg = cfg or TrainConfig()
        self.rank, self.world = dist_info()
        self.is_main = self.rank == 0
        self.device = resolve_device(device)
        self.model = unwrap_model(model).to(self.device)
        if distiller is not None:
            if unwrap_model(distiller.student) is not self.model:
                raise ValueError("Trainer: distiller.student must be the model being trained")
            distiller.to(self.device)
        self.distiller = distiller
        self.train_loader, self.val_loader = train_loader, val_loader
        self.binary_policy = binary_policy
        self.evaluate_fn = evaluate_fn
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict if config_dict is not None else self.cfg.model_dump(mode="json")
        self.seed = int(seed)
        self.callbacks = list(callbacks)
        self.progress = is_tty() if progress is None else bool(progress)
        self.plots = plots
        self.class_names = list(class_names or getattr(self.model, "class_names", []) or [])
        self.resume_ignore = tuple(resume_ignore)

        # DDP: SyncBN optional; the wrapper runs forward/backward, the Detector computes the loss
        self.ddp: nn.Module | None = None
        sync_bn_skipped = False
        if self.world > 1:
            if self.cfg.sync_bn and self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            elif self.cfg.sync_bn:
                sync_bn_skipped = True  # SyncBatchNorm needs CUDA; plain per-process BN on CPU
            ids = [self.device.index] if self.device.type == "cuda" else None
            # staged binarization leaves a disabled layer's learned scale unused in the forward
            unused = bool(getattr(binary_policy, "stages", None))
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=unused)
        self.forward_model: nn.Module = self.ddp if self.ddp is not None else self.model
        if self.world > 1 and distiller is not None:  # adapters live outside DDP: start them equal
            with torch.no_grad():
                for t in list(distiller.adapters.parameters()) + list(distiller.adapters.buffers()):
                    dist.broadcast(t, 0)

        extra = [distiller.adapters] if distiller is not None else []
        self.optimizer = build_optimizer(param_groups(self.model, self.cfg.weight_decay, extra), self.cfg)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.extra_params = distiller.trainable_parameters() if distiller is not None else []
        self.iters_per_epoch = len(train_loader)  # type: ignore[arg-type]
        if self.iters_per_epoch == 0:
            raise ValueError("Trainer: the training loader yields no batch (empty split, or "
                             "drop_last with fewer images than one batch)")
        self.schedule = LRSchedule(self.cfg, self.iters_per_epoch, min_lr_ratio)
        self.amp = bool(self.cfg.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = ModelEMA(self.model, self.cfg.ema_decay) if self.cfg.ema else None

        self.epoch = 0  # next epoch to run (= epochs completed)
        self.epoch_complete = True
        self.iteration = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_eval_result: Any = None
        self.history: list[dict[str, Any]] = []
        self.pending_eval: dict[str, Any] | None = None  # log row of a trained, not yet evaluated epoch
        self.stop_requested = False
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, config=self.config_dict,
                                tensorboard=tensorboard, console=console, keep_rows=resume is not None)
        if sync_bn_skipped:
            self.logger.warning("train.sync_bn ignored: SyncBatchNorm works on CUDA devices only")
        if resume is not None:
            self.resume(resume)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (weights-only types)."""
        gens = _generators(self.train_loader)
        rng = get_rng_state(gens[0] if gens else None)
        if len(gens) > 1:
            rng["loader_extra"] = [g.get_state() for g in gens[1:]]
        vgens = _generators(self.val_loader) if self.val_loader is not None else []
        if vgens:
            rng["val_loader"] = [g.get_state() for g in vgens]
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "adapters": self.distiller.adapters.state_dict() if self.distiller is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"iteration": self.iteration, "iters_per_epoch": self.iters_per_epoch},
            "scaler": self.scaler.state_dict() if self.amp else {},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch,
            "epoch_complete": self.epoch_complete,
            "iteration": self.iteration,
            "rng": rng,
            "config": self.config_dict,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "metric_name": self.cfg.best_metric,
            "metrics": dict(self.last_metrics),
            "pending_eval": dict(self.pending_eval) if self.pending_eval is not None else None,
            "class_names": list(self.class_names),
            "input_size": list(getattr(self.model, "input_size", []) or []),
            # what the weights are: a float model (a teacher) has none; export refuses to binarize it silently
            "binary_convs": sum(isinstance(m, BinaryConv2d) for m in unwrap_model(self.model).modules()),
        }

    def save(self, name: str = "last.pt") -> Path | None:
        """Write a checkpoint into the run folder (rank 0 only); refuses non-finite weights so
        the last good checkpoint is never overwritten by a diverged model."""
        if not self.is_main:
            return None
        bad = [k for k, v in self.model.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            msg = (f"not saving {name}: non-finite weights in {', '.join(bad[:5])}"
                   f"{' ...' if len(bad) > 5 else ''}; the last good checkpoint is kept")
            self.logger.error(msg)
            raise NonFiniteLossError(msg)
        return save_checkpoint(self.run_dir / name, self.state_dict())

    def resume(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, schedule, EMA, epoch, iteration, RNG states from `path`.

        Raises:
            CheckpointError: unreadable file, or a config that differs (listing the keys).
        """
        state = load_checkpoint(path, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a kd_bnn training checkpoint (format {state.get('format')!r})")
        check_resume_config(state.get("config"), self.config_dict, path, ignore=self.resume_ignore)
        self.model.load_state_dict(state["model"])
        if self.distiller is not None and state.get("adapters"):
            self.distiller.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.epoch_complete = bool(state.get("epoch_complete", True))
        self.iteration = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.last_metrics = dict(state.get("metrics") or {})
        pending = state.get("pending_eval")
        self.pending_eval = dict(pending) if isinstance(pending, dict) and self.epoch_complete else None
        self.logger.truncate(self.epoch - (1 if self.pending_eval is not None else 0))
        rng = state["rng"]
        gens = _generators(self.train_loader)
        set_rng_state(rng, gens[0] if gens else None)
        for g, s in zip(gens[1:], rng.get("loader_extra", [])):
            g.set_state(s)
        if self.val_loader is not None:
            for g, s in zip(_generators(self.val_loader), rng.get("val_loader", [])):
                g.set_state(s)
        where = "end of" if self.epoch_complete else "inside"
        self.logger.info(f"resumed from {path}: {where} epoch {self.epoch if not self.epoch_complete else self.epoch - 1}"
                         f", iteration {self.iteration}"
                         + ("; its evaluation did not finish and runs first" if self.pending_eval is not None else ""))

    # -- events --------------------------------------------------------------------------------
    def _event(self, name: str) -> None:
        for cb in self.callbacks:
            cb(name, self)

    def _set_lr(self) -> float:
        f = self.schedule(self.iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def _check_finite(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in parts.items() if not torch.isfinite(torch.as_tensor(v)).all()]
        if not torch.isfinite(loss.detach()).all():
            bad = bad or ["total"]
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            vals = ", ".join(f"{k}={float(torch.as_tensor(parts[k]).float().mean()) if k in parts else float(loss)}"
                             for k in bad) or "on another rank"
            where = f"epoch {self.epoch}, iteration {self.iteration}"
            msg = (f"non-finite loss at {where}: {vals}; training stopped, the last good checkpoint "
                   f"({self.run_dir / 'last.pt'}) is kept")
            self.logger.error(msg)
            raise NonFiniteLossError(msg)

    def _sync_extra_grads(self) -> None:
        if self.world <= 1:
            return
        for p in self.extra_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def _sync_buffers(self) -> None:
        """Broadcast rank 0's BN statistics (model, adapters) and EMA weights at epoch end, so
        every rank evaluates and would save the same model (DDP syncs buffers only before each
        forward, so the last forward leaves them rank-local)."""
        if self.world <= 1:
            return
        tensors = list(self.model.buffers())
        if self.distiller is not None:
            tensors += list(self.distiller.adapters.buffers())
        if self.ema is not None:
            tensors += list(self.ema.module.state_dict().values())
        for b in tensors:
            dist.broadcast(b, 0)

    # -- training ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step on `batch`; returns the loss parts as floats."""
        images, targets, ignore, _ = unpack_batch(batch)
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if ignore is not None:
            ignore = [t.to(self.device, non_blocking=True) for t in ignore]
        lr = self._set_lr()
        with self._autocast():
            if self.distiller is not None:
                _, loss, parts = self.distiller(images, targets, ignore, student_fn=self.forward_model)
            else:
                raw = self.forward_model(images)
                loss, parts = self.model.loss(raw, targets, ignore)
                parts = {f"det/{k}": v.detach() for k, v in parts.items()}
        self._check_finite(loss, parts)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self._sync_extra_grads()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            if not self.amp and not torch.isfinite(norm):  # (with AMP the scaler skips the step)
                self._check_finite(norm.reshape(()), {"grad_norm": norm.detach()})
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if _clip_latent_weights is not None:
            _clip_latent_weights(self.model)
        if self.ema is not None:
            self.ema.update(self.model)
        self.iteration += 1
        out = {k: float(v) for k, v in parts.items()}
        out["loss"] = float(loss.detach())
        out["lr"] = lr
        return out

    def train_one_epoch(self) -> dict[str, float]:
        """Train over the loader once; returns the mean loss parts and the last LR."""
        self.model.train()
        if self.distiller is not None:
            self.distiller.train()
        sums: dict[str, float] = defaultdict(float)
        n = 0
        it: Iterable = self.train_loader
        bar = None
        if self.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(self.train_loader, total=self.iters_per_epoch, leave=False, dynamic_ncols=True,
                       desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}")
            it = bar
        lr = self.optimizer.param_groups[0]["lr"]
        for batch in it:
            out = self.train_step(batch)
            lr = out.pop("lr")
            for k, v in out.items():
                sums[k] += v
            n += 1
            if bar is not None:
                bar.set_postfix({k.split("/")[-1][:12]: f"{v:.3g}" for k, v in out.items()}, refresh=False)
            self._event("step_end")
            if self.stop_requested:
                break
        if bar is not None:
            bar.close()
        self._epoch_steps = n
        means = {k: v / max(n, 1) for k, v in sums.items()}
        means["lr"] = lr
        return means

    def eval_model(self) -> nn.Module:
        """The model evaluated and exported: the EMA when enabled, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict[str, float]:
        """Run `evaluate_fn` on the eval model (eval mode, no grad); flat metrics."""
        if self.evaluate_fn is None:
            return {}
        m = self.eval_model()
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                out = self.evaluate_fn(m)
        finally:
            m.train(was)
        result = None
        if isinstance(out, tuple):
            out, result = out
        self.last_eval_result = result
        return {k: float(v) for k, v in dict(out).items()}

    def _apply_stages(self, epoch: int) -> None:
        if self.binary_policy is None or _apply_stages is None:
            return
        enabled = _apply_stages(self.model, self.binary_policy, epoch)
        if self.ema is not None:
            _apply_stages(self.ema.module, self.binary_policy, epoch)
        self.logger.info(f"epoch {epoch + 1}: {len(enabled)} binary layer(s) enabled")

    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to ``cfg.epochs``.

        Returns:
            {"status": "completed" | "interrupted" | "stopped", "epoch", "iteration", "best_metric",
            "best_epoch", "metrics", "run_dir"}.

        Raises:
            NonFiniteLossError: a NaN/inf loss (the message names the term).
        """
        status = "completed"
        self._event("train_start")
        self.logger.info(f"training {type(self.model).__name__} for {self.cfg.epochs} epochs "
                         f"({self.iters_per_epoch} it/epoch) on {self.device}"
                         + (f", distilling {', '.join(self.distiller.term_keys())}" if self.distiller else "")
                         + (f", world size {self.world}" if self.world > 1 else ""))
        try:
            if self.pending_eval is not None:  # resumed from a checkpoint written before an evaluation
                self._end_epoch(dict(self.pending_eval))
            while self.epoch < self.cfg.epochs and not self.stop_requested:
                epoch = self.epoch
                self.epoch_complete = False
                sampler = getattr(self.train_loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                _reseed_transforms(getattr(self.train_loader, "dataset", None),
                                   self.seed + 1_000_003 * self.rank + 7919 * epoch)
                self._apply_stages(epoch)
                self._event("epoch_start")
                t0 = time.perf_counter()
                self._improved = False
                means = self.train_one_epoch()
                if self.stop_requested and self._epoch_steps < self.iters_per_epoch:
                    raise KeyboardInterrupt  # stopped inside the epoch: save as an interruption
                self._sync_buffers()
                row: dict[str, Any] = {"epoch": epoch + 1, "time_s": round(time.perf_counter() - t0, 3)}
                row.update(means)
                self.epoch = epoch + 1
                self.epoch_complete = True
                self._end_epoch(row)
        except KeyboardInterrupt:
            status = "interrupted"
            self.save("last.pt")
            state = (f"evaluation of epoch {self.epoch} pending" if self.pending_eval is not None
                     else f"{self.epoch}/{self.cfg.epochs} epochs done"
                     + ("" if self.epoch_complete else f", epoch {self.epoch + 1} in progress"))
            self.logger.info(f"interrupted: saved {self.run_dir / 'last.pt'} ({state}); resume with it")
        finally:
            if self.is_main and self.plots:
                self._plots()
        if status == "completed" and self.epoch < self.cfg.epochs:
            status = "stopped"
        self._event("train_end")
        return {"status": status, "epoch": self.epoch, "iteration": self.iteration,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "metrics": dict(self.last_metrics), "run_dir": str(self.run_dir)}

    _improved = False
    _epoch_steps = 0

    def _end_epoch(self, row: dict[str, Any]) -> None:
        """Evaluate (when due), checkpoint and log the epoch just trained (``self.epoch``).

        Before an evaluation ``last.pt`` is written with the epoch's row in ``pending_eval``, so a
        crash or Ctrl-C during the evaluation loses no training; after it ``last.pt`` is written
        again with the metrics and best-metric bookkeeping.
        """
        done = self.epoch
        last = done == self.cfg.epochs
        self._improved = False
        if self.evaluate_fn is not None and (done % max(self.cfg.eval_interval, 1) == 0 or last):
            self.pending_eval = dict(row)
            self.save("last.pt")
            metrics = self.evaluate()
            self.last_metrics = metrics
            row.update(metrics)
            self._update_best(metrics, done)
            self.pending_eval = None
            self.save("last.pt")
        elif done % max(self.cfg.save_interval, 1) == 0 or last:
            self.save("last.pt")
        if self._improved:
            self.save("best.pt")
        self.history.append(row)
        self.logger.log_epoch(row, step=self.iteration)
        self.logger.info(self._format_row(row))
        self._event("epoch_end")

    def _update_best(self, metrics: dict[str, float], epoch: int) -> None:
        self._improved = False
        name = self.cfg.best_metric
        if name not in metrics:
            raise KeyError(f"train.best_metric {name!r} is not among the metrics evaluate_fn returns: "
                           f"{sorted(metrics)}")
        value = metrics[name]
        if math.isfinite(value) and (self.best_metric is None or value > self.best_metric):
            self.best_metric, self.best_epoch = value, epoch
            self._improved = True

    def _format_row(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}/{self.cfg.epochs}"]
        for k, v in row.items():
            if k == "epoch":
                continue
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        return " ".join(parts)

    def _plots(self) -> None:
        try:
            from kd_bnn.engine import plots

            csv_path = self.run_dir / "metrics.csv"
            if csv_path.is_file():
                plots.plot_loss_curves(csv_path, self.run_dir / "loss_curves.png")
            res = self.last_eval_result
            if res is not None and hasattr(res, "precision") and hasattr(res, "recall"):
                plots.plot_pr_curves(res, self.run_dir / "pr_curves.png")
            if self.val_loader is not None and hasattr(self.model, "predict"):
                plots.plot_validation_grid(self.eval_model(), self.val_loader, self.run_dir / "val_batch.png",
                                           class_names=self.class_names, device=self.device)
        except Exception as exc:  # plots never break a run
            self.logger.warning(f"plots skipped: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.logger.close()


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------

class _StepRunner:
    """One training-step closure (forward, loss, backward, AdamW step) for benchmarking."""

    def __init__(self, model: nn.Module, batch: Any, distiller: Distiller | None, device: torch.device,
                 lr: float, amp: bool) -> None:
        images, targets, ignore, _ = unpack_batch(batch)
        self.images, self.targets = images.to(device), targets.to(device)
        self.ignore = [t.to(device) for t in ignore] if ignore is not None else None
        self.model = unwrap_model(model).to(device).train()
        self.distiller = distiller
        params = list(self.model.parameters())
        if distiller is not None:
            distiller.to(device).train()
            params += distiller.trainable_parameters()
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr)
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.device = device

    def __call__(self) -> None:
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with ctx:
            if self.distiller is not None:
                _, loss, _ = self.distiller(self.images, self.targets, self.ignore)
            else:
                loss, _ = self.model.loss(self.model(self.images), self.targets, self.ignore)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def timed(self, steps: int) -> float:
        """Seconds for `steps` steps (synchronised on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover
        return float("nan")


def benchmark_train_step(model: nn.Module, batch: Any, distiller: Distiller | None = None,
                         steps: int = 10, warmup: int = 2, device: str | torch.device = "auto",
                         lr: float = 1e-3, amp: bool = False, rounds: int = 1) -> dict[str, float]:
    """Images/s and peak memory of full training steps (forward, loss, backward, AdamW step).

    With `distiller` the step is a KD step (teacher forward + taps + adapters + KD terms). The
    fastest of `rounds` timings of `steps` steps is reported. Peak memory: CUDA
    ``max_memory_allocated`` during the timed steps; on CPU the process's peak RSS (a
    high-water mark over the whole process).
    """
    device = resolve_device(device)
    run = _StepRunner(model, batch, distiller, device, lr, amp)
    for _ in range(max(warmup, 0)):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dt = min(run.timed(steps) for _ in range(max(rounds, 1)))
    n = int(run.images.shape[0]) * steps
    return {"images_per_s": n / dt, "step_ms": 1000.0 * dt / steps, "peak_memory_mb": _peak_memory_mb(device),
            "batch_size": int(run.images.shape[0]), "steps": steps}


def benchmark_train(teacher: nn.Module, student: nn.Module, batch: Any, terms: Sequence[Any],
                    steps: int = 10, warmup: int = 2, device: str | torch.device = "auto",
                    amp: bool = False, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Teacher step, plain student step and KD student step, plus ``kd_overhead`` =
    KD step time / plain student step time (the issue's goal: at most 1.4).

    The three modes are timed in interleaved rounds (fastest round kept), so a machine whose
    load drifts affects them alike. Peak memory is measured per mode on CUDA; on CPU it is the
    process's RSS high-water mark.
    """
    device = resolve_device(device)
    s_kd = copy.deepcopy(student)
    runners = {
        "teacher": _StepRunner(copy.deepcopy(teacher), batch, None, device, 1e-3, amp),
        "student": _StepRunner(copy.deepcopy(student), batch, None, device, 1e-3, amp),
        "kd": _StepRunner(s_kd, batch, Distiller(copy.deepcopy(teacher), s_kd, list(terms)), device, 1e-3, amp),
    }
    best = {k: math.inf for k in runners}
    peak = {k: float("nan") for k in runners}
    for name, run in runners.items():
        for _ in range(max(warmup, 0)):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
        peak[name] = _peak_memory_mb(device)
    for _ in range(max(rounds, 1)):
        for name, run in runners.items():
            best[name] = min(best[name], run.timed(steps))
    out: dict[str, dict[str, float]] = {}
    for name, run in runners.items():
        bs = int(run.images.shape[0])
        out[name] = {"images_per_s": bs * steps / best[name], "step_ms": 1000.0 * best[name] / steps,
                     "peak_memory_mb": peak[name], "batch_size": bs, "steps": steps}
    out["kd_overhead"] = {"ratio": out["kd"]["step_ms"] / out["student"]["step_ms"]}
    return out


# --------------------------------------------------------------------------------------------
# KITTI evaluation hook
# --------------------------------------------------------------------------------------------
def flatten_kitti_result(result: Any) -> dict[str, float]:
    """``{"Car/moderate/R40": AP, ..., "mAP/moderate/R40": mean}`` from a `KittiEvalResult`."""
    out: dict[str, float] = {}
    kinds: set[str] = set()
    diffs: list[str] = []
    for cls, by_kind in result.ap.items():
        for kind, by_diff in by_kind.items():
            kinds.add(kind)
            for diff, v in by_diff.items():
                out[f"{cls}/{diff}/{kind}"] = float(v)
                if diff not in diffs:
                    diffs.append(diff)
    for kind in sorted(kinds):
        for diff in diffs:
            vals = [out[f"{c}/{diff}/{kind}"] for c in result.ap if f"{c}/{diff}/{kind}" in out]
            if vals:
                out[f"mAP/{diff}/{kind}"] = sum(vals) / len(vals)
    return out


@torch.no_grad()
def iter_kitti_predictions(model: nn.Module, loader: Iterable, class_names: Sequence[str],
                           conf_thres: float = 0.005, iou_thres: float = 0.45, max_det: int = 300,
                           progress: bool = False) -> Iterator[tuple[str, Any]]:
    """Predict every batch of `loader` and yield ``(image_id, FrameLabels)`` with the boxes mapped
    back from the letterbox to original image pixels (``Batch.meta``) and clipped to the image:
    the detections the KITTI evaluator and the result-file writer consume."""
    from tqdm.auto import tqdm

    from kd_bnn.data.transforms import letterbox_to_original
    from kd_bnn.eval.kitti import detections_to_frame
    from kd_bnn.models.detector import Detections

    device = next(model.parameters()).device
    for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
        images, _, _, meta = unpack_batch(batch)
        if len(meta) != images.shape[0]:
            raise ValueError("KITTI evaluation needs Batch.meta (image_id, orig_size, scale, pad) per image")
        preds = model.predict(model(images.to(device)), conf_thres=conf_thres, iou_thres=iou_thres,
                              max_det=max_det)
        for det, m in zip(preds, meta):
            boxes = letterbox_to_original(det.boxes.detach().float().cpu(), m)
            det_orig = Detections(torch.as_tensor(boxes, dtype=torch.float32), det.scores.detach().float().cpu(),
                                  det.labels.detach().cpu())
            yield str(m["image_id"]), detections_to_frame(det_orig, list(class_names), tuple(m["orig_size"]))


def make_kitti_evaluate_fn(val_loader: Iterable, class_names: Sequence[str], conf_thres: float = 0.005,
                           iou_thres: float = 0.45, max_det: int = 300, gt: dict | None = None
                           ) -> Callable[[nn.Module], tuple[dict[str, float], Any]]:
    """An ``evaluate_fn`` for `Trainer`: predict on `val_loader`, map boxes back to the original
    images (``Batch.meta``), and score with the official KITTI protocol.

    Args:
        val_loader: loader of `Batch`es whose meta has ``image_id``, ``orig_size``, ``scale``, ``pad``.
        class_names: the model's classes, in label order.
        gt: {image_id: FrameLabels} in original pixels; default: the loader's dataset
            (``dataset.ids`` / ``dataset.frame_labels(i)``).

    Returns:
        ``fn(model) -> (flat metrics, KittiEvalResult)``.
    """
    from kd_bnn.eval.kitti import evaluate_kitti

    if gt is None:
        ds = getattr(val_loader, "dataset", None)
        if ds is None or not hasattr(ds, "frame_labels") or not hasattr(ds, "ids"):
            raise ValueError("make_kitti_evaluate_fn: pass gt= or a loader over a KittiDataset")
        gt = {ds.ids[i]: ds.frame_labels(i) for i in range(len(ds))}
    gt_frames = gt

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[dict[str, float], Any]:
        dets = dict(iter_kitti_predictions(model, val_loader, class_names, conf_thres, iou_thres, max_det))
        result = evaluate_kitti(gt_frames, dets, list(class_names))
        return flatten_kitti_result(result), result

    return evaluate
