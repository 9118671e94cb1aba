"""One trainer for the teacher (detection loss only) and the student (with a `Distiller`).

The loop: per step the LR of the schedule (`kd_bnn.engine.optim`), forward and loss (AMP on
CUDA), a NaN / inf check, backward, gradient clipping, the optimizer step, the
``"optimizer_step"`` callbacks (binary training clips latent weights there:
`kd_bnn.engine.callbacks.BinaryCallback`), the EMA update (`kd_bnn.engine.ema`); per epoch
evaluation every ``eval_interval`` epochs, atomic weights-only checkpoints with exact resume,
and the log row; DDP under ``torchrun`` (`kd_bnn.engine.distributed`). What else runs in the
loop comes in as callbacks (events: `kd_bnn.engine.callbacks`).

Checkpoints: ``last.pt`` holds everything a resume needs (weights, optimizer, schedule, EMA,
RNG states of every rank, config, metrics); ``best.pt`` only the weights to use (the EMA's when
enabled), the config and the metrics (`Trainer.weights_state`).

Under DDP (a process group initialised, e.g. by `kd_bnn.engine.distributed.distributed_session`)
the model is wrapped in `DistributedDataParallel` (BatchNorm made synchronous with
``train.sync_bn`` on CUDA), a distillation teacher stays unwrapped (frozen, eval mode, rank 0's
weights broadcast to all), the training loader should shard with a `DistributedSampler`
(`kd_bnn.data.loader.build_loader(distributed=True)`); rank 0 alone evaluates (the whole
validation set, so the metrics equal a single-process evaluation), writes files and logs, and
gives its metrics to the other ranks; a resume reads the checkpoint on rank 0 and broadcasts it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kd_bnn.binary.layers import BinaryConv2d
from kd_bnn.config import TrainConfig
from kd_bnn.data.loader import unpack_batch
from kd_bnn.distill.distiller import Distiller
from kd_bnn.distill.taps import unwrap_model
from kd_bnn.engine.callbacks import BinaryCallback, Callback
from kd_bnn.engine.checkpoint import (
    CheckpointError,
    check_resume_config,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from kd_bnn.engine.distributed import (
    all_gather,
    any_rank,
    broadcast_module,
    convert_sync_batchnorm,
    decide_on_rank0,
    dist_info,
    resolve_device,
)
from kd_bnn.engine.ema import ModelEMA
from kd_bnn.engine.logging import RunLogger, is_tty
from kd_bnn.engine.optim import LRSchedule, build_optimizer, param_groups

CHECKPOINT_FORMAT = "kd_bnn.checkpoint/1"
#: ``best.pt``: weights, config and metrics only (no optimizer, schedule or RNG state)
WEIGHTS_FORMAT = "kd_bnn.weights/1"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stopped, the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------
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
class Trainer:
    """Train a Detector, optionally against a teacher through a `Distiller`.

    Args:
        model: the Detector to train (the student when `distiller` is given).
        train_loader, val_loader: loaders of `Batch`es (or (images, targets, ignore) tuples).
        cfg: the `TrainConfig` (optimizer, schedule, EMA, AMP, eval interval, best metric).
        run_dir: ``runs/<name>``: checkpoints, config.yaml, train.log, metrics.csv, plots.
        distiller: a `Distiller` whose student is `model`; its adapters are optimised too.
        binary_policy: a `BinaryConfig`: the trainer runs ``BinaryCallback(binary_policy)`` first
            (its stages applied at each epoch start, latent weights clipped after each optimizer
            step). Without it a ``BinaryCallback()`` still clips (a no-op on a float model),
            unless `callbacks` hold a `BinaryCallback` of their own.
        evaluate_fn: ``fn(model) -> {flat metric: value}`` (e.g. "Car/moderate/R40"), or
            ``(metrics, result)`` where `result` has ``precision`` / ``recall`` for PR plots
            (`kd_bnn.engine.evaluate.evaluate_model` returns both).
        device: "auto", "cpu", "cuda:0", ...
        config_dict: the resolved experiment config saved in checkpoints and config.yaml and
            compared on resume (default: ``cfg``'s dict).
        seed: base seed of the per-epoch augmentation reseeding.
        callbacks: ``fn(event, trainer)`` for events "train_start", "epoch_start",
            "optimizer_step", "step_end", "epoch_end", "train_end" (`kd_bnn.engine.callbacks`).
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
        >>> fn = functools.partial(evaluate_model, data=val_loader, gt=kitti_ground_truth(val_loader))
        >>> t = Trainer(student, train_loader, val_loader, cfg.train, "runs/demo", distiller=d,
        ...             binary_policy=cfg.student.binary, config_dict=config_to_dict(cfg), evaluate_fn=fn)
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
        self.evaluate_fn = evaluate_fn
        self.run_dir = Path(run_dir)
        self.config_dict = config_dict if config_dict is not None else self.cfg.model_dump(mode="json")
        self.seed = int(seed)
        self.callbacks: list[Callback] = list(callbacks)
        has_binary = any(isinstance(cb, BinaryCallback) for cb in self.callbacks)
        if binary_policy is not None and has_binary:
            raise ValueError("Trainer: pass binary_policy or a BinaryCallback in callbacks, not both")
        if not has_binary:
            self.callbacks.insert(0, BinaryCallback(binary_policy))
        self.progress = is_tty() if progress is None else bool(progress)
        self.plots = plots
        self.class_names = list(class_names or getattr(self.model, "class_names", []) or [])
        self.resume_ignore = tuple(resume_ignore)

        # DDP: SyncBN optional; the wrapper runs forward/backward, the Detector computes the loss
        self.ddp: nn.Module | None = None
        sync_bn_skipped = False
        if self.world > 1:
            if self.cfg.sync_bn and self.device.type == "cuda":
                self.model = convert_sync_batchnorm(self.model)  # keeps the distiller's taps
            elif self.cfg.sync_bn:
                sync_bn_skipped = True  # SyncBatchNorm needs CUDA; plain per-process BN on CPU
            ids = [self.device.index] if self.device.type == "cuda" else None
            # e.g. staged binarization leaves a disabled layer's learned scale unused in the forward
            unused = any(getattr(cb, "leaves_parameters_unused", False) for cb in self.callbacks)
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=unused)
        self.forward_model: nn.Module = self.ddp if self.ddp is not None else self.model
        if self.world > 1 and distiller is not None:
            # adapters live outside DDP: start them equal; the frozen teacher is not wrapped (no
            # gradients to reduce): every rank distils from rank 0's weights
            broadcast_module(distiller.adapters, distiller.teacher)
        sampler = getattr(train_loader, "sampler", None)
        unsharded = self.world > 1 and not isinstance(sampler, torch.utils.data.DistributedSampler)

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
        if unsharded:
            self.logger.warning(f"world size {self.world} but the training loader has no DistributedSampler: "
                                "every rank iterates the whole dataset (build_loader(distributed=True) shards it)")
        if resume is not None:
            self.resume(resume)

    # -- checkpoints ---------------------------------------------------------------------------
    def rng_state(self) -> dict[str, Any]:
        """This process's RNG states: torch, numpy, Python and the loaders' generators."""
        gens = _generators(self.train_loader)
        rng = get_rng_state(gens[0] if gens else None)
        if len(gens) > 1:
            rng["loader_extra"] = [g.get_state() for g in gens[1:]]
        vgens = _generators(self.val_loader) if self.val_loader is not None else []
        if vgens:
            rng["val_loader"] = [g.get_state() for g in vgens]
        return rng

    def state_dict(self, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything ``last.pt`` holds (weights-only types). `rng_ranks`: every rank's
        `rng_state` (DDP), stored beside this process's ``rng`` so each rank resumes its own."""
        rng = self.rng_state()
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
            "rng_ranks": list(rng_ranks or []),
            "world_size": self.world,
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

    def weights_state(self) -> dict[str, Any]:
        """What ``best.pt`` holds: the weights to evaluate and export (`eval_model`: the EMA's
        when enabled) as ``model``, the config and the metrics; no optimizer, schedule, RNG or
        adapter state (a resume reads ``last.pt``)."""
        return {
            "format": WEIGHTS_FORMAT,
            "model": self.eval_model().state_dict(),
            "weights": "ema" if self.ema is not None else "model",
            "epoch": self.epoch,
            "config": self.config_dict,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "metric_name": self.cfg.best_metric,
            "metrics": dict(self.last_metrics),
            "class_names": list(self.class_names),
            "input_size": list(getattr(self.model, "input_size", []) or []),
            "binary_convs": sum(isinstance(m, BinaryConv2d) for m in unwrap_model(self.model).modules()),
        }

    def save(self, name: str = "last.pt", collective: bool = True) -> Path | None:
        """Write a checkpoint into the run folder: ``best.pt`` = `weights_state`, any other name
        = `state_dict`. Rank 0 writes; under DDP every rank calls it (`collective`: with the
        other ranks, which give their RNG states; False where they may not, as after a Ctrl-C).
        Refuses non-finite weights, so the last good checkpoint is never overwritten by a
        diverged model."""
        if not (self.is_main or collective):
            return None
        bad = [k for k, v in self.model.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if any_rank(bool(bad), self.device) if (collective and self.world > 1) else bad:
            msg = (f"not saving {name}: non-finite weights in {', '.join(bad[:5]) or 'another rank'}"
                   f"{' ...' if len(bad) > 5 else ''}; the last good checkpoint is kept")
            self.logger.error(msg)
            raise NonFiniteLossError(msg)
        if name == "best.pt":
            return save_checkpoint(self.run_dir / name, self.weights_state()) if self.is_main else None
        ranks = all_gather(self.rng_state()) if (collective and self.world > 1) else None
        if not self.is_main:
            return None
        return save_checkpoint(self.run_dir / name, self.state_dict(ranks))

    def resume(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, schedule, EMA, epoch, iteration, RNG states from `path`.

        Raises:
            CheckpointError: unreadable file, or a config that differs (listing the keys).
        """
        # rank 0 reads it (the other ranks' nodes need not see the run folder) and gives it to all
        state = decide_on_rank0(lambda: load_checkpoint(path, map_location="cpu"), errors=(CheckpointError,))
        if state.get("format") == WEIGHTS_FORMAT:
            raise CheckpointError(f"{path}: holds weights only (a best.pt); resume from the run's last.pt")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a kd_bnn training checkpoint (format {state.get('format')!r})")
        check_resume_config(state.get("config"), self.config_dict, path, ignore=self.resume_ignore)
        if int(state.get("epoch", 0)) > self.cfg.epochs:
            raise CheckpointError(
                f"cannot resume from {path}: {int(state['epoch'])} epochs are done, more than the {self.cfg.epochs} "
                "now configured (train.epochs / teacher_train.epochs); resume with at least that many, or start a new run")
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
        saved_world = int(state.get("world_size", 1) or 1)
        saved_ipe = int((state.get("scheduler") or {}).get("iters_per_epoch") or self.iters_per_epoch)
        if saved_ipe != self.iters_per_epoch:  # another world size or batch: continue the schedule by epochs
            self.iteration = round(self.iteration * self.iters_per_epoch / saved_ipe)
            self.logger.warning(f"{path} was written with {saved_ipe} iterations per epoch (world size "
                                f"{saved_world}), now {self.iters_per_epoch} (world size {self.world}): the "
                                "schedule continues at the same epoch, but the run is not an exact continuation")
        rng = state["rng"]
        ranks = state.get("rng_ranks") or []
        if len(ranks) == self.world and saved_world == self.world:
            rng = ranks[self.rank]  # each rank its own stream
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
        self._event("optimizer_step")  # before the EMA: it averages the weights as callbacks leave them
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
        """Run `evaluate_fn` on the eval model (eval mode, no grad); flat metrics. Under DDP
        rank 0 evaluates (the whole validation set) and every rank gets its metrics."""
        if self.evaluate_fn is None:
            return {}
        return decide_on_rank0(self._evaluate_here)

    def _evaluate_here(self) -> dict[str, float]:
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

    def fit(self) -> dict[str, Any]:
        """Train from the current epoch to ``cfg.epochs``.

        Returns:
            {"status": "completed" | "interrupted" | "stopped", "epoch", "iteration", "best_metric",
            "best_epoch", "metrics", "run_dir", "world_size", "iterations_per_epoch" (per rank)}.

        Raises:
            NonFiniteLossError: a NaN/inf loss (the message names the term).
        """
        status = "completed"
        self._event("train_start")
        self.logger.info(f"training {type(self.model).__name__} for {self.cfg.epochs} epochs "
                         f"({self.iters_per_epoch} it/epoch{' per rank' if self.world > 1 else ''}) on {self.device}"
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
            self.save("last.pt", collective=False)  # the other ranks may be anywhere
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
                "metrics": dict(self.last_metrics), "run_dir": str(self.run_dir),
                "world_size": self.world, "iterations_per_epoch": self.iters_per_epoch}

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
