"""Packed-size accounting and the summary table, on hand-counted and real models."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import nn

from kd_bnn.binary import (
    BinaryConv2d,
    binarize,
    conv_bn_pairs,
    float32_model_bytes,
    packed_conv_bytes,
    packed_layer_bytes,
    packed_model_bytes,
    summary,
)


def hand_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 70, 3, padding=1, bias=False), nn.BatchNorm2d(70), nn.ReLU(),  # first: float, BN folded
        nn.Conv2d(70, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),   # binary, 2 words, BN folded
        nn.Conv2d(8, 8, 1, bias=True), nn.ReLU(), nn.BatchNorm2d(8),                # binary + bias; BN not folded
        nn.Conv2d(8, 4, 1, bias=True),                                              # prediction: float
    )


GOLDEN = """\
Sequential summary (input 6x5)
-----------------  ------------  -------  ------  ------  ------------  -------------  ---------  -----------  ----------
Layer              Type          In bits  W bits  Output  1-bit params  32-bit params  Memory KB  32-bit MACs  1-bit MACs
-----------------  ------------  -------  ------  ------  ------------  -------------  ---------  -----------  ----------
0                  Conv2d             32      32  70x6x5             0          1,890       7.66       56,700           0
1 (folded into 0)  BatchNorm2d        32      32  70x6x5             0            280       0.00            0           0
3                  BinaryConv2d       32       1  8x6x5          5,040              0       1.22            0     151,200
4 (folded into 3)  BatchNorm2d        32      32  8x6x5              0             32       0.00            0           0
6                  BinaryConv2d       32       1  8x6x5             64              8       0.12            0       1,920
8                  BatchNorm2d        32      32  8x6x5              0             32       0.12            0           0
9                  Conv2d             32      32  4x6x5              0             36       0.14          960           0
-----------------  ------------  -------  ------  ------  ------------  -------------  ---------  -----------  ----------
Total                                                            5,104          2,278       9.27       57,660     153,120
-----------------  ------------  -------  ------  ------  ------------  -------------  ---------  -----------  ----------
Total params: 7,382 (5,104 1-bit, 2,278 32-bit)
Float32 size: 29,528 B (0.03 MB)
Packed size:  9,488 B (0.01 MB)
Compression:  3.1x
MACs: 210,780 total, 72.6% binary (0 xnor)
Packed bytes: 14.5% in 2 binary convs, 84.1% in 2 float convs, 0.0% in 0 depthwise convs (kept float: \
the packed kernels are dense), 1.3% other (BN, biases, ...)
Float parts alone cap the compression at 3.6x (what stays float - first/prediction/depthwise convs - is 32x \
larger per weight)"""


def test_hand_counted_totals_and_golden_table():
    model, _ = binarize(hand_model())
    assert conv_bn_pairs(model) == {"0": "1", "3": "4"}
    # packed, by hand: conv0 float+BN 4*(70*3*9) + 4*70 = 7840; conv3 binary 8*9*ceil(70/64)*8 = 1152
    # + alpha 32 + BN(scale, shift) 64 = 1248; conv6 binary 8*1*1*8 = 64 + alpha 32 + bias 32 = 128;
    # unfolded BN 4 vectors * 8 * 4 = 128; conv9 float 4*32 + 16 = 144.
    assert packed_model_bytes(model) == 7840 + 1248 + 128 + 128 + 144 == 9488
    # float32, by hand: 1890 + 280 + 5040 + 32 + 72 + 32 + 36 = 7382 elements
    assert float32_model_bytes(model) == 4 * 7382
    lines = []
    model.train()
    res = summary(model, (6, 5), print_fn=lines.append)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    t = res["totals"]
    assert (t["packed_bytes"], t["float32_bytes"], t["params_1bit"], t["params_32bit"]) == (9488, 29528, 5104, 2278)
    # MACs on 6x5: conv0 70*30*27; conv3 8*30*70*9; conv6 8*30*8; conv9 4*30*8
    assert (t["macs_float"], t["macs_binary"]) == (56700 + 960, 151200 + 1920)
    assert t["binary_mac_fraction"] == pytest.approx(153120 / 210780)
    assert t["compression"] == pytest.approx(29528 / 9488)
    assert t["num_binary_layers"] == 2
    assert lines == [GOLDEN]
    assert sum(r["packed_bytes"] for r in res["rows"]) == 9488
    # by hand: binary 1248 + 128; float convs 7840 + 144; unfolded BN 128; cap 29528 / (9488 - 1376)
    assert t["packed_bytes_by_part"] == {"binary": 1376, "depthwise": 0, "float_conv": 7984, "other": 128}
    assert t["compression_cap"] == pytest.approx(29528 / 8112)


def test_packed_conv_bytes_rule():
    # 64 channels fit one word, 65 need two
    assert packed_conv_bytes(10, 64, 3, 3, binary=True, bias=False, folded_bn=False) == 10 * 9 * 8 + 40
    assert packed_conv_bytes(10, 65, 3, 3, binary=True, bias=False, folded_bn=False) == 10 * 9 * 16 + 40
    assert packed_conv_bytes(10, 65, 3, 3, binary=True, bias=True, folded_bn=True) == 10 * 9 * 16 + 40 + 80
    assert packed_conv_bytes(10, 65, 3, 3, binary=False, bias=False, folded_bn=True) == 4 * 10 * 65 * 9 + 40
    conv = BinaryConv2d(130, 7, (1, 3), bias=False)
    assert packed_layer_bytes(conv) == 7 * 3 * 3 * 8 + 28
    assert packed_layer_bytes(conv, folded_bn=True) == 7 * 3 * 3 * 8 + 28 + 56


def test_xnor_summary_counts_xnor_macs_and_learned_scale_once():
    model, _ = binarize(hand_model(), {"mode": "xnor", "weight_scaling": "learned"})
    res = summary(model, (4, 4), print_fn=None)
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["3"]["input_bits"] == 1 and rows["0"]["input_bits"] == 32
    assert res["totals"]["macs_xnor"] == res["totals"]["macs_binary"] == 8 * 16 * (70 * 9 + 8)
    # the learned scale is the per-channel alpha, not stored twice
    assert res["totals"]["packed_bytes"] == 9488
    assert res["totals"]["float32_bytes"] == 29528 + 4 * 16


def test_ultralytics_yolov8n_every_bn_folded():
    pytest.importorskip("ultralytics")
    from kd_bnn.offline import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    from kd_bnn.models.ultralytics import UltralyticsDetector

    model = UltralyticsDetector(DetectionModel("yolov8n.yaml", nc=3, verbose=False), ["a", "b", "c"], (64, 64))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model, rep = binarize(model)
    assert len(conv_bn_pairs(model)) == n_bn
    # independent count: every tensor of the model belongs to a conv or a folded BN
    expected = 0
    bn_of = {id(m.conv): m.bn for m in model.modules() if hasattr(m, "conv") and hasattr(m, "bn")}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            co, ci, kh, kw = m.weight.shape
            if isinstance(m, BinaryConv2d):
                assert id(m) in bn_of
                expected += co * kh * kw * math.ceil(ci / 64) * 8 + 4 * co + 8 * co
            else:
                expected += 4 * m.weight.numel() + (4 * co if (m.bias is not None or id(m) in bn_of) else 0)
    res = summary(model, (64, 64), print_fn=None)
    t = res["totals"]
    assert t["packed_bytes"] == expected == packed_model_bytes(model)
    assert 20 < t["compression"] < 32
    assert t["binary_mac_fraction"] > 0.9


def _zero_init(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()


class Reorg(nn.Module):
    """YOLOv2 passthrough: space-to-depth by 2."""

    def forward(self, x):
        return nn.functional.pixel_unshuffle(x, 2)


def _cbl(ci: int, co: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, k, 1, k // 2, bias=False), nn.BatchNorm2d(co), nn.LeakyReLU(0.1))


class YoloV2Kitti(nn.Module):
    """DarkNet-19 YOLOv2 with passthrough (yolov2.cfg layout), 5 anchors x (5 + 3 classes) = 40 outputs."""

    def __init__(self):
        super().__init__()
        mp = nn.MaxPool2d
        self.part1 = nn.Sequential(
            _cbl(3, 32, 3), mp(2), _cbl(32, 64, 3), mp(2),
            _cbl(64, 128, 3), _cbl(128, 64, 1), _cbl(64, 128, 3), mp(2),
            _cbl(128, 256, 3), _cbl(256, 128, 1), _cbl(128, 256, 3), mp(2),
            _cbl(256, 512, 3), _cbl(512, 256, 1), _cbl(256, 512, 3), _cbl(512, 256, 1), _cbl(256, 512, 3))
        self.part2 = nn.Sequential(
            mp(2), _cbl(512, 1024, 3), _cbl(1024, 512, 1), _cbl(512, 1024, 3), _cbl(1024, 512, 1),
            _cbl(512, 1024, 3), _cbl(1024, 1024, 3), _cbl(1024, 1024, 3))
        self.passthrough = nn.Sequential(_cbl(512, 64, 1), Reorg())
        self.head = nn.Sequential(_cbl(1024 + 256, 1024, 3), nn.Conv2d(1024, 5 * (5 + 3), 1))

    def forward(self, x):
        a = self.part1(x)
        return self.head(torch.cat([self.passthrough(a), self.part2(a)], 1))


def test_binary_weight_yolov2_kitti_compression_in_paper_range():
    """Xu et al. (ICRA 2019): DarkNet YOLOv2 257 MB -> 8.8 MB (29x). Ours: 30.6x."""
    with mock.patch.object(nn.Conv2d, "reset_parameters", _zero_init):  # random init of 50M weights is slow
        model = YoloV2Kitti()
    n = sum(p.numel() for p in model.parameters())
    assert 49e6 < n < 52e6
    model, rep = binarize(model)
    assert rep.kept_float == ["part1.0.0", "head.1"]
    lines = []
    res = summary(model, (64, 64), print_fn=lines.append)
    t = res["totals"]
    print(lines[0].splitlines()[-4:])
    assert 190 < t["float32_mb"] < 200 and 6 < t["packed_mb"] < 7
    assert 27 <= t["compression"] <= 33, t["compression"]
    assert "Compression:  30.6x" in lines[0]
    assert t["binary_mac_fraction"] > 0.95


class Block(nn.Module):
    def __init__(self, ci, co, second=False):
        super().__init__()
        self.conv = nn.Conv2d(ci, co, 3, padding=1, bias=False)
        if second:
            self.cv2 = nn.Conv2d(ci, co, 1, bias=False)
        self.bn = nn.BatchNorm2d(co)
        self.second = second

    def forward(self, x):
        y = self.conv(x) + (self.cv2(x) if self.second else 0)
        return self.bn(y)


def test_conv_bn_pairs_attribute_blocks():
    model = nn.Sequential(Block(3, 8), Block(8, 8, second=True), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(4),
                          nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    # only the single-conv block and the channel-matching Sequential neighbour are folded
    assert conv_bn_pairs(model) == {"0.conv": "0.bn", "4": "5"}
