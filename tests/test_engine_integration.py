"""Trainer + Distiller on the real Darknet demo model and its binarized student (small input)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from kd_bnn.config import BinaryConfig, DistillTermConfig, StageConfig, TrainConfig
from kd_bnn.distill import Distiller
from kd_bnn.engine import BinaryCallback, Trainer, load_checkpoint

models = pytest.importorskip("kd_bnn.models")
binary = pytest.importorskip("kd_bnn.binary.convert")
layers = pytest.importorskip("kd_bnn.binary.layers")

CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (64, 128)


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        img = torch.rand(3, *SIZE, generator=g) * 0.3
        img[:, 16:48, 20 + 10 * i:60 + 10 * i] = 0.9
        items.append((img, torch.tensor([[0.0, 20.0 + 10 * i, 16.0, 60.0 + 10 * i, 48.0]])))

    def collate(batch):
        images = torch.stack([b[0] for b in batch])
        targets = torch.cat([torch.cat([torch.full((1, 1), float(j)), b[1]], 1) for j, b in enumerate(batch)])
        return images, targets, [torch.zeros(0, 4) for _ in batch]

    return DataLoader(items, batch_size=2, shuffle=True, collate_fn=collate,
                      generator=torch.Generator().manual_seed(1))


TERMS = [DistillTermConfig(loss="mimic_l2", teacher="stride16"),
         DistillTermConfig(loss="attention", teacher="stride32"),
         DistillTermConfig(loss="output_kd", weight=0.5)]
CFG = TrainConfig(epochs=2, optimizer="adamw", lr=1e-3, warmup_epochs=0.5, ema=True, amp=False, grad_clip=10.0)


def _teacher_student(policy):
    torch.manual_seed(0)
    teacher = models.build_detector("darknet", cfg="yolov2-demo", class_names=CLASSES, input_size=SIZE)
    student, report = binary.binarize(copy.deepcopy(teacher), policy)
    return teacher, student, report


def test_distill_darknet_bwn_student(tmp_path):
    policy = BinaryConfig(stages=[StageConfig(layers=["layers.2*", "layers.4*"], epoch=1)])
    teacher, student, report = _teacher_student(policy)
    d = Distiller(teacher, student, TERMS)
    cfg = CFG
    seen = []

    def watch(event, tr):
        if event == "epoch_start":
            seen.append(sum(m.enabled for m in layers.binary_convs(tr.model).values()))

    t = Trainer(student, _data(), None, cfg, run_dir=tmp_path, distiller=d, binary_policy=policy,
                device="cpu", progress=False, console=False, plots=False, callbacks=[watch])
    w0 = student.layers[6].conv.weight.detach().clone()
    out = t.fit()
    assert out["status"] == "completed"
    n_bin = len(report.converted)
    assert seen == [n_bin - 2, n_bin]  # staged: layers.2 and layers.4 turn binary at epoch 1
    assert not torch.equal(w0, student.layers[6].conv.weight)
    for m in layers.binary_convs(student).values():
        assert m.weight.abs().max() <= m.clip + 1e-6  # latent weights clipped after each step
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kd/mimic_l2@stride16", "kd/attention@stride32", "kd/output_kd", "det/box"} <= set(rows)
    ck = load_checkpoint(tmp_path / "last.pt")
    fresh, _ = binary.binarize(copy.deepcopy(teacher), policy)
    fresh.load_state_dict(ck["model"])
    assert t.ema is not None and len(t.ema.module.layers[6]._forward_hooks) == 0


def test_binary_callback_is_the_binary_policy(tmp_path):
    """``binary_policy=`` is only a shorthand for a `BinaryCallback` run first: same weights, bit for bit."""
    policy = BinaryConfig(stages=[StageConfig(layers=["layers.2*"], epoch=1)])
    out = []
    for run, kw in (("a", {"binary_policy": policy}), ("b", {"callbacks": [BinaryCallback(policy)]})):
        teacher, student, _ = _teacher_student(policy)
        d = Distiller(teacher, student, TERMS[:1])
        t = Trainer(student, _data(), None, CFG, run_dir=tmp_path / run, distiller=d, device="cpu",
                    progress=False, console=False, plots=False, **kw)
        t.fit()
        assert "epoch 2: " in (tmp_path / run / "train.log").read_text()  # the stage log line
        out.append({**t.model.state_dict(), **{f"ema.{k}": v for k, v in t.ema.module.state_dict().items()}})
    assert out[0].keys() == out[1].keys() and all(torch.equal(out[0][k], out[1][k]) for k in out[0])
    with pytest.raises(ValueError, match="not both"):
        Trainer(student, _data(), None, CFG, run_dir=tmp_path / "c", binary_policy=policy,
                callbacks=[BinaryCallback(policy)], device="cpu", console=False)
