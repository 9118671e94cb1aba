"""A tiny Darknet YOLOv2 trained from scratch overfits the six shared real KITTI frames.

Proof that real images, real labels, the letterbox, the targets, the region-head loss, the
decoding and the inverse letterbox agree end to end: after a short Adam run on the six frames
of ``../shared/kitti/sample`` the model finds nearly every Car / Pedestrian / Cyclist box at
IoU >= 0.5, measured in original image pixels against the label files.

Recall is counted directly (greedy one-to-one matching by IoU, class-aware) rather than with
KITTI AP: the devkit samples precision at 41 recall points but takes its score thresholds from
the true positives, so on eight objects AP is capped well below 1 even for a perfect detector.

Eligible ground truth: objects of type Car, Pedestrian or Cyclist (other types, including
DontCare, are not counted) whose box is at least ``MIN_HEIGHT_INPUT_PX`` = 6 pixels tall at
the network input (about 18 px in the original 375 px tall frames at this 128x416 letterbox,
scale 0.335): smaller than a fifth of a stride-32 cell, a box is below what this input can
represent. On the shared sample that keeps all 8 objects (the smallest is 20.7 px tall).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from kd_bnn.data import KittiDataset, eval_transforms, letterbox_to_original
from kd_bnn.data.loader import build_loader
from kd_bnn.models import build_detector

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti" / "sample"
CLASSES = ("Car", "Pedestrian", "Cyclist")
INPUT_SIZE = (128, 416)  # (h, w): multiples of the stride 32; KITTI frames letterbox at scale ~0.335
MIN_HEIGHT_INPUT_PX = 6.0  # eligible truth: at least this tall at the network input
IOU_MATCH = 0.5
PREDICT_CONF = 0.01  # predict() threshold (lower detections only feed the failure messages)
CONF = 0.3  # operating point: recall counts detections above it; at most 2x the truths above it
STEPS = 200  # 150 passed 12 of 12 seeds too, but with the worst truth at IoU 0.58
LR = 3e-3
SEED = 0

# Half-width yolov2-demo (configs/darknet/yolov2-demo.cfg): the same layer sequence (stride 32,
# passthrough reorg from stride 16, [region] with 5 anchors and 3 classes) at ~0.19 M parameters,
# so 200 full-batch steps take about 8-10 CPU seconds. Anchors: the demo cfg's KITTI k-means
# anchors (fitted at 640x192) rescaled by the letterbox-scale ratio 0.335 / 0.512 = 0.654 to this
# input. coord_scale=5 (1 in the demo cfg): at stride 32 a one-pixel error on the 4-px-wide
# cyclist costs little squared error but most of its IoU; with coord_scale=1 the cyclist stayed
# below IoU 0.5 for 2 of 12 seeds, with 5 the worst truth over 16 seeds had IoU 0.73.
TINY_YOLOV2_CFG = """[net]
width=416
height=128
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=12
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=24
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=48
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=96
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=48
size=1
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=96
size=3
stride=1
pad=1
activation=leaky

[route]
layers=6

[convolutional]
batch_normalize=1
filters=12
size=1
stride=1
pad=1
activation=leaky

[reorg]
stride=2

[route]
layers=-1,-4

[convolutional]
batch_normalize=1
filters=64
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=40
size=1
stride=1
pad=1
activation=linear

