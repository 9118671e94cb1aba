"""Trainer: LR schedule, param groups, exact resume, NaN stop, config mismatch, Ctrl-C, run files."""

from __future__ import annotations

import math

import pytest
import torch
from test_distill_fakes import TinyDetector, make_loader

from kd_bnn.config import DistillTermConfig, TrainConfig
from kd_bnn.distill import Distiller
from kd_bnn.engine import (
    CheckpointError,
    LRSchedule,
    NonFiniteLossError,
    Trainer,
    load_checkpoint,
    param_groups,
)


def _cfg(**kw):
    base = dict(epochs=4, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, warmup_epochs=1.0,
                scheduler="cosine", grad_clip=5.0, ema=True, ema_decay=0.9, amp=False, eval_interval=1,
                best_metric="score")
    base.update(kw)
    return TrainConfig(**base)


def _make(tmp, cfg, distill=True, seed=0, gen_seed=123, **kw):
    torch.manual_seed(1000)
    teacher = TinyDetector(width=8)  # the teacher comes from its own weights, not the checkpoint
    torch.manual_seed(seed)
    student = TinyDetector(width=4)
    distiller = None
    if distill:
        distiller = Distiller(teacher, student, [DistillTermConfig(loss="mimic_l2", teacher="s4")])
    kw.setdefault("plots", False)
    kw.setdefault("progress", False)
    kw.setdefault("console", False)
    return Trainer(student, make_loader(8, 4, gen_seed=gen_seed), make_loader(4, 4, shuffle=False), cfg,
                   run_dir=tmp, distiller=distiller, device="cpu", **kw)


def _eval_fn(model):
    return {"score": -float(sum(p.float().abs().sum() for p in model.parameters()))}


