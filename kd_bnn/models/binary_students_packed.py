"""The binary-friendly students on packed sign words: the `Detector.packed_plan` / ``packed_forward``
hooks of Bi-Real-YOLO and BinaryDenseNet-YOLO (`kd_bnn.models.binary_students`).

The kernels belong to the runtime, which hands them in as ``ops``
(`kd_bnn.models.detector.PackedOps`); this module only knows the students' module types. What
a binary conv of these families reads, and where the walk hands it packed words instead of a
float map it would binarize itself (one pack pass per conv):

* **Bi-Real units** ``y = bn(conv(sign(x))) + shortcut(x)`` (no activation in XNOR mode; the
  export does not fold ``bn`` into ``bconv``, so the walk evaluates it on every value the conv
  output can take: per channel a fused multiply-add ``fma(v, a, b)`` in the kernel's vector
  epilogue where that equals ``bn`` on all of them, as torch's BatchNorm is, else looked up by
  popcount; exact, `PackedOps.output_table`): a unit followed by another
  chainable unit runs as one fused kernel pass that adds the shortcut and writes both the float ``y`` (the next unit's shortcut,
  the passthrough) and the packed signs of ``y``, padded for the next conv, which reads them
  as they are. The first unit reads the stem's float map.
* **Dense layers** ``Sequential(bn, act, bconv)`` of a dense block, whose input is
  ``bn_l(cat(x0, y_0, ..., y_{l-1}))``: each layer has its own BatchNorm over the whole
  concatenation, so a part's signs differ per consumer and one growing packed copy cannot serve
  all layers. Instead: layer ``l-1``'s kernel emits, besides its float output, the bits
  ``bn_l(y_{l-1}) >= 0`` of its consumer (popcount bounds, `PackedOps.sign_bounds`: exact, the
  BatchNorm evaluated on every value the conv output can take); the block input and older layers'
  outputs are binarized against ``bn_l``'s per-channel thresholds (``bn_l(x) >= 0`` iff ``x >= t``,
  or ``x <= t`` for a negative scale: `PackedOps.sign_thresholds`, exact for a monotone BatchNorm;
  no normalised copy is made) inside the concatenation; the parts are concatenated as
  packed words (a word copy where a part starts on a 64-channel boundary, shifted otherwise:
  channel counts that are not multiples of 64, as in the ``small`` preset, cost a shift, not a
  fall back). The float concatenation is built once per block (the transition reads it).
* **Head** ``BinaryConvBNAct`` (bn_in, bconv, BN folded, leaky fused): the conv before another
  head conv emits only the packed bits ``bn_in(v) >= 0`` of that conv's input (bounds again; its
  float map is never written), and the passthrough part of ``head.conv3``'s input is binarized
  against ``bn_in``'s thresholds, both concatenated as packed words in one pass.

Convs that keep binarizing a float map, with the reason (``StudentPackedPlan.float_in``): the
first Bi-Real unit (the stem's map), the first layer of each dense block (the transition's
float map through its own BatchNorm), ``head.conv1`` (a float BatchNorm of the backbone's
float output), and any conv the kernel cannot chain (BWN mode, XNOR-Net input scaling,
asymmetric padding, dilation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StudentPackedPlan", "student_packed_forward", "student_packed_plan"]


@dataclass
class StudentPackedPlan:
    """Which binary convs of a Bi-Real / BinaryDenseNet student read packed words.

    ``packed_in``: conv path -> how its packed input is made; ``float_in``: conv path -> why it
    binarizes a float map itself; the rest is what ``packed_forward`` runs (per Bi-Real unit the
    next unit's conv, per dense layer / head conv the popcount bounds of its consumer's BatchNorm).
    """

    packed_in: dict[str, str] = field(default_factory=dict)
    float_in: dict[str, str] = field(default_factory=dict)
    units: dict[str, nn.Module | None] = field(default_factory=dict)  # Bi-Real unit path -> next conv
    tables: dict[str, Any] = field(default_factory=dict)  # Bi-Real unit path -> its BN (kernels.OutputMap)
    blocks: dict[str, list[Any]] = field(default_factory=dict)  # dense block name -> per-layer bounds
    stages: set[str] = field(default_factory=set)  # backbone children holding chained Bi-Real units
    head: dict[str, Any] | None = None

    def __bool__(self) -> bool:  # a plan, even with nothing packed
        return True


def _bn_params(bn: nn.BatchNorm2d, sl: slice) -> tuple:
    w = None if bn.weight is None else bn.weight[sl]
    b = None if bn.bias is None else bn.bias[sl]
    return bn.running_mean[sl], bn.running_var[sl], w, b, bn.eps


def _bn_slice(x: torch.Tensor, params: tuple) -> torch.Tensor:
    """``bn(full)[:, sl]`` for the channels ``x`` holds: the module's own eval-mode op, on the slice."""
    mean, var, w, b, eps = params
    return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)


