"""Small fakes shared by the distill and engine tests: a tiny `Detector` and an in-memory dataset.

(No tests here; the file is named test_* only so that it belongs to the distill room.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kd_bnn.models.detector import Detections, Detector


class TinyDetector(Detector):
    """A 2-stage conv net with a dense one-box-per-cell head (stride 4) and a simple loss."""

    def __init__(self, width: int = 8, num_classes: int = 2, input_size=(32, 32)) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.class_names = [f"c{i}" for i in range(num_classes)]
        self.backbone = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()),
        )
        self.head = nn.Conv2d(2 * width, 5 + num_classes, 1)
        self.taps = {"s2": "backbone.0", "s4": "backbone.1"}
        self.stride = 4

    def forward(self, images):
        return self.head(self.backbone(images))

    def distill_outputs(self, raw):
        b, _, h, w = raw.shape
        flat = raw.flatten(2).transpose(1, 2)  # (B, K, 5+C)
        return {"obj": flat[..., 4], "cls": flat[..., 5:], "box": self._decode(raw).flatten(1, 2)}

    def _decode(self, raw):
        b, _, h, w = raw.shape
        ys, xs = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing="ij")
        cx = (xs + torch.sigmoid(raw[:, 0])) * self.stride
        cy = (ys + torch.sigmoid(raw[:, 1])) * self.stride
        bw = raw[:, 2].clamp(-4, 4).exp() * self.stride * 2
        bh = raw[:, 3].clamp(-4, 4).exp() * self.stride * 2
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)  # (B, h, w, 4)

    def loss(self, raw, targets, ignore=None):
        b, _, h, w = raw.shape
        obj_t = torch.zeros((b, h, w), device=raw.device)
        box_l = raw.sum() * 0.0
        cls_l = raw.sum() * 0.0
        n = 0
        for row in targets:
            i, c = int(row[0]), int(row[1])
            cx, cy = float(row[2] + row[4]) / 2, float(row[3] + row[5]) / 2
            gx, gy = min(int(cx // self.stride), w - 1), min(int(cy // self.stride), h - 1)
            obj_t[i, gy, gx] = 1.0
            pred = raw[i, :, gy, gx]
            tx, ty = cx / self.stride - gx, cy / self.stride - gy
            bw = max(float(row[4] - row[2]), 1.0) / (self.stride * 2)
            bh = max(float(row[5] - row[3]), 1.0) / (self.stride * 2)
            tgt = torch.tensor([tx, ty, torch.tensor(bw).log(), torch.tensor(bh).log()], device=raw.device)
            box_l = box_l + F.mse_loss(torch.cat([torch.sigmoid(pred[:2]), pred[2:4]]), tgt, reduction="sum")
            cls_l = cls_l + F.cross_entropy(pred[5:][None], torch.tensor([c], device=raw.device))
            n += 1
        obj_l = F.binary_cross_entropy_with_logits(raw[:, 4], obj_t)
        box_l, cls_l = box_l / max(n, 1), cls_l / max(n, 1)
        total = obj_l + box_l + cls_l
        return total, {"box": box_l.detach(), "obj": obj_l.detach(), "cls": cls_l.detach()}

    def predict(self, raw, conf_thres=0.005, iou_thres=0.45, max_det=300):
        boxes = self._decode(raw).flatten(1, 2)
        obj = torch.sigmoid(raw[:, 4]).flatten(1)
        cls = torch.softmax(raw[:, 5:], 1).flatten(2).transpose(1, 2)
        out = []
        for b in range(raw.shape[0]):
            score, label = (obj[b, :, None] * cls[b]).max(-1)
            keep = score > conf_thres
            out.append(Detections(boxes[b][keep], score[keep], label[keep]))
        return out


class ShapesDataset(Dataset):
    """Deterministic images with one bright square each; targets in input pixels."""

    def __init__(self, n: int = 8, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            img = torch.rand((3, size, size), generator=g) * 0.2
            x1, y1 = torch.randint(0, size - 12, (2,), generator=g).tolist()
            s = int(torch.randint(6, 12, (1,), generator=g))
            c = int(torch.randint(0, 2, (1,), generator=g))
            img[c, y1:y1 + s, x1:x1 + s] = 1.0
            self.items.append((img, torch.tensor([[c, x1, y1, x1 + s, y1 + s]], dtype=torch.float32)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    images = torch.stack([im for im, _ in items])
    rows = [torch.cat([torch.full((t.shape[0], 1), float(i)), t], 1) for i, (_, t) in enumerate(items)]
    targets = torch.cat(rows) if rows else torch.zeros((0, 6))
    ignore = [torch.zeros((0, 4)) for _ in items]
    return images, targets, ignore


def make_loader(n: int = 8, batch_size: int = 4, seed: int = 0, shuffle: bool = True, gen_seed: int = 123):
    g = torch.Generator().manual_seed(gen_seed)
    return DataLoader(ShapesDataset(n, seed=seed), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=collate, generator=g, num_workers=0)


def fixed_batch(n: int = 4, seed: int = 0):
    return collate([ShapesDataset(n, seed=seed)[i] for i in range(n)])