[region]
anchors = 0.374,0.362, 0.908,0.517, 0.694,1.546, 1.732,0.948, 2.989,1.789
bias_match=1
classes=3
coords=4
num=5
softmax=1
rescore=1
object_scale=5
noobject_scale=1
class_scale=1
coord_scale=5
thresh=.6
"""


def greedy_match(pred_boxes: torch.Tensor, pred_scores: torch.Tensor, pred_labels: torch.Tensor,
                 gt_boxes: torch.Tensor, gt_labels: torch.Tensor, iou_thres: float = IOU_MATCH
                 ) -> torch.Tensor:
    """Which truths are found: detections, best score first, each claim the unclaimed truth of
    their class with the highest IoU >= `iou_thres` (one detection per truth, as in VOC/KITTI).

    Returns a bool (G,) mask over the truths.
    """
    found = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
    if gt_boxes.shape[0] == 0 or pred_boxes.shape[0] == 0:
        return found
    iou = box_iou(pred_boxes.double(), gt_boxes.double())  # (P, G)
    for p in torch.argsort(pred_scores, descending=True, stable=True).tolist():
        cand = iou[p].clone()
        cand[found | (gt_labels != pred_labels[p])] = -1.0
        g = int(cand.argmax())
        if cand[g] >= iou_thres:
            found[g] = True
    return found


def test_greedy_match_hand_case() -> None:
    """Hand-worked: the matcher is one-to-one, class-aware, thresholded at IoU 0.5, best score first."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    gl = torch.tensor([0, 0, 1])
    pred = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # gt 0 exactly, but scored below the next one
        [0.0, 0.0, 10.0, 9.0],    # gt 0 at IoU 0.9, best score: claims it; the exact box then finds nothing
        [20.0, 0.0, 30.0, 4.0],   # gt 1 at IoU 0.4 < 0.5: not found
        [40.0, 0.0, 50.0, 10.0],  # gt 2 with the wrong class: not found
    ])
    scores = torch.tensor([0.9, 0.95, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0, 0])
    assert greedy_match(pred, scores, labels, gt, gl).tolist() == [True, False, False]
    # The right class for the last box, and the second box made tall enough (IoU 0.6).
    pred[2, 3] = 6.0
    labels[3] = 1
    assert greedy_match(pred, scores, labels, gt, gl).tolist() == [True, True, True]
    # Ties in IoU go to the first truth; a second detection then takes the other.
    gt2 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    two = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 10.0]])
    assert greedy_match(two, torch.tensor([0.5, 0.4]), torch.tensor([0, 0]), gt2,
                        torch.tensor([0, 0])).tolist() == [True, True]
    assert not greedy_match(pred[:0], scores[:0], labels[:0], gt, gl).any()


def _sample_root() -> Path:
    if not (SAMPLE / "training" / "image_2").is_dir() or not (SAMPLE / "training" / "label_2").is_dir():
        pytest.skip(f"real KITTI sample frames not found at {SAMPLE} (training/image_2, training/label_2; "
                    f"see ../shared/kitti/README.md)")
    return SAMPLE


