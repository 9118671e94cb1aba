"""What a run leaves and says: ``best.pt`` holds weights + config + metrics only (``last.pt`` the
resume state), the summary ``tools/train.py`` ends with, the loader's worker count bounded by the
machine, and the distributed helpers outside torchrun."""

from __future__ import annotations

import os

import pytest
import torch
from test_distill_fakes import ShapesDataset, TinyDetector, make_loader
from torch import nn

from kd_bnn.config import TrainConfig
from kd_bnn.data import loader as loader_mod
from kd_bnn.engine import CheckpointError, Trainer, eval_state_dict, load_checkpoint
from kd_bnn.engine.distributed import (
    convert_sync_batchnorm,
    decide_on_rank0,
    dist_info,
    distributed_session,
    resolve_device,
)
from kd_bnn.engine.experiment import format_run_summary
from kd_bnn.engine.trainer import CHECKPOINT_FORMAT, WEIGHTS_FORMAT

RESUME_ONLY = {"optimizer", "scheduler", "scaler", "rng", "rng_ranks", "ema", "adapters", "iteration",
               "pending_eval", "epoch_complete"}


def _trainer(tmp, epochs=2, ema=True, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, optimizer="adamw", lr=0.01, warmup_epochs=0, amp=False, ema=ema,
                      ema_decay=0.9, best_metric="score")
    kw.setdefault("evaluate_fn", lambda m: {"score": 1.0})
    return Trainer(TinyDetector(width=4), make_loader(8, kw.pop("batch", 4)), make_loader(4, 4, shuffle=False),
                   cfg, run_dir=tmp, device="cpu", plots=False, progress=False, console=False, **kw)


# --------------------------------------------------------------------------------------------
# best.pt / last.pt
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ema", [True, False])
def test_best_pt_holds_the_evaluated_weights_config_and_metrics_only(tmp_path, ema):
    t = _trainer(tmp_path, ema=ema)
    t.fit()
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["format"] == WEIGHTS_FORMAT and last["format"] == CHECKPOINT_FORMAT
    assert not RESUME_ONLY & set(best)
    assert {"optimizer", "rng", "scheduler", "iteration"} <= set(last)
    assert best["weights"] == ("ema" if ema else "model")
    assert best["best_epoch"] == best["epoch"] == 1 and best["metrics"] == {"score": 1.0}
    assert best["config"] == last["config"] and best["class_names"] == last["class_names"]
    assert {"input_size", "binary_convs", "metric_name", "best_metric"} <= set(best)
    # what reads checkpoints gets the same weights from either (the EMA's when enabled)
    assert eval_state_dict(best).keys() == eval_state_dict(last).keys()
    model = TinyDetector(width=4)
    model.load_state_dict(eval_state_dict(best))
    assert (tmp_path / "best.pt").stat().st_size < (tmp_path / "last.pt").stat().st_size / (2 if ema else 1.5)


def test_resume_from_best_pt_is_refused_with_the_file_to_use(tmp_path):
    _trainer(tmp_path, epochs=1).fit()
    with pytest.raises(CheckpointError, match="weights only .*last.pt"):
        _trainer(tmp_path, epochs=1, resume=tmp_path / "best.pt")


def test_resume_with_other_iterations_per_epoch_continues_at_the_same_epoch(tmp_path):
    # e.g. a run continued with another number of GPUs: its iteration counter follows the epochs
    _trainer(tmp_path, epochs=1, batch=4).fit()  # 2 iterations per epoch
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 2
    t = _trainer(tmp_path, epochs=1, batch=2, resume=tmp_path / "last.pt", resume_ignore=["epochs"])
    assert t.iters_per_epoch == 4 and t.iteration == 4 and t.epoch == 1


# --------------------------------------------------------------------------------------------
# the summary of tools/train.py
# --------------------------------------------------------------------------------------------
def _metrics(car, ped, cyc):
    out = {}
    for c, v in (("Car", car), ("Pedestrian", ped), ("Cyclist", cyc)):
        out.update({f"{c}/moderate/R40": v, f"{c}/easy/R40": 99.0, f"{c}/moderate/R11": 98.0})
    out["mAP/moderate/R40"] = (car + ped + cyc) / 3
    return out