def test_lr_schedule_values():
    s = LRSchedule(_cfg(epochs=3, warmup_epochs=1.0), iters_per_epoch=4, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(12) == pytest.approx(0.1)
    st = LRSchedule(_cfg(epochs=4, warmup_epochs=0, scheduler="step", step_milestones=[1, 3], step_gamma=0.5), 2)
    assert [st(i) for i in range(8)] == [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    c = LRSchedule(_cfg(epochs=2, warmup_epochs=0.5, scheduler="constant"), 4)
    assert [c(i) for i in range(8)] == [0.5, 1, 1, 1, 1, 1, 1, 1]


def test_param_groups_no_decay_for_bn_bias_scales():
    m = TinyDetector()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    assert id(m.backbone[0][0].weight) in decay_ids and id(m.head.weight) in decay_ids
    assert id(m.backbone[0][1].weight) not in decay_ids and id(m.head.bias) not in decay_ids
    assert groups["no_decay"]["weight_decay"] == 0.0
    try:
        from kd_bnn.binary.layers import BinaryConv2d
    except ImportError:
        return
    bc = BinaryConv2d(4, 4, 3, weight_scaling="learned")
    g = {x["name"]: x for x in param_groups(bc, 0.1)}
    assert any(p is bc.scale for p in g["no_decay"]["params"])
    assert any(p is bc.weight for p in g["decay"]["params"])


def _weights(trainer):
    sd = dict(trainer.model.state_dict())
    sd.update({f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()})
    sd.update({f"adapter.{k}": v for k, v in trainer.distiller.adapters.state_dict().items()})
    return sd


def test_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    full = _make(tmp_path / "full", cfg, evaluate_fn=_eval_fn)
    assert full.fit()["status"] == "completed"

    def stop_after_epoch_2(event, tr):
        if event == "epoch_end" and tr.epoch == 2:
            raise KeyboardInterrupt

    part = _make(tmp_path / "part", cfg, evaluate_fn=_eval_fn, callbacks=[stop_after_epoch_2])
    assert part.fit()["status"] == "interrupted"
    assert part.epoch == 2
    # a fresh process: different init and loader generator, everything comes from last.pt
    resumed = _make(tmp_path / "part", cfg, evaluate_fn=_eval_fn, seed=99, gen_seed=7,
                    resume=tmp_path / "part" / "last.pt")
    assert resumed.epoch == 2
    out = resumed.fit()
    assert out["status"] == "completed" and resumed.iteration == full.iteration == 8
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.best_metric == resumed.best_metric
    # weights-only checkpoints with everything needed
    ck = load_checkpoint(tmp_path / "full" / "last.pt")
    assert {"model", "optimizer", "ema", "rng", "config", "epoch", "iteration", "best_metric"} <= set(ck)
    assert (tmp_path / "full" / "best.pt").is_file()
    text = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    assert len(text) == 5 and text[0].startswith("epoch,")  # 4 epochs, rows kept across resume


def test_events_in_order_and_optimizer_step_before_the_ema(tmp_path):
    from kd_bnn.engine import EVENTS, BinaryCallback

    seen = []

    def record(event, tr):
        seen.append((event, tr.iteration, tr.ema.updates))

    t = _make(tmp_path, _cfg(epochs=1), callbacks=[record])  # 2 steps
    assert isinstance(t.callbacks[0], BinaryCallback) and t.callbacks[1] is record
    t.fit()
    assert [e for e, _, _ in seen] == ["train_start", "epoch_start", "optimizer_step", "step_end",
                                       "optimizer_step", "step_end", "epoch_end", "train_end"]
    assert set(EVENTS) == {e for e, _, _ in seen}
    # after the optimizer step the iteration is not counted and the EMA not updated yet; after the step both are
    assert [(i, u) for e, i, u in seen if e == "optimizer_step"] == [(0, 0), (1, 1)]
    assert [(i, u) for e, i, u in seen if e == "step_end"] == [(1, 1), (2, 2)]


def test_resume_with_other_config_lists_keys(tmp_path):
    t = _make(tmp_path, _cfg(epochs=1, ema=False), distill=False)
    t.fit()
    with pytest.raises(CheckpointError) as exc:
        _make(tmp_path, _cfg(epochs=1, ema=False, lr=0.1, momentum=0.8), distill=False, resume=tmp_path / "last.pt")
    msg = str(exc.value)
    assert "lr" in msg and "momentum" in msg and "epochs" not in msg


def test_nan_stops_naming_term_and_keeps_checkpoint(tmp_path):
    t = _make(tmp_path, _cfg(epochs=3, ema=False), evaluate_fn=_eval_fn)

    def poison(event, tr):
        if event == "epoch_end" and tr.epoch == 1:
            with torch.no_grad():
                tr.model.backbone[1][0].weight.fill_(float("nan"))

    t.callbacks.append(poison)
    with pytest.raises(NonFiniteLossError, match="kd/mimic_l2@s4"):
        t.fit()
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert "non-finite" in (tmp_path / "train.log").read_text()
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match="backbone.1.0.weight"):
        t.save("last.pt")  # a diverged model never overwrites the last good checkpoint
    assert (tmp_path / "last.pt").read_bytes() == before


def test_ctrl_c_mid_epoch_saves_and_exits(tmp_path):
    def interrupt(event, tr):
        if event == "step_end" and tr.iteration == 3:
            raise KeyboardInterrupt

    t = _make(tmp_path, _cfg(epochs=2), callbacks=[interrupt])
    out = t.fit()
    assert out["status"] == "interrupted"
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["iteration"] == 3 and ck["epoch"] == 1 and ck["epoch_complete"] is False
    for k, v in t.model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    r = _make(tmp_path, _cfg(epochs=2), resume=tmp_path / "last.pt")
    assert r.fit()["status"] == "completed" and r.epoch == 2


def test_run_folder_files_and_plots(tmp_path):
    t = _make(tmp_path, _cfg(epochs=2, ema=False, eval_interval=2), evaluate_fn=_eval_fn, plots=True)
    t.fit()
    for name in ("config.yaml", "train.log", "metrics.csv", "last.pt", "best.pt", "loss_curves.png",
                 "val_batch.png"):
        assert (tmp_path / name).is_file(), name
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"epoch", "lr", "loss", "det/box", "kd/mimic_l2@s4", "score"} <= set(header)
    assert rows[1].split(",")[header.index("score")] == ""  # no eval in epoch 1


def test_best_metric_missing_is_an_error(tmp_path):
    t = _make(tmp_path, _cfg(epochs=1, best_metric="Car/moderate/R40"), distill=False, evaluate_fn=_eval_fn)
    with pytest.raises(KeyError, match="score"):
        t.fit()


def test_resume_ignore_and_eval_state(tmp_path):
    from kd_bnn.engine import eval_state_dict

    t = _make(tmp_path, _cfg(epochs=1), distill=False)
    t.fit()
    r = _make(tmp_path, _cfg(epochs=2), distill=False, resume=tmp_path / "last.pt", resume_ignore=["epochs"])
    assert r.fit()["status"] == "completed" and r.epoch == 2
    ck = load_checkpoint(tmp_path / "last.pt")
    assert eval_state_dict(ck) is ck["ema"]["state"]
    assert eval_state_dict(ck, prefer_ema=False) is ck["model"]


def test_benchmark_train_step_reports():
    from test_distill_fakes import fixed_batch

    from kd_bnn.engine import benchmark_train

    torch.manual_seed(0)
    out = benchmark_train(TinyDetector(width=8), TinyDetector(width=4), fixed_batch(),
                          [DistillTermConfig(loss="mimic_l2", teacher="s4")], steps=2, warmup=1, device="cpu")
    assert set(out) == {"teacher", "student", "kd", "kd_overhead"}
    assert out["kd"]["images_per_s"] > 0 and out["kd_overhead"]["ratio"] > 0
