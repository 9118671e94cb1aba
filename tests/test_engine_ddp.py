"""DDP on CPU: 2 processes, gloo backend; both ranks must end with identical weights."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from test_distill_fakes import ShapesDataset, TinyDetector, collate
    from torch.utils.data import DataLoader, DistributedSampler

    from kd_bnn.config import DistillTermConfig, TrainConfig
    from kd_bnn.distill import Distiller
    from kd_bnn.engine import Trainer, init_distributed

    try:
        assert init_distributed("gloo") == (rank, world)
        torch.manual_seed(rank)  # different inits per rank: DDP must broadcast rank 0's weights
        teacher = TinyDetector(width=8)
        student = TinyDetector(width=4)
        d = Distiller(teacher, student, [DistillTermConfig(loss="mimic_l2", teacher="s4")])
        ds = ShapesDataset(8)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
        cfg = TrainConfig(epochs=2, optimizer="sgd", lr=0.05, warmup_epochs=0, amp=False, ema=False,
                          sync_bn=True)
        t = Trainer(student, loader, None, cfg, run_dir=out_dir, distiller=d, device="cpu", plots=False,
                    progress=False, console=False)
        t.fit()
        state = {f"model.{k}": v for k, v in t.model.state_dict().items()}
        state.update({f"adapter.{k}": v for k, v in d.adapters.state_dict().items()})
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_identical_weights(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "last.pt").is_file()  # written by rank 0 only
    assert not any(p.name.startswith("rank1") and p.suffix == ".log" for p in tmp_path.iterdir())
