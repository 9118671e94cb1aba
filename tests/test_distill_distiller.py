"""Distiller: frozen teacher, gradients, adapters, logged parts, mimic loss going down."""

from __future__ import annotations

import copy

import pytest
import torch
from test_distill_fakes import TinyDetector, fixed_batch

from kd_bnn.config import DistillTermConfig
from kd_bnn.distill import Distiller, TapError


def _pair(sw=4, tw=8):
    torch.manual_seed(0)
    return TinyDetector(width=tw), TinyDetector(width=sw)


def test_distiller_gradients_and_parts():
    teacher, student = _pair()
    terms = [DistillTermConfig(loss="mimic_l2", weight=2.0, teacher="s4"),
             DistillTermConfig(loss="cwd", teacher="s2", student="backbone.0"),
             DistillTermConfig(loss="attention", teacher="s4"),
             DistillTermConfig(loss="mimic_masked", teacher="s4"),
             {"loss": "output_kd", "weight": 0.5}]
    d = Distiller(teacher, student, terms)
    d.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert len(d.trainable_parameters()) > 0  # 1x1 conv + BN adapters (4 -> 8 channels)
    images, targets, ignore = fixed_batch()
    raw, total, parts = d(images, targets, ignore)
    assert set(parts) == {"det/box", "det/obj", "det/cls", "kd/mimic_l2@s4", "kd/cwd@backbone.0->s2",
                          "kd/attention@s4", "kd/mimic_masked@s4", "kd/output_kd"}
    assert float(total.detach()) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-5)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.trainable_parameters())


def test_mimic_loss_decreases_on_fixed_batch():
    teacher, student = _pair()
    d = Distiller(teacher, student, [DistillTermConfig(loss="mimic_l2", teacher="s4")], det_weight=0.0)
    params = list(student.parameters()) + d.trainable_parameters()
    opt = torch.optim.Adam(params, lr=1e-2)
    images, targets, ignore = fixed_batch()
    d.train()
    values = []
    for _ in range(25):
        _, total, parts = d(images, targets, ignore)
        opt.zero_grad()
        total.backward()
        opt.step()
        values.append(float(parts["kd/mimic_l2@s4"]))
    assert values[-1] < 0.6 * values[0], values


def test_teacher_frozen_and_bn_stats_unchanged():
    teacher, student = _pair(8, 8)
    rm = teacher.backbone[0][1].running_mean.clone()
    d = Distiller(teacher, student, [DistillTermConfig(loss="mimic_l2", teacher="s4")])
    d.train()
    images, targets, ignore = fixed_batch()
    d(images, targets, ignore)[1].backward()
    assert torch.equal(teacher.backbone[0][1].running_mean, rm)
    assert len(d.trainable_parameters()) == 0  # same shapes: identity adapter


def test_errors():
    teacher, student = _pair()
    with pytest.raises(TapError, match="backbone.1"):
        Distiller(teacher, student, [DistillTermConfig(loss="mimic_l2", teacher="backbone.l")])
    with pytest.raises(KeyError, match="mimic_l2"):
        Distiller(teacher, student, [DistillTermConfig(loss="mimic_12", teacher="s4")])
    other = TinyDetector(num_classes=3)
    with pytest.raises(ValueError, match="different classes"):
        Distiller(teacher, other, [])


def test_lazy_adapters_and_deepcopy_of_student():
    teacher, student = _pair()
    d = Distiller(teacher, student, [DistillTermConfig(loss="mimic_l2", teacher="s4")], probe=False)
    assert len(d.trainable_parameters()) == 0
    images, targets, ignore = fixed_batch()
    d(images, targets, ignore)
    assert len(d.trainable_parameters()) > 0
    ema = copy.deepcopy(student)  # taps attached: the copy must be independent
    ema(images)
    d(images, targets, ignore)