def _bn_sign_predicate(bn: nn.BatchNorm2d, start: int):
    """``v -> bn(v placed at channels start..) >= 0``: the full module on a map of its own width."""

    def pred(v: torch.Tensor) -> torch.Tensor:
        full = v.new_zeros(v.shape[0], bn.num_features, *v.shape[2:])
        full[:, start:start + v.shape[1]] = v
        return bn(full)[:, start:start + v.shape[1]] >= 0

    return pred


def _plain_bn(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d and m.track_running_stats and m.running_mean is not None


# ----------------------------------------------------------------------------- Bi-Real


def _bireal_chainable(unit: nn.Module, ops: Any) -> bool:
    from kd_bnn.models.binary_students import BiRealUnit

    return (type(unit) is BiRealUnit and isinstance(unit.act, nn.Identity)
            and (isinstance(unit.bn, nn.Identity) or _plain_bn(unit.bn)) and ops.chainable_xnor(unit.bconv))


def _plan_bireal(model: nn.Module, ops: Any, plan: StudentPackedPlan) -> None:
    from kd_bnn.models.binary_students import BiRealUnit

    units = [(f"backbone.{name}.{j}", u) for name, stage in model.backbone.named_children()
             if isinstance(stage, nn.Sequential) for j, u in enumerate(stage) if isinstance(u, BiRealUnit)]
    prev_chain = False
    for i, (path, unit) in enumerate(units):
        conv = f"{path}.bconv"
        ok = _bireal_chainable(unit, ops)
        nxt = units[i + 1][1] if i + 1 < len(units) else None
        if not ok:
            plan.float_in[conv] = "not a chainable XNOR unit (BWN, input scaling, activation or unfolded BN)"
            prev_chain = False
            continue
        plan.units[path] = nxt.bconv if nxt is not None and _bireal_chainable(nxt, ops) else None
        plan.stages.add(path.split(".")[1])
        if not isinstance(unit.bn, nn.Identity):  # the unit's BN (not folded: `bconv` is no `conv`)
            plan.tables[path] = ops.output_table(unit.bconv, unit.bn)
        if prev_chain:
            plan.packed_in[conv] = "signs of the previous unit's output, from its fused residual epilogue"
        else:
            plan.float_in[conv] = "first unit of a chain: the stem's (or a float unit's) map"
        prev_chain = plan.units[path] is not None


def _run_bireal_stage(stage: nn.Sequential, name: str, x: torch.Tensor, packed: torch.Tensor | None,
                      plan: StudentPackedPlan, ops: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    for j, unit in enumerate(stage):
        path = f"backbone.{name}.{j}"
        if path not in plan.units:
            x, packed = unit(x), None
            continue
        nxt = plan.units[path]
        s = unit.shortcut(x)
        out = ops.xnor_fused(unit.bconv, x if packed is None else packed, residual=s, packed_for=nxt,
                             x_padded=packed is not None, table=plan.tables.get(path))
        x, packed = out if nxt is not None else (out, None)
    return x, packed


# ----------------------------------------------------------------------------- BinaryDenseNet


def _dense_layer_parts(layer: nn.Module, ops: Any) -> tuple[nn.BatchNorm2d, nn.Module] | None:
    if not isinstance(layer, nn.Sequential) or not all(hasattr(layer, k) for k in ("bn", "act", "bconv")):
        return None
    if not _plain_bn(layer.bn) or not isinstance(layer.act, nn.Identity) or not ops.chainable_xnor(layer.bconv):
        return None
    return layer.bn, layer.bconv


def _plan_dense(model: nn.Module, ops: Any, plan: StudentPackedPlan) -> None:
    from kd_bnn.models.binary_students import DenseBlock

    for name, block in model.backbone.named_children():
        if not isinstance(block, DenseBlock):
            continue
        layers = list(block.layers)
        parts = [_dense_layer_parts(m, ops) for m in layers]
        paths = [f"backbone.{name}.layers.{i}.bconv" for i in range(len(layers))]
        if any(p is None for p in parts):
            for p in paths:
                plan.float_in[p] = "dense block with a layer the kernel cannot chain (BWN, activation, input scaling)"
            continue
        c0 = parts[0][1].in_channels
        growth = [conv.out_channels for _, conv in parts]
        specs = []
        for i, (bn, conv) in enumerate(parts):
            spec: dict[str, Any] = {"bounds": None, "bn_parts": []}
            if i == 0:  # the block input through bn_0, binarized by its thresholds (no normalised map)
                spec["thr_in"] = ops.sign_thresholds(_bn_sign_predicate(bn, 0), bn.num_features)
            if i + 1 < len(parts):  # this layer's kernel emits the bits of its output through bn_{i+1}
                nbn = parts[i + 1][0]
                start = c0 + sum(growth[:i])
                spec["bounds"] = ops.sign_bounds(conv, _bn_sign_predicate(nbn, start))
            if i > 0:
                offs = [0, c0]
                for g in growth[:i - 1]:
                    offs.append(offs[-1] + g)
                # bn_i's channel slices of the block input and of layers 0..i-2: as the packer's
                # per-channel thresholds (bn_i(x) >= 0 iff x >= t, or x <= t), else as BatchNorms
                thr = ops.sign_thresholds(_bn_sign_predicate(bn, 0), bn.num_features)
                spec["bn_parts"] = [_bn_params(bn, slice(a, b)) for a, b in zip(offs[:-1], offs[1:])]
                spec["thr_parts"] = None if thr is None else [(thr[0][a:b], thr[1][a:b])
                                                              for a, b in zip(offs[:-1], offs[1:])]
                spec["prev_c"] = growth[i - 1]
                spec["prev_bn"] = _bn_params(bn, slice(offs[-1], offs[-1] + growth[i - 1]))
            specs.append(spec)
        # a layer whose producer's bits could not be bounded falls back (packs its float concat)
        for i in range(len(parts)):
            if i == 0:
                plan.float_in[paths[i]] = ("first layer of the block: the transition's (or stem's) float map, "
                                           "binarized through bn_0 (by its thresholds where they fit)")
            elif specs[i - 1]["bounds"] is None:
                plan.float_in[paths[i]] = "the previous layer's output signs could not be bounded"
                specs[i]["bn_parts"] = None
            else:
                aligned = c0 % 64 == 0 and all(g % 64 == 0 for g in growth[:i])
                plan.packed_in[paths[i]] = (
                    f"packed concat of the block input and layers 0..{i - 2} through bn_{i} slices, and "
                    f"layer {i - 1}'s bits from its kernel epilogue (bounds of bn_{i}); "
                    + ("word-aligned parts" if aligned else "parts shifted into place (channels not multiples of 64)"))
        plan.blocks[name] = specs


def _run_dense_block(block: nn.Module, name: str, x0: torch.Tensor, plan: StudentPackedPlan,
                     ops: Any) -> torch.Tensor:
    specs = plan.blocks[name]
    outs: list[torch.Tensor] = []
    prev_bits = None
    for i, layer in enumerate(block.layers):
        spec = specs[i]
        if i == 0 and spec["thr_in"] is not None:
            inp, padded = ops.concat_packed([(x0, x0.shape[1], spec["thr_in"])], pad_for=layer.bconv), True
        elif i == 0 or spec["bn_parts"] is None or prev_bits is None:
            xin = torch.cat([x0, *outs], dim=1) if outs else x0
            inp, padded = layer.bn(xin), False
        else:
            srcs = [x0, *outs[:-1]]  # signs of bn_i's slices, binarized inside the concat
            if spec["thr_parts"] is not None:
                parts = [(t, t.shape[1], th) for t, th in zip(srcs, spec["thr_parts"])]
            else:
                parts = [(_bn_slice(t, p), t.shape[1]) for t, p in zip(srcs, spec["bn_parts"])]
            parts.append((prev_bits, spec["prev_c"]))
            inp, padded = ops.concat_packed(parts, pad_for=layer.bconv), True
        if spec["bounds"] is not None:
            y, prev_bits = ops.xnor_fused(layer.bconv, inp, bounds=spec["bounds"], x_padded=padded)
        else:
            y, prev_bits = ops.xnor_fused(layer.bconv, inp, x_padded=padded), None
        outs.append(y)
    return torch.cat([x0, *outs], dim=1)


# ----------------------------------------------------------------------------- head


def _head_block_parts(blk: nn.Module, ops: Any) -> nn.Module | None:
    from kd_bnn.models.binary_students import BinaryConvBNAct

    if type(blk) is not BinaryConvBNAct or not _plain_bn(blk.bn_in) or not ops.chainable_xnor(blk.bconv):
        return None
    if not isinstance(blk.bn, nn.Identity) or not isinstance(blk.act, nn.Identity):
        return None
    return blk.bconv


def _plan_head(model: nn.Module, ops: Any, plan: StudentPackedPlan) -> None:
    names = ["conv1", "conv2", "conv3"] if hasattr(model.head, "conv2") else ["conv1", "conv3"]
    blocks = [getattr(model.head, n) for n in names]
    convs = [_head_block_parts(b, ops) for b in blocks]
    plan.float_in["head.conv1.bconv"] = ("the backbone's float output, binarized through bn_in (by its "
                                         "thresholds where they fit)")
    if any(c is None for c in convs):
        for n in names[1:]:
            plan.float_in[f"head.{n}.bconv"] = "the head convs are not all chainable XNOR blocks"
        return
    bounds = []
    for i in range(len(names) - 1):
        b = ops.sign_bounds(convs[i], _bn_sign_predicate(blocks[i + 1].bn_in, 0))
        if b is None:
            for n in names[1:]:
                plan.float_in[f"head.{n}.bconv"] = "a head conv's output signs could not be bounded"
            return
        bounds.append(b)
    hc = convs[-2].out_channels
    last = blocks[-1].bn_in
    thr = ops.sign_thresholds(_bn_sign_predicate(last, 0), last.num_features)
    plan.head = {"names": names, "bounds": bounds, "fine_bn": _bn_params(last, slice(hc, last.num_features)),
                 "fine_thr": None if thr is None else (thr[0][hc:], thr[1][hc:]), "hc": hc,
                 "thr_in": ops.sign_thresholds(_bn_sign_predicate(blocks[0].bn_in, 0), blocks[0].bn_in.num_features)}
    for i, n in enumerate(names[1:]):
        src = f"head.{names[i]}"
        plan.packed_in[f"head.{n}.bconv"] = (
            f"{src}'s bits from its kernel epilogue (bounds of head.{n}.bn_in; its float map is not written)"
            + ("; the passthrough through bn_in's slice, packed and concatenated "
               f"({'word-aligned' if hc % 64 == 0 else 'shifted: ' + str(hc) + ' channels'})" if n == "conv3" else ""))


def _run_head(model: nn.Module, x: torch.Tensor, fine: torch.Tensor, plan: StudentPackedPlan,
              ops: Any) -> torch.Tensor:
    spec = plan.head
    names = spec["names"]
    blocks = [getattr(model.head, n) for n in names]
    if spec["thr_in"] is not None:  # bn_in's signs by its thresholds, packed and padded in one pass
        inp = ops.concat_packed([(x, x.shape[1], spec["thr_in"])], pad_for=blocks[0].bconv)
        bits = ops.xnor_fused(blocks[0].bconv, inp, bounds=spec["bounds"][0], float_out=False, x_padded=True)
    else:
        bits = ops.xnor_fused(blocks[0].bconv, blocks[0].bn_in(x), bounds=spec["bounds"][0], float_out=False)
    for i in range(1, len(names)):
        blk = blocks[i]
        if i < len(names) - 1:  # conv2: its whole input is conv1's bits
            inp = ops.concat_packed([(bits, spec["hc"])], pad_for=blk.bconv)
            bits = ops.xnor_fused(blk.bconv, inp, bounds=spec["bounds"][i], float_out=False, x_padded=True)
            continue
        fine_part = ((fine, fine.shape[1], spec["fine_thr"]) if spec["fine_thr"] is not None
                     else (_bn_slice(fine, spec["fine_bn"]), fine.shape[1]))
        inp = ops.concat_packed([(bits, spec["hc"]), fine_part], pad_for=blk.bconv)
        return ops.xnor_fused(blk.bconv, inp, x_padded=True)
    raise AssertionError("unreachable: the head ends with conv3")


# ----------------------------------------------------------------------------- the hooks


def student_packed_plan(model: nn.Module, ops: Any) -> StudentPackedPlan:
    """The packed plan of a Bi-Real / BinaryDenseNet student (module docstring)."""
    plan = StudentPackedPlan()
    _plan_bireal(model, ops, plan)
    _plan_dense(model, ops, plan)
    _plan_head(model, ops, plan)
    return plan


def student_packed_forward(model: nn.Module, images: torch.Tensor, plan: StudentPackedPlan,
                           ops: Any) -> list[torch.Tensor]:
    """``BinaryStudentYOLO.forward`` with the plan's convs reading packed words."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), found {tuple(images.shape)}")
    x, fine, packed = images, None, None
    for name, m in model.backbone.named_children():
        if name in plan.blocks:
            x, packed = _run_dense_block(m, name, x, plan, ops), None
        elif name in plan.stages:
            x, packed = _run_bireal_stage(m, name, x, packed, plan, ops)
        else:
            x, packed = m(x), None
        if name == model._stride16:
            fine = x
    fine = model.passthrough(fine)
    if plan.head is not None:
        x = _run_head(model, x, fine, plan, ops)
    else:
        x = model.head.conv1(x)
        if hasattr(model.head, "conv2"):
            x = model.head.conv2(x)
        x = model.head.conv3(torch.cat([x, fine], dim=1))
    return [model.head.pred(x)]
