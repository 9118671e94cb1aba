"""Training-speed benchmarks (``tools/benchmark.py train``).

Times full training steps (forward, loss, backward, optimizer step): of one model
(`benchmark_train_step`), and of the teacher, the binary student alone and the student trained
with knowledge transfer (teacher forward, taps, adapters and the distillation terms) on one
batch (`benchmark_train`; of a config: `train_benchmark`), and reports images/s, peak memory
and the KD/student step-time ratio (the goal: a KD step costs at most 1.4x a plain student step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_bnn.config import ExperimentConfig
from kd_bnn.data.loader import Batch, build_datasets, build_loader, unpack_batch
from kd_bnn.distill.distiller import Distiller
from kd_bnn.distill.taps import unwrap_model
from kd_bnn.engine.build import build_model, build_student, ensure_dataset, seed_everything
from kd_bnn.engine.distributed import resolve_device
from kd_bnn.engine.preflight import check_dataset

KD_OVERHEAD_GOAL = 1.4


# --------------------------------------------------------------------------------------------
# Training steps
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
# A config's teacher, student and KD student
# --------------------------------------------------------------------------------------------


def random_batch(batch_size: int, input_size: tuple[int, int], num_classes: int, boxes_per_image: int = 4,
                 seed: int = 0) -> Batch:
    """A `Batch` of uniform-noise images with random boxes (no dataset needed; the step time of
    these detectors does not depend on the image content)."""
    if batch_size < 1:
        raise ValueError(f"batch size: expected >= 1, found {batch_size}")
    g = torch.Generator().manual_seed(seed)
    h, w = input_size
    images = torch.rand(batch_size, 3, h, w, generator=g)
    rows = []
    for i in range(batch_size):
        wh = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w / 3, h / 2]) + 8
        xy = torch.rand(boxes_per_image, 2, generator=g) * (torch.tensor([w, h]) - wh)
        cls = torch.randint(0, num_classes, (boxes_per_image, 1), generator=g).float()
        rows.append(torch.cat([torch.full((boxes_per_image, 1), float(i)), cls, xy, xy + wh], 1))
    meta = [{"image_id": f"{i:06d}", "orig_size": (h, w), "scale": 1.0, "pad": (0.0, 0.0), "flipped": False}
            for i in range(batch_size)]
    return Batch(images, torch.cat(rows, 0), [torch.zeros(0, 4) for _ in range(batch_size)], meta)


def dataset_batch(cfg: ExperimentConfig, batch_size: int) -> Batch:
    """The first training batch of the config's dataset (augmented as in training); the
    synthetic set is generated first when ``data.synthetic`` asks for it."""
    check_dataset(cfg)
    ensure_dataset(cfg.data)
    train_ds, _ = build_datasets(cfg.data)
    if len(train_ds) < batch_size:
        raise ValueError(f"batch size {batch_size}: the training split has only {len(train_ds)} frames")
    loader = build_loader(train_ds, batch_size, shuffle=True, workers=0, seed=cfg.seed)
    return next(iter(loader))


def train_benchmark(cfg: ExperimentConfig, batch_size: int | None = None, steps: int = 10, warmup: int = 2,
                    rounds: int = 3, device: str | None = None, random_data: bool = False) -> dict[str, Any]:
    """Teacher, student and KD-student training steps of `cfg` on one batch.

    Returns:
        ``{"teacher"|"student"|"kd": {images_per_s, step_ms, peak_memory_mb, batch_size, steps},
        "kd_overhead": {"ratio", "goal", "meets_goal"}, "config", "device", "input_size",
        "terms", "data"}``.

    Raises:
        ValueError: a config without a student section or without distillation terms.
        FileNotFoundError: missing dataset (unless `random_data`).
    """
    if cfg.student is None:
        raise ValueError(f"{cfg.name}: the train benchmark needs a config with a 'student' section "
                         "(teacher, student and KD steps are compared)")
    if not cfg.distill.terms:
        raise ValueError(f"{cfg.name}: distill.terms is empty: there is no KD step to time")
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"steps and rounds must be >= 1 and warmup >= 0, found {steps}, {rounds}, {warmup}")
    bs = int(batch_size or cfg.data.batch_size)
    size = tuple(cfg.data.input_size)
    seed_everything(cfg.seed)
    batch = (random_batch(bs, size, len(cfg.data.classes), seed=cfg.seed) if random_data
             else dataset_batch(cfg, bs))
    teacher = build_model(cfg.teacher, list(cfg.data.classes), size, load_weights=False)
    student, _ = build_student(teacher, cfg, init_weights=False)
    dev = resolve_device(device if device is not None else cfg.device)
    amp = bool(cfg.train.amp and dev.type == "cuda")
    res: dict[str, Any] = benchmark_train(teacher, student, batch, list(cfg.distill.terms), steps=steps,
                                          warmup=warmup, device=dev, amp=amp, rounds=rounds)
    ratio = float(res["kd_overhead"]["ratio"])
    res["kd_overhead"].update({"goal": KD_OVERHEAD_GOAL, "meets_goal": bool(ratio <= KD_OVERHEAD_GOAL)})
    res.update({"config": cfg.name, "device": str(dev), "amp": amp, "input_size": list(size),
                "terms": [f"{t.loss}@{t.student or t.teacher}" if t.teacher or t.student else t.loss
                          for t in cfg.distill.terms],
                "data": "random" if random_data else str(cfg.data.root),
                "threads": torch.get_num_threads()})
    return res


def format_train_benchmark(res: dict[str, Any]) -> str:
    """The benchmark as a text table."""
    h, w = res["input_size"]
    mem_note = ("CUDA max_memory_allocated per mode" if res["device"].startswith("cuda")
                else "process peak RSS (a high-water mark: it includes the modes timed before)")
    head = f"{'mode':<10}{'images/s':>10}{'step ms':>10}{'peak MB':>10}"
    lines = [f"train benchmark: {res['config']} on {res['device']}{' (AMP)' if res['amp'] else ''}, "
             f"batch {res['student']['batch_size']} x {h}x{w}, {res['student']['steps']} steps, "
             f"{res['threads']} threads, data: {res['data']}",
             f"KD terms: {', '.join(res['terms'])}", head, "-" * len(head)]
    for mode, label in (("teacher", "teacher"), ("student", "student"), ("kd", "KD")):
        r = res[mode]
        lines.append(f"{label:<10}{r['images_per_s']:>10.2f}{r['step_ms']:>10.1f}{_mb(r['peak_memory_mb']):>10}")
    k = res["kd_overhead"]
    verdict = "meets" if k["meets_goal"] else "misses"
    lines.append(f"KD step / student step: {k['ratio']:.2f}x ({verdict} the goal <= {k['goal']:.1f}x)")
    lines.append(f"peak memory: {mem_note}")
    return "\n".join(lines)


def _mb(v: float) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.0f}"


__all__ = ["KD_OVERHEAD_GOAL", "benchmark_train", "benchmark_train_step", "dataset_batch", "format_train_benchmark",
           "random_batch", "train_benchmark"]