def test_run_summary_names_folder_phases_aps_checkpoints_and_results():
    results = {
        "name": "demo", "run_dir": "runs/demo", "world_size": 2,
        "teacher": {"checkpoint": "runs/demo/teacher/best.pt", "last_checkpoint": "runs/demo/teacher/last.pt",
                    "metrics": _metrics(61.2, 30.114, 12.4), "best_epoch": 20, "best_metric": 61.5,
                    "best_metric_name": "Car/moderate/R40", "epochs": 24, "iterations_per_epoch": 58,
                    "params": 1.0},
        "student": {"checkpoint": "runs/demo/best.pt", "last_checkpoint": "runs/demo/last.pt",
                    "metrics": _metrics(55.0, float("nan"), 9.87), "best_epoch": 10, "best_metric": 55.0,
                    "best_metric_name": "Car/moderate/R40", "epochs": 10, "iterations_per_epoch": 58,
                    "distilled": True},
        "interrupted": False,
    }
    assert format_run_summary(results).splitlines() == [
        "run folder: runs/demo (world size 2)",
        "teacher: 24 epoch(s), best epoch 20 (Car/moderate/R40 61.50), 58 it/epoch per rank",
        "  AP_R40 moderate, epoch 24: Car 61.20  Pedestrian 30.11  Cyclist 12.40",
        "  checkpoints: runs/demo/teacher/best.pt, runs/demo/teacher/last.pt (resume)",
        "student (distilled): 10 epoch(s), best epoch 10 (Car/moderate/R40 55.00), 58 it/epoch per rank",
        "  AP_R40 moderate, epoch 10: Car 55.00  Pedestrian n/a  Cyclist 9.87",
        "  checkpoints: runs/demo/best.pt, runs/demo/last.pt (resume)",
        "results: runs/demo/results.json",
    ]
    # one process, other classes, a teacher given by its weights (not trained here): not listed
    single = {"run_dir": "r", "teacher": {"params": 1.0},
              "student": {"checkpoint": "r/last.pt", "last_checkpoint": "r/last.pt", "epochs": 1,
                          "best_epoch": None, "metrics": {"Van/moderate/R40": 1.0, "mAP/moderate/R40": 1.0}}}
    assert format_run_summary(single).splitlines() == [
        "run folder: r", "student: 1 epoch(s)", "  AP_R40 moderate, epoch 1: Van 1.00",
        "  checkpoints: r/last.pt", f"results: {os.path.join('r', 'results.json')}"]


# --------------------------------------------------------------------------------------------
# loader workers
# --------------------------------------------------------------------------------------------
def test_workers_are_bounded_by_the_cpus_and_said_once(monkeypatch, capsys):
    monkeypatch.setattr(loader_mod, "_WORKER_NOTES", set())
    monkeypatch.setattr(loader_mod, "available_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ds = ShapesDataset(4)
    loaders = [loader_mod.build_loader(ds, 2, shuffle=False, workers=8) for _ in range(2)]
    assert [ld.num_workers for ld in loaders] == [1, 1]
    err = capsys.readouterr().err
    assert err.count("data.workers=8: using 1 loader process(es) (2 CPU(s) available; one is left") == 1
    assert loader_mod.build_loader(ds, 2, shuffle=False, workers=1).num_workers == 1  # within bounds
    assert loader_mod.build_loader(ds, 2, shuffle=False, workers=0).num_workers == 0
    assert capsys.readouterr().err == ""
    # torchrun: the node's CPUs are shared by its processes; only rank 0 says it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert loader_mod.loader_workers(8) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(loader_mod, "available_cpus", lambda: 16)
    assert loader_mod.loader_workers(8) == 7


# --------------------------------------------------------------------------------------------
# distributed helpers outside torchrun
# --------------------------------------------------------------------------------------------
def test_distributed_helpers_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_session("cpu") as info:
        assert info == (0, 1) == dist_info()
        assert decide_on_rank0(lambda: 3) == 3
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)  # a plain "cuda" means this rank's GPU
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_sync_batchnorm_keeps_the_taps_on_batchnorm_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = convert_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and len(model[1]._forward_hooks) == 1
    model.eval()(torch.zeros(1, 3, 8, 8))
    assert seen == [torch.Size([1, 4, 6, 6])]
