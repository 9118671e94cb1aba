"""Batching: the `Batch` every room consumes, a seeded `DataLoader`, and config -> datasets.

Targets follow docs/architecture.md ("The Detector contract"): one (N, 6) tensor per batch, rows (image_index, class, x1, y1, x2, y2)
in input pixels, plus per-image ignore (DontCare) regions.

Unreadable images met during a run (`KittiDataset` replaces such a frame by the next readable one
and marks the sample's ``meta["skipped"]``) are reported by the loader from the main process:
one warning per file, and after a whole evaluation pass (a loader without shuffling) one
warning with the number of frames skipped, since those frames got no predictions of their own.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kd_bnn.config import DataConfig
from kd_bnn.data.dataset import KittiDataset, how_to_get_kitti, warn_once
from kd_bnn.data.transforms import eval_transforms, train_transforms


@dataclass
class Batch:
    """A batch of letterboxed images and their targets.

    Attributes:
        images: (B, 3, H, W) float32 in [0, 1].
        targets: (N, 6) float32 rows (image_index, class, x1, y1, x2, y2) in input pixels.
        ignore: B tensors (M_i, 4) float32 of DontCare regions x1y1x2y2 in input pixels.
        meta: B dicts (image_id, orig_size, scale, pad, flipped) for `letterbox_to_original`.
    """

    images: torch.Tensor
    targets: torch.Tensor
    ignore: list[torch.Tensor]
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device` (meta stays on the host)."""
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.targets.to(device, non_blocking=non_blocking),
                     [t.to(device, non_blocking=non_blocking) for t in self.ignore], self.meta)

    def pin_memory(self) -> Batch:
        """Page-locked copy (called by `DataLoader(pin_memory=True)`)."""
        return Batch(self.images.pin_memory(), self.targets.pin_memory(),
                     [t.pin_memory() for t in self.ignore], self.meta)


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None, list]:
    """(images, targets, ignore, meta) of a `Batch` or an (images, targets [, ignore [, meta]])
    tuple: the batch protocol the trainer, the evaluation and the plots consume."""
    if hasattr(batch, "images") and hasattr(batch, "targets"):
        return batch.images, batch.targets, getattr(batch, "ignore", None), list(getattr(batch, "meta", []) or [])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        ignore = batch[2] if len(batch) > 2 else None
        meta = list(batch[3]) if len(batch) > 3 else []
        return batch[0], batch[1], ignore, meta
    raise TypeError(f"a batch must be a Batch or (images, targets[, ignore]) tuple, found {type(batch).__name__}")


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Stack dataset samples into a `Batch` (all images must share one size: letterbox them)."""
    if not samples:
        raise ValueError("collate: expected at least one sample, found none")
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"collate: images of different sizes {sorted(sizes)}; "
                         f"use a letterbox transform (eval_transforms/train_transforms)")
    rows = []
    for i, s in enumerate(samples):
        boxes, labels = s["boxes"], s["labels"]
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"collate: sample {i} has {boxes.shape[0]} boxes but {labels.shape[0]} labels")
        idx = torch.full((boxes.shape[0], 1), float(i))
        rows.append(torch.cat([idx, labels.to(torch.float32).view(-1, 1), boxes.to(torch.float32)], 1))
    return Batch(images=torch.stack([s["image"] for s in samples]),
                 targets=torch.cat(rows, 0) if rows else torch.zeros((0, 6)),
                 ignore=[s["ignore"].to(torch.float32).reshape(-1, 4) for s in samples],
                 meta=[s["meta"] for s in samples])


def _base_dataset(ds: Dataset) -> Dataset:
    while hasattr(ds, "dataset") and not hasattr(ds, "transforms"):  # Subset, ConcatDataset parts
        ds = ds.dataset
    return ds


def _seed_transforms(ds: Dataset, seed: int) -> None:
    t = getattr(_base_dataset(ds), "transforms", None)
    if t is not None and hasattr(t, "set_seed"):
        t.set_seed(seed)


class KittiLoader(DataLoader):
    """A `DataLoader` that reports the frames its dataset skipped (unreadable images).

    Each sample whose ``meta`` has ``skipped`` makes the main-process dataset record the bad
    frame (`KittiDataset.note_bad_image`: one warning naming the file; later epochs' workers
    then skip it without decoding it again). With ``evaluation=True``, a completed pass that
    skipped frames ends with one warning giving their count and ids (repeated only when the set
    of skipped frames changes).
    """

    def __init__(self, *args: Any, evaluation: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evaluation = bool(evaluation)

    def __iter__(self):
        return self._reporting(super().__iter__())

    def _reporting(self, batches):
        base = _base_dataset(self.dataset)
        note = getattr(base, "note_bad_image", None)
        skipped: dict[str, dict[str, Any]] = {}
        frames = 0
        for batch in batches:
            meta = getattr(batch, "meta", None) or ()
            frames += len(meta)
            for m in meta:
                rec = m.get("skipped") if isinstance(m, dict) else None
                if rec:
                    skipped.setdefault(str(rec["image_id"]), rec)
                    if note is not None:
                        note(int(rec["index"]), str(rec["reason"]))
            yield batch
        if self.evaluation and skipped:
            ids = sorted(skipped)
            shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
            warn_once(f"evaluation pass: {len(ids)} of {frames} frames skipped because their image cannot be "
                       f"decoded ({shown}): they have no predictions of their own, so their ground-truth "
                       f"objects are not scored as they should be; fix or replace e.g. "
                       f"{skipped[ids[0]]['path']}", stacklevel=2, all_ranks=True)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


_WORKER_NOTES: set[tuple[int, int]] = set()


def loader_workers(requested: int) -> int:
    """The loader processes to start for ``data.workers = requested``: at most the CPUs this
    process may use, shared among the processes of a torchrun node (``LOCAL_WORLD_SIZE``), less
    one left to the training process itself (0: load in the main process). ``workers`` is an
    upper bound, so one config runs on a laptop and on a 64-core server; when it is lowered,
    one line says so (once per process and value, on rank 0)."""
    if requested <= 0:
        return 0
    try:
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        local = 1
    cpus = available_cpus()
    per_rank = max(cpus // local, 1)
    used = min(requested, per_rank - 1)
    if used < requested and (requested, used) not in _WORKER_NOTES:
        _WORKER_NOTES.add((requested, used))
        if os.environ.get("RANK", "0") in ("", "0"):
            shared = f", shared by {local} processes of this node" if local > 1 else ""
            print(f"data.workers={requested}: using {used} loader process(es) ({cpus} CPU(s) available"
                  f"{shared}; one is left to the training process)", file=sys.stderr, flush=True)
    return used


def _seed_worker(worker_id: int) -> None:
    """Worker init: distinct, reproducible seeds per worker and epoch (from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _seed_transforms(info.dataset, seed)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                 distributed: bool = False, drop_last: bool | None = None,
                 pin_memory: bool = False) -> DataLoader:
    """A reproducible `DataLoader` of `Batch`es.

    Args:
        dataset: e.g. a `KittiDataset`.
        batch_size: images per batch (per process when distributed).
        shuffle: shuffle each epoch (training); also the default of `drop_last`.
        workers: at most this many loader processes (`loader_workers`: no more than the
            machine's CPUs allow); 0 loads in the main process.
        seed: seeds the shuffling generator, the workers and the dataset's transforms (in the
            main process when `workers` is 0; from the generator, per epoch, in each worker).
        distributed: use a `DistributedSampler` (call `loader.sampler.set_epoch(epoch)` each
            epoch): each of the W ranks gets ``ceil(N / W)`` of the N samples (the sampler
            repeats a few to even the shards), so ``len(loader)`` per rank is
            ``ceil(N / W) // batch_size`` with `drop_last` (training), else
            ``ceil(ceil(N / W) / batch_size)``. The shuffling is the sampler's (seed, epoch);
            the generator that seeds the workers' augmentation is seeded per rank.
        drop_last: drop the last incomplete batch; default `shuffle` (training), and never when
            that would leave no batch at all.
        pin_memory: page-locked batches for faster host-to-GPU copies.

    Returns:
        a `KittiLoader`: frames skipped for an unreadable image are reported from the main
        process, and a loader without shuffling (evaluation) warns with their count per pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, found {batch_size}")
    if workers < 0:
        raise ValueError(f"workers: expected >= 0, found {workers}")
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed initialised first")
        rank, world = dist.get_rank(), dist.get_world_size()
    if drop_last is None:
        drop_last = shuffle
    if drop_last and -(-len(dataset) // world) < batch_size:
        drop_last = False  # a split smaller than one batch would otherwise yield nothing
    workers = loader_workers(workers)
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)
    if workers == 0:
        _seed_transforms(dataset, seed + 1_000_003 * rank)
    elif hasattr(_base_dataset(dataset), "report_skips_in_loader"):
        _base_dataset(dataset).report_skips_in_loader = True  # workers leave the warning to us
    sampler = None
    if distributed:
        # drop_last=False: the shards are padded to ceil(N / W) samples each, so every sample is
        # used each epoch; the loader below drops the last incomplete batch of a shard
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                     seed=seed, drop_last=False)
    return KittiLoader(
        dataset, evaluation=not shuffle, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers, collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
        worker_init_fn=_seed_worker if workers > 0 else None, generator=generator,
        # fresh workers each epoch: their seeds come from `generator`, so a run resumed with the
        # generator's saved state replays the same augmentation
        persistent_workers=False,
    )


def build_datasets(data_cfg: DataConfig) -> tuple[KittiDataset, KittiDataset]:
    """(train, val) datasets of a `DataConfig`: train augmentation on train, letterbox on val.

    Does not generate synthetic data: a missing `data_cfg.root` raises a `FileNotFoundError`
    that explains how to get KITTI or make the synthetic set.
    """
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(how_to_get_kitti(root))
    common = dict(classes=data_cfg.classes, merge=data_cfg.merge, max_images=data_cfg.max_images,
                  cache_images=data_cfg.cache_images)
    train = KittiDataset(root, data_cfg.train_split,
                         transforms=train_transforms(data_cfg.input_size, data_cfg.augment), **common)
    val = KittiDataset(root, data_cfg.val_split, transforms=eval_transforms(data_cfg.input_size), **common)
    return train, val
