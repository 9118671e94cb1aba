"""Trainer + Distiller on the real Darknet demo model and its binarized student (small input)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from kd_bnn.config import BinaryConfig, DistillTermConfig, StageConfig, TrainConfig
from kd_bnn.distill import Distiller
from kd_bnn.engine import Trainer, load_checkpoint

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


def test_distill_darknet_bwn_student(tmp_path):
    torch.manual_seed(0)
    teacher = models.build_detector("darknet", cfg="yolov2-demo", class_names=CLASSES, input_size=SIZE)
    policy = BinaryConfig(stages=[StageConfig(layers=["layers.2*", "layers.4*"], epoch=1)])
    student, report = binary.binarize(copy.deepcopy(teacher), policy)
    terms = [DistillTermConfig(loss="mimic_l2", teacher="stride16"),
             DistillTermConfig(loss="attention", teacher="stride32"),
             DistillTermConfig(loss="output_kd", weight=0.5)]
    d = Distiller(teacher, student, terms)
    cfg = TrainConfig(epochs=2, optimizer="adamw", lr=1e-3, warmup_epochs=0.5, ema=True, amp=False,
                      grad_clip=10.0)
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
