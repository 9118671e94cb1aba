"""Each distillation loss against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from kd_bnn.distill import DISTILL_LOSSES, DistillContext, boxes_to_mask
from kd_bnn.distill.losses import OutputKD


@pytest.mark.parametrize("name", DISTILL_LOSSES.list())
def test_every_loss_has_paper_and_is_zero_at_match(name):
    cls = DISTILL_LOSSES.get(name)
    assert "References" in (cls.__doc__ or "")
    loss = cls()
    x = torch.randn(2, 7, 4, 4)
    targets = torch.tensor([[0, 0, 0.0, 0.0, 8.0, 8.0]])
    ctx = DistillContext(targets=targets, image_size=(16, 16))
    s = x.clone().requires_grad_(True)
    v = loss(s, x, ctx)
    if name == "output_kd":  # soft BCE at a match equals the teacher's entropy: gradient 0
        v.backward()
        assert s.grad.abs().max() < 1e-6
    else:
        assert float(v.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x + 0.5 * torch.randn_like(x), x, ctx)) > 0


def test_mimic_l2_by_hand():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]])
    assert float(DISTILL_LOSSES.build("mimic_l2")(s, t)) == pytest.approx((1 + 4) / 4)
    # normalize: per map standardisation, so a scaled + shifted map matches exactly
    assert float(DISTILL_LOSSES.build("mimic_l2", normalize=True)(s, 3 * s + 1)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="adapter"):
        DISTILL_LOSSES.build("mimic_l2")(s, torch.zeros(1, 2, 2, 2))


def test_boxes_to_mask_and_masked_mimic_by_hand():
    # image 16x16, map 4x4 (stride 4); box x 4..12, y 0..5 covers cols 1,2 and rows 0,1
    targets = torch.tensor([[1, 0, 4.0, 0.0, 12.0, 5.0]])
    m = boxes_to_mask(targets, 2, (4, 4), (16, 16))
    assert m[0].sum() == 0
    assert m[1, 0].nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert boxes_to_mask(targets, 2, (4, 4), (16, 16), expand=1)[1].sum() == 12
    s = torch.zeros(2, 2, 4, 4)
    t = torch.zeros(2, 2, 4, 4)
    t[1, :, 0, 1] = 2.0  # inside the box: error 4 on 2 channels
    t[0, :, 3, 3] = 10.0  # outside any box: ignored
    ctx = DistillContext(targets=targets, image_size=(16, 16))
    loss = DISTILL_LOSSES.build("mimic_masked")(s, t, ctx)
    assert float(loss) == pytest.approx(2 * 4.0 / (4 * 2))
    # no objects -> zero, with a graph
    s.requires_grad_(True)
    z = DISTILL_LOSSES.build("mimic_masked")(s, t, DistillContext(targets=torch.zeros(0, 6), image_size=(16, 16)))
    assert float(z.detach()) == 0.0
    z.backward()


def test_attention_by_hand():
    s = torch.zeros(1, 2, 1, 2)
    s[0, 0, 0, 0] = 1.0  # Q_s = [1, 0]
    t = torch.ones(1, 3, 1, 2)  # Q_t = [3, 3] -> [1, 1]/sqrt2
    expected = (1 - 1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2)) ** 2
    assert float(DISTILL_LOSSES.build("attention")(s, t)) == pytest.approx(expected)


def test_cwd_by_hand():
    T = 2.0
    s = torch.tensor([[[[0.0, 2.0]]]])
    t = torch.tensor([[[[2.0, 0.0]]]])
    ps = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    pt = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = float((pt * (pt.log() - ps.log())).sum())
    assert float(DISTILL_LOSSES.build("cwd", temperature=T)(s, t)) == pytest.approx(kl * T * T, rel=1e-5)


def test_output_kd_layout_by_hand():
    T = 1.0

    def layout(raw):
        return {"obj": raw[..., 0], "cls": raw[..., 1:3], "box": raw[..., 3:7]}

    s = torch.zeros(1, 1, 7)
    t = torch.zeros(1, 1, 7)
    t[..., 0] = 2.0
    t[..., 1] = 1.0
    s[..., 3:7] = torch.tensor([0.0, 0.0, 12.0, 10.0])  # student box: off by 2 in x2
    t[..., 3:7] = torch.tensor([0.0, 0.0, 10.0, 11.0])  # teacher box: off by 1 in y2
    targets = torch.tensor([[0, 0, 0.0, 0.0, 10.0, 10.0]])
    loss = OutputKD(temperature=T, layout=layout)
    ctx = DistillContext(targets=targets)
    p = torch.sigmoid(torch.tensor(2.0))
    obj = -(p * math.log(0.5) + (1 - p) * math.log(0.5))
    pt = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = float((pt * (pt.log() - math.log(0.5))).sum())
    box = (2 / 10) ** 2  # student error 0.04 > teacher error 0.01: active
    assert float(loss(s, t, ctx)) == pytest.approx(float(obj) + kl + box, rel=1e-5)
    # student better than the teacher (+ margin 0): box term switched off
    s2 = s.clone()
    s2[..., 3:7] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    assert float(loss(s2, t, ctx)) == pytest.approx(float(obj) + kl, rel=1e-5)


def test_output_kd_raw_needs_same_shapes():
    with pytest.raises(ValueError, match="layout"):
        OutputKD()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 5, 2, 2), DistillContext())


def test_mimic_masked_teacher_confident_cells():
    from torch import nn

    from kd_bnn.models.heads import AnchorHeadsMixin

    class Head(nn.Module):  # one anchor, no classes: raw (B, 5, H, W)
        def split(self, raw):
            return raw.view(raw.shape[0], 1, 5, *raw.shape[-2:]).permute(0, 1, 3, 4, 2)

    class Teacher(AnchorHeadsMixin, nn.Module):  # the Detector hook: objectness_maps from anchor heads
        def anchor_heads(self):
            return [Head()]

    raw = torch.full((1, 5, 2, 2), -10.0)
    raw[0, 4, 1, 1] = 10.0  # confident at cell (1, 1) of a 2x2 head map
    s = torch.zeros(1, 1, 4, 4)
    t = torch.ones(1, 1, 4, 4)
    ctx = DistillContext(targets=torch.zeros(0, 6), image_size=(16, 16), teacher_model=Teacher(),
                         extra={"teacher_raw": [raw]})
    assert float(DISTILL_LOSSES.build("mimic_masked")(s, t, ctx)) == 0.0  # no GT, no confidence
    loss = DISTILL_LOSSES.build("mimic_masked", teacher_conf=0.5)
    assert float(loss(s, t, ctx)) == pytest.approx(1.0)  # error 1 on the 4 upsampled cells
    from kd_bnn.distill.losses import teacher_confidence_mask

    m = teacher_confidence_mask(Teacher(), [raw], (4, 4), 0.5)
    assert m[0, 0].nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