def overfit_sample(root: Path, seed: int = SEED, steps: int = STEPS, lr: float = LR,
                   cfg_path: Path | None = None, input_size: Sequence[int] = INPUT_SIZE) -> dict:
    """Train the tiny YOLOv2 on all frames of `root` (one full batch) and measure it there.

    Returns a dict with the losses, per-truth results, recall, detection counts and timings.
    """
    dataset = KittiDataset(root, split=None, classes=CLASSES, transforms=eval_transforms(input_size))
    # The eval letterbox is deterministic, so the loader's single batch is decoded once and reused.
    loader = build_loader(dataset, batch_size=len(dataset), shuffle=False, seed=seed)
    batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]

    cpu0, wall0 = time.process_time(), time.perf_counter()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_detector("darknet", cfg=str(cfg_path) if cfg_path else "yolov2-demo",
                               class_names=list(CLASSES), input_size=tuple(input_size))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        # lr / 10 for the last fifth: constant-lr Adam keeps jittering the boxes by a pixel,
        # too much for the 4-px-wide cyclist at this input
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.8 * steps)], gamma=0.1)
        model.train()
        for _ in range(steps):
            raw = model(batch.images)
            loss, _ = model.loss(raw, batch.targets, batch.ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            dets = model.predict(model(batch.images), conf_thres=PREDICT_CONF, iou_thres=0.45)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0

    truths: list[dict] = []
    n_class_boxes = 0
    n_dets = 0
    for i, det in enumerate(dets):
        meta = batch.meta[i]
        frame = dataset.frame_labels(i)  # the label file as parsed, original image pixels
        assert meta["image_id"] == dataset.ids[i]
        keep = [j for j, t in enumerate(frame.types) if t in CLASSES]
        gt = torch.as_tensor(np.asarray(frame.boxes, dtype=np.float64).reshape(-1, 4)[keep])
        gl = torch.tensor([CLASSES.index(frame.types[j]) for j in keep], dtype=torch.long)
        n_class_boxes += len(keep)
        n_dets += int((det.scores > CONF).sum())
        pred = letterbox_to_original(det.boxes.double(), meta)
        on = det.scores > CONF
        found = greedy_match(pred[on], det.scores[on], det.labels[on], gt, gl)
        iou = box_iou(gt, pred) if len(det) else torch.zeros((len(keep), 0), dtype=torch.float64)
        hit = (iou >= IOU_MATCH) & (gl[:, None] == det.labels[None, :])  # same class, IoU >= 0.5
        for k in range(len(keep)):
            height_in = float(gt[k, 3] - gt[k, 1]) * float(meta["scale"])
            truths.append({
                "frame": meta["image_id"], "class": CLASSES[int(gl[k])],
                "box": [round(float(v), 1) for v in gt[k]], "height_input_px": round(height_in, 1),
                "eligible": height_in >= MIN_HEIGHT_INPUT_PX, "found": bool(found[k]),
                # best score of a same-class detection at IoU >= 0.5, and best IoU of any detection
                "score": round(float(det.scores[hit[k]].max()), 3) if hit[k].any() else 0.0,
                "best_iou": round(float(iou[k].max()), 3) if len(det) else 0.0})
    eligible = [t for t in truths if t["eligible"]]
    recall = sum(t["found"] for t in eligible) / max(len(eligible), 1)
    return {"losses": losses, "truths": truths, "n_class_boxes": n_class_boxes,
            "n_eligible": len(eligible), "recall": recall, "n_dets": n_dets,
            "cpu_s": cpu_s, "wall_s": wall_s}


def test_tiny_darknet_overfits_real_kitti_frames(tmp_path: Path) -> None:
    root = _sample_root()
    cfg = tmp_path / "tiny-yolov2-kitti.cfg"
    cfg.write_text(TINY_YOLOV2_CFG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible timing and results on a shared machine
    try:
        r = overfit_sample(root, cfg_path=cfg)
    finally:
        torch.set_num_threads(threads)
    print(f"\nreal-frames overfit: recall {r['recall']:.3f} over {r['n_eligible']} eligible truths, "
          f"{r['n_dets']} detections >= {CONF} for {r['n_class_boxes']} Car/Ped/Cyc boxes, "
          f"loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.3f}, "
          f"train+predict {r['cpu_s']:.1f} s CPU / {r['wall_s']:.1f} s wall")
    missed = [t for t in r["truths"] if t["eligible"] and not t["found"]]

    losses = np.asarray(r["losses"])
    assert np.isfinite(losses).all(), "loss became non-finite"
    final = float(losses[-5:].mean())
    assert final < losses[0] / 50, f"loss fell only from {losses[0]:.3f} to {final:.3f} (expected > 50x)"

    # Eligibility keeps most class boxes (else the recall below would say little).
    assert r["n_class_boxes"] >= 1, "no Car/Pedestrian/Cyclist box in the sample labels"
    assert r["n_eligible"] >= 0.75 * r["n_class_boxes"], r["truths"]
    assert r["recall"] >= 0.9, f"recall {r['recall']:.3f} < 0.9 at IoU {IOU_MATCH}; missed: {missed}"
    assert r["n_dets"] <= 2 * r["n_class_boxes"], (
        f"{r['n_dets']} detections above {CONF} for {r['n_class_boxes']} Car/Pedestrian/Cyclist boxes")
