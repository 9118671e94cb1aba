"""YOLOv2 / YOLOv3 heads (decode, loss), NMS and k-means anchors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from toolload import load_tool
from torchvision.ops import box_iou

from kd_bnn.models.anchors import anchors_from_kitti, kmeans_anchors, mean_best_iou, shape_iou
from kd_bnn.models.heads import RegionHead, YoloHead, heads_loss, postprocess, predict_heads

KITTI = Path(__file__).resolve().parents[1].parent / "shared" / "kitti"


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------------- decode


def test_region_decode_hand_made_map():
    # 2 anchors in grid cells, 2 classes, stride 32, 2x3 map -> input 64x96.
    head = RegionHead([[1.0, 1.0], [2.0, 3.0]], num_classes=2, stride=32)
    raw = torch.zeros(1, 2 * 7, 2, 3)
    # anchor 1 (channels 7..13), cell y=1, x=2
    raw[0, 7 + 0, 1, 2] = logit(0.25)  # tx
    raw[0, 7 + 1, 1, 2] = logit(0.75)  # ty
    raw[0, 7 + 2, 1, 2] = math.log(1.5)  # tw
    raw[0, 7 + 3, 1, 2] = math.log(0.5)  # th
    raw[0, 7 + 4, 1, 2] = logit(0.9)  # objectness
    raw[0, 7 + 5, 1, 2] = math.log(3.0)  # class 0 logit; class 1 logit 0 -> softmax 0.75 / 0.25
    boxes, obj, cls = head.decode(raw, (64, 96))
    assert boxes.shape == (1, 12, 4) and obj.shape == (1, 12) and cls.shape == (1, 12, 2)
    n = (1 * 2 + 1) * 3 + 2  # (a * H + y) * W + x
    cx, cy, w, h = (2 + 0.25) * 32, (1 + 0.75) * 32, 2 * 32 * 1.5, 3 * 32 * 0.5
    torch.testing.assert_close(boxes[0, n], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(obj[0, n], torch.tensor(0.9))
    torch.testing.assert_close(cls[0, n], torch.tensor([0.75, 0.25]))
    # an untouched prediction: anchor 0, cell (0, 0): centre (16, 16), size 32x32, obj 0.5
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.0, 0.0, 32.0, 32.0]))
    torch.testing.assert_close(obj[0, 0], torch.tensor(0.5))


def test_yolo_decode_hand_made_map():
    anchors = [[10, 14], [23, 27], [37, 58], [81, 82]]
    head = YoloHead(anchors, mask=[2, 3], num_classes=3, stride=16)
    raw = torch.zeros(2, 2 * 8, 4, 4)
    # image 1, local anchor 0 (= anchor 2: 37x58), cell y=3, x=1
    raw[1, 0, 3, 1] = logit(0.5)
    raw[1, 1, 3, 1] = logit(0.2)
    raw[1, 2, 3, 1] = math.log(2.0)
    raw[1, 3, 3, 1] = 0.0
    raw[1, 4, 3, 1] = logit(0.6)
    raw[1, 5:8, 3, 1] = torch.tensor([logit(0.9), logit(0.1), logit(0.7)])
    boxes, obj, cls = head.decode(raw, (64, 64))
    n = (0 * 4 + 3) * 4 + 1
    cx, cy, w, h = 1.5 * 16, 3.2 * 16, 74.0, 58.0
    torch.testing.assert_close(boxes[1, n], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(obj[1, n], torch.tensor(0.6))
    torch.testing.assert_close(cls[1, n], torch.tensor([0.9, 0.1, 0.7]))  # independent sigmoids


def test_decode_rejects_bad_maps():
    head = RegionHead([[1, 1]], 3, 32)
    with pytest.raises(ValueError, match="8"):
        head.decode(torch.zeros(1, 9, 2, 2))
    with pytest.raises(ValueError, match="input_size"):
        head.decode(torch.zeros(1, 8, 2, 2), (64, 96))


# ------------------------------------------------------------------------------------ loss


def reference_region_loss(head: RegionHead, raw: torch.Tensor, targets: torch.Tensor, ignore, in_hw):
    """Plain-loop YOLOv2 loss: the same definition written one prediction / truth at a time."""
    bsz, _, gh, gw = raw.shape
    na, nc = head.num_anchors, head.num_classes
    stride = in_hw[0] / gh
    p = raw.view(bsz, na, 5 + nc, gh, gw)
    anchors = head.anchors_px
    sig = torch.sigmoid

    def pbox(b, a, y, x):
        cx = (x + sig(p[b, a, 0, y, x])) * stride
        cy = (y + sig(p[b, a, 1, y, x])) * stride
        w = torch.exp(p[b, a, 2, y, x]) * anchors[a, 0]
        h = torch.exp(p[b, a, 3, y, x]) * anchors[a, 1]
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

    pos = {}
    for row in targets:
        b, c, x1, y1, x2, y2 = row.tolist()
        w, h = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        best, best_a = -1.0, 0
        for a in range(na):
            aw, ah = anchors[a].tolist()
            iou = min(w, aw) * min(h, ah) / (w * h + aw * ah - min(w, aw) * min(h, ah))
            if iou > best:
                best, best_a = iou, a
        pos[(int(b), best_a, int(cy // stride), int(cx // stride))] = (int(c), x1, y1, x2, y2)
    box_l = obj_l = cls_l = 0.0
    for b in range(bsz):
        gts = targets[targets[:, 0] == b, 2:]
        for a in range(na):
            for y in range(gh):
                for x in range(gw):
                    to = sig(p[b, a, 4, y, x])
                    key = (b, a, y, x)
                    bx = pbox(b, a, y, x).detach()
                    if key in pos:
                        c, x1, y1, x2, y2 = pos[key]
                        w, h = x2 - x1, y2 - y1
                        scale = 2 - (w / in_hw[1]) * (h / in_hw[0])
                        tx, ty = (x1 + x2) / 2 / stride - x, (y1 + y2) / 2 / stride - y
                        tw, th = math.log(w / anchors[a, 0]), math.log(h / anchors[a, 1])
                        box_l = box_l + scale * ((sig(p[b, a, 0, y, x]) - tx) ** 2 + (sig(p[b, a, 1, y, x]) - ty) ** 2
                                                 + (p[b, a, 2, y, x] - tw) ** 2 + (p[b, a, 3, y, x] - th) ** 2)
                        target = box_iou(bx[None], torch.tensor([[x1, y1, x2, y2]]))[0, 0] if head.rescore else 1.0
                        obj_l = obj_l + head.object_scale * (to - target) ** 2
                        cls_l = cls_l - torch.log_softmax(p[b, a, 5:, y, x], 0)[c]
                        continue
                    if len(gts) and box_iou(bx[None], gts).max() > head.ignore_thresh:
                        continue
                    if ignore is not None and len(ignore[b]):
                        dc = ignore[b]
                        lt = torch.maximum(bx[:2], dc[:, :2])
                        rb = torch.minimum(bx[2:], dc[:, 2:])
                        inter = (rb - lt).clamp(min=0).prod(1)
                        area = (bx[2] - bx[0]) * (bx[3] - bx[1])
                        if (inter / area).max() > head.dontcare_thresh:
                            continue
                    obj_l = obj_l + head.noobject_scale * to ** 2
    return box_l / bsz, obj_l / bsz, cls_l / bsz


@pytest.mark.parametrize("rescore", [True, False])
def test_region_loss_matches_plain_loop_reference(rescore):
    torch.manual_seed(0)
    head = RegionHead([[0.6, 0.5], [1.4, 0.8], [1.0, 2.2]], num_classes=3, stride=32, rescore=rescore,
                      ignore_thresh=0.3)
    raw = torch.randn(2, 3 * 8, 3, 5) * 0.7
    targets = torch.tensor([[0, 0, 10.0, 20.0, 60.0, 50.0],
                            [0, 2, 100.0, 10.0, 125.0, 80.0],
                            [0, 1, 12.0, 22.0, 58.0, 49.0],  # same cell & anchor as row 0: it wins
                            [1, 1, 30.0, 40.0, 150.0, 90.0]])
    ignore = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 40.0, 40.0]])]
    total, parts = head.loss(raw, targets, ignore, (96, 160))
    box_r, obj_r, cls_r = reference_region_loss(head, raw, targets, ignore, (96, 160))
    torch.testing.assert_close(parts["box"], box_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["obj"], obj_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts["cls"], cls_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, box_r + obj_r + cls_r, rtol=1e-5, atol=1e-5)


def _fit(heads, raws, targets, ignore, in_hw, steps=40, lr=0.1):
    params = [torch.nn.Parameter(r.clone()) for r in raws]
    opt = torch.optim.Adam(params, lr=lr)
    first = None
    for _ in range(steps):
        total, _ = heads_loss(heads, params, targets, ignore, in_hw)
        first = float(total.detach()) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    return first, float(heads_loss(heads, params, targets, ignore, in_hw)[0].detach()), params


def test_region_loss_decreases_and_fit_decodes_to_targets():
    torch.manual_seed(0)
    head = RegionHead([[0.7, 0.7], [2.0, 1.5]], num_classes=2, stride=32)
    targets = torch.tensor([[0, 0, 8.0, 10.0, 40.0, 50.0], [0, 1, 70.0, 20.0, 150.0, 64.0]])
    first, last, params = _fit([head], [torch.randn(1, 14, 2, 5) * 0.1], targets, None, (64, 160), steps=150)
    assert last < 0.2 * first
    dets = predict_heads([head], [params[0].detach()], (64, 160), conf_thres=0.3)[0]
    assert len(dets) == 2
    iou = box_iou(dets.boxes, targets[:, 2:])
    assert (iou.max(dim=0).values > 0.8).all()
    assert sorted(dets.labels.tolist()) == [0, 1]


def test_yolo_loss_decreases_over_two_scales():
    torch.manual_seed(0)
    anchors = [[10, 14], [23, 27], [37, 58], [81, 82], [135, 169], [200, 100]]
    heads = [YoloHead(anchors, [3, 4, 5], 3, 32), YoloHead(anchors, [0, 1, 2], 3, 16)]
    targets = torch.tensor([[0, 0, 8.0, 10.0, 30.0, 40.0], [0, 2, 20.0, 5.0, 110.0, 90.0],
                            [1, 1, 50.0, 30.0, 70.0, 60.0]])
    raws = [torch.randn(2, 24, 3, 4) * 0.1, torch.randn(2, 24, 6, 8) * 0.1]
    first, last, _ = _fit(heads, raws, targets, None, (96, 128))
    assert last < 0.5 * first


def test_yolo_head_only_trains_truths_of_its_mask():
    anchors = [[10, 14], [23, 27], [37, 58], [81, 82], [135, 169], [200, 100]]
    small, large = YoloHead(anchors, [0, 1, 2], 2, 16), YoloHead(anchors, [3, 4, 5], 2, 32)
    raw_s, raw_l = torch.zeros(1, 21, 6, 8), torch.zeros(1, 21, 3, 4)
    big = torch.tensor([[0, 1, 0.0, 0.0, 120.0, 90.0]])  # best anchor 4 or 5 -> the large head
    _, ps = small.loss(raw_s, big, None, (96, 128))
    _, pl = large.loss(raw_l, big, None, (96, 128))
    assert float(ps["box"]) == 0.0 and float(ps["cls"]) == 0.0
    assert float(pl["box"]) > 0.0 and float(pl["cls"]) > 0.0


def _obj_grad(head, raw, targets, ignore, index):
    raw = raw.clone().requires_grad_(True)
    total, _ = head.loss(raw, targets, ignore, (64, 96))
    total.backward()
    return raw.grad[index]


@pytest.mark.parametrize("make_head", [
    lambda: RegionHead([[1.0, 1.0]], 2, 32),
    lambda: YoloHead([[32, 32]], [0], 2, 32),
])
def test_dontcare_region_is_not_negative(make_head):
    head = make_head()
    raw = torch.zeros(1, 7, 2, 3)  # every prediction: 32x32 box centred in its cell
    obj_index = (0, 4, 0, 1)  # prediction of cell (y=0, x=1): box (32, 0, 64, 32)
    targets = torch.tensor([[0, 1, 70.0, 36.0, 90.0, 60.0]])  # elsewhere (cell y=1, x=2)
    dontcare = [torch.tensor([[30.0, 0.0, 66.0, 34.0]])]
    losses = []
    for to in (-3.0, 0.0, 3.0):
        r = raw.clone()
        r[obj_index] = to
        losses.append(float(head.loss(r, targets, dontcare, (64, 96))[0]))
    assert losses[0] == pytest.approx(losses[1]) and losses[1] == pytest.approx(losses[2])
    assert float(_obj_grad(head, raw, targets, dontcare, obj_index)) == 0.0
    # control: without the DontCare box the same prediction is a negative
    assert float(_obj_grad(head, raw, targets, None, obj_index)) > 0.0
    # a DontCare box covering less than half of the prediction does not protect it
    small_dc = [torch.tensor([[30.0, 0.0, 44.0, 34.0]])]
    assert float(_obj_grad(head, raw, targets, small_dc, obj_index)) > 0.0


def test_ignore_threshold_spares_good_unassigned_predictions():
    head = RegionHead([[1.0, 1.0], [1.1, 1.1]], 2, 32, ignore_thresh=0.6)
    raw = torch.zeros(1, 14, 2, 3)
    targets = torch.tensor([[0, 0, 33.0, 1.0, 63.0, 31.0]])  # cell (0, 1); best anchor 0 (IoU shape)
    g = torch.zeros_like(raw).requires_grad_(True)
    total, _ = head.loss(raw + g, targets, None, (64, 96))
    total.backward()
    # anchor 1 in the same cell overlaps the truth with IoU ~0.74 > 0.6: neither positive nor negative
    assert float(g.grad[0, 7 + 4, 0, 1]) == 0.0
    # anchor 1 in another cell is a negative
    assert float(g.grad[0, 7 + 4, 1, 2]) > 0.0


def test_loss_without_targets_and_bad_targets():
    head = RegionHead([[1.0, 1.0]], 2, 32)
    raw = torch.zeros(2, 7, 2, 2, requires_grad=True)
    total, parts = head.loss(raw, torch.zeros(0, 6), None, (64, 64))
    total.backward()
    assert float(parts["box"].detach()) == 0.0 and float(parts["obj"].detach()) == pytest.approx(8 * 0.25 / 2)
    with pytest.raises(ValueError, match="image_index"):
        head.loss(raw, torch.tensor([[2, 0, 0.0, 0.0, 10.0, 10.0]]), None, (64, 64))
    with pytest.raises(ValueError, match="class"):
        head.loss(raw, torch.tensor([[0, 5, 0.0, 0.0, 10.0, 10.0]]), None, (64, 64))
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        head.loss(raw, torch.zeros(3, 5), None, (64, 64))


# ------------------------------------------------------------------------------------- NMS


def test_postprocess_nms_threshold_clip_and_labels():
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0],
                           [12.0, 12.0, 52.0, 52.0],   # overlaps box 0 (IoU ~0.82)
                           [100.0, 10.0, 140.0, 50.0],
                           [-20.0, 30.0, 30.0, 90.0]]])  # sticks out of the 64x128 input
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.5, 0.0]]])
    obj = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    dets = postprocess(boxes, probs, obj, conf_thres=0.2, iou_thres=0.5, input_size=(64, 128))[0]
    got = sorted(zip(dets.labels.tolist(), [round(s, 4) for s in dets.scores.tolist()]))
    # class 0: box 0 (0.9) suppresses box 1 (0.8); box 3 scores 0.25. class 1: box 1 (0.7), box 2 (0.6)
    assert got == [(0, 0.25), (0, 0.9), (1, 0.6), (1, 0.7)]
    assert dets.scores.tolist() == sorted(dets.scores.tolist(), reverse=True)
    assert float(dets.boxes[:, 0].min()) >= 0 and float(dets.boxes[:, 3].max()) <= 64
    single = postprocess(boxes, probs, obj, conf_thres=0.2, iou_thres=0.5, input_size=(64, 128),
                         multi_label=False)[0]
    assert sorted(single.labels.tolist()) == [0, 0, 1]
    top = postprocess(boxes, probs, obj, conf_thres=0.2, iou_thres=0.5, max_det=2)[0]
    assert top.scores.tolist() == pytest.approx([0.9, 0.7])
    none = postprocess(boxes, probs, obj, conf_thres=0.95)[0]
    assert len(none) == 0 and none.boxes.shape == (0, 4)


# --------------------------------------------------------------------------------- anchors


def test_kmeans_recovers_toy_clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[10.0, 30.0], [40.0, 20.0], [120.0, 80.0]])
    wh = np.concatenate([c * rng.uniform(0.95, 1.05, size=(200, 2)) for c in centres])
    anchors = kmeans_anchors(wh, 3, seed=0)
    np.testing.assert_allclose(anchors, centres[np.argsort(centres.prod(1))], rtol=0.03)
    assert mean_best_iou(wh, anchors) > 0.9
    # more anchors never fit worse, random anchors fit worse
    assert mean_best_iou(wh, kmeans_anchors(wh, 5, seed=0)) >= mean_best_iou(wh, anchors) - 1e-9
    assert mean_best_iou(wh, wh[rng.choice(len(wh), 3)]) <= mean_best_iou(wh, anchors) + 1e-9
    with pytest.raises(ValueError, match="at least"):
        kmeans_anchors(wh[:2], 3)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        kmeans_anchors(np.zeros(5), 2)


def test_shape_iou_against_hand_values():
    iou = shape_iou(np.array([[2.0, 2.0]]), np.array([[2.0, 2.0], [1.0, 4.0], [4.0, 4.0]]))
    np.testing.assert_allclose(iou[0], [1.0, 2 / 6, 4 / 16])


@pytest.mark.skipif(not (KITTI / "sample" / "training" / "label_2").is_dir(),
                    reason="shared KITTI sample not found at ../shared/kitti")
def test_anchors_from_kitti_sample_and_cli(capsys):

    labels = KITTI / "sample" / "training" / "label_2"
    a1, miou = anchors_from_kitti(labels, input_size=(192, 640), k=2)
    a2, miou2 = anchors_from_kitti(labels, input_size=(384, 1280), k=2)
    np.testing.assert_allclose(a2, 2 * a1, rtol=1e-6)  # letterbox scale, same clusters
    assert miou == pytest.approx(miou2) and 0 < miou <= 1
    cli = load_tool("anchors")
    assert cli.main(["--labels", str(labels), "--k", "2", "--input-size", "192x640", "--grid-units", "32"]) == 0
    out = capsys.readouterr().out
    assert "pixels" in out and "grid/32" in out and "mean IoU" in out


def test_kitti_default_anchors_rescale():
    from kd_bnn.models.anchors import KITTI_ANCHORS_384x1248, kitti_default_anchors

    np.testing.assert_allclose(kitti_default_anchors((384, 1248), 5), np.asarray(KITTI_ANCHORS_384x1248[5]))
    half = kitti_default_anchors((192, 640), 6) / np.asarray(KITTI_ANCHORS_384x1248[6])
    np.testing.assert_allclose(half, (192 / 375) / (1248 / 1242))  # letterbox factors of the two inputs
    with pytest.raises(ValueError, match="k=4"):
        kitti_default_anchors((384, 1248), 4)


@pytest.mark.slow
@pytest.mark.skipif(not (KITTI / "labels_trainval" / "label_2").is_dir(),
                    reason="shared KITTI labels not found at ../shared/kitti/labels_trainval")
def test_precomputed_kitti_anchors_reproduce():
    from kd_bnn.models.anchors import KITTI_ANCHORS_384x1248

    for k in (5, 6):
        anchors, miou = anchors_from_kitti(KITTI / "labels_trainval" / "label_2", input_size=(384, 1248), k=k)
        np.testing.assert_allclose(anchors, np.asarray(KITTI_ANCHORS_384x1248[k]), atol=0.01)
        assert miou == pytest.approx({5: 0.6297, 6: 0.6582}[k], abs=1e-4)
