"""Ultralytics detectors (YOLOv8, YOLO11, YOLOv3-tiny, ...) behind the `Detector` interface.

Ultralytics is imported lazily, only through `kd_bnn.offline.import_ultralytics` (offline
settings, torch thread count kept). Importing this module does not import Ultralytics.

* raw output: the Detect head's training-mode predictions as one NCHW map per scale,
  ``(B, 4 * reg_max + C, H, W)`` (box distribution then class logits, the classic YOLOv8
  layout), whatever the module's train / eval mode. For end-to-end heads (YOLO26, YOLOv10) the
  one-to-many maps come first, then the one-to-one maps.
* loss: Ultralytics' own criterion (`v8DetectionLoss`, or `E2ELoss` for end-to-end heads) with
  the gains ``box``, ``cls``, ``dfl`` (Ultralytics defaults 7.5, 0.5, 1.5, or those stored in a
  trained checkpoint, or given as options); returned per image (Ultralytics' batch-scaled loss
  divided by the batch size). DontCare regions: the classification BCE of anchor points lying
  inside a DontCare box and assigned to no object is masked out (neither positive nor negative).
* predict: DFL expectation -> ``dist2bbox`` around the anchor points, sigmoid class scores, then
  `kd_bnn.models.heads.common.postprocess` (multi-label class-wise NMS, like Ultralytics' val).
* taps: the Detect head's inputs, named by stride (``stride8``, ``stride16``, ``stride32``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from kd_bnn.models.detector import (
    DETECTORS,
    ClassCountError,
    Detections,
    Detector,
    SkeletonError,
    register_skeleton,
)
from kd_bnn.models.heads.common import check_input_size as _check_input_size
from kd_bnn.models.heads.common import check_targets, postprocess
from kd_bnn.offline import import_ultralytics

#: Ultralytics' default loss gains (ultralytics/cfg/default.yaml) and the schedule length E2ELoss reads.
DEFAULT_HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5, "epochs": 100}

_TRUST_HELP = (
    "An Ultralytics .pt checkpoint is a pickle: loading it runs arbitrary code stored in the file. "
    "Load only files you trust, and say so: config teacher.trust: true (student.model.trust: true for a "
    "student's own architecture); command line: the override teacher.trust=true."
)


class _MaskedBCE:
    """``BCEWithLogitsLoss(reduction='none')`` whose result is multiplied by a settable mask."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.mask is not None:
            keep = self.mask | (target > 0).any(-1, keepdim=True)  # assigned anchors always count
            loss = loss * keep.to(loss.dtype)
        return loss


class UltralyticsDetector(Detector):
    """An Ultralytics `DetectionModel` as a `Detector`.

    Args:
        model: a built Ultralytics ``DetectionModel``.
        class_names: names in label order (their number must match the head's classes).
        input_size: (height, width), multiples of the largest stride.
        hyp: loss gains overriding the defaults / the checkpoint's (``box``, ``cls``, ``dfl``).
    """

    def __init__(self, model: nn.Module, class_names: Sequence[str], input_size: tuple[int, int] = (384, 1248),
                 hyp: dict | None = None, head_classes: int | None = None):
        super().__init__()
        self.model = model
        detect = self.detect
        if not hasattr(detect, "reg_max") or not hasattr(detect, "nc"):
            raise TypeError(f"expected an Ultralytics detection model ending in a Detect head, found "
                            f"{type(detect).__name__}")
        self.class_names = list(class_names)
        if len(self.class_names) != int(detect.nc):
            raise ClassCountError(f"class_names: the model's Detect head predicts {int(detect.nc)} classes, "
                                  f"but {len(self.class_names)} names were given ({self.class_names[:12]})",
                                  model_classes=int(detect.nc), given=len(self.class_names))
        #: the class count the architecture was built with (the width of Detect's class branch
        #: depends on it); differs from ``num_classes`` after a head transfer (`with_classes`)
        self.head_classes = int(head_classes) if head_classes is not None else int(detect.nc)
        strides = [int(s) for s in detect.stride.tolist()]
        if not all(strides):
            raise ValueError("the Ultralytics model has no strides (was it built by DetectionModel?)")
        self.max_stride = max(strides)
        self.input_size = _check_input_size(input_size, self.max_stride)
        base = dict(DEFAULT_HYP)
        stored = getattr(model, "args", None)
        if isinstance(stored, dict):
            base.update({k: stored[k] for k in DEFAULT_HYP if k in stored})
        elif isinstance(stored, SimpleNamespace):
            base.update({k: getattr(stored, k) for k in DEFAULT_HYP if hasattr(stored, k)})
        unknown = sorted(set(hyp or {}) - set(DEFAULT_HYP))
        if unknown:
            raise ValueError(f"hyp: unknown keys {unknown}; valid keys: {sorted(DEFAULT_HYP)}")
        base.update(hyp or {})
        self.model.args = SimpleNamespace(**base)
        self.model.names = dict(enumerate(self.class_names))
        layers = self.model.model
        det_index = len(layers) - 1
        self.taps = {f"stride{s}": f"model.model.{i}" for s, i in zip(strides, detect.f)}
        self._det_path = f"model.model.{det_index}"
        self._criterion = None
        self._criterion_device = None

    # -- structure ---------------------------------------------------------------------------
    @property
    def detect(self) -> nn.Module:
        """The Detect head module."""
        return self.model.model[-1]

    @property
    def end2end(self) -> bool:
        return getattr(self.detect, "one2one_cv2", None) is not None

    @property
    def strides(self) -> list[int]:
        return [int(s) for s in self.detect.stride.tolist()]

    def prediction_convs(self) -> list[str]:
        """The last conv of every box / class branch of Detect (they produce the raw maps)."""
        out = []
        for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
            seqs = getattr(self.detect, branch, None)
            if seqs is None:
                continue
            for i, seq in enumerate(seqs):
                last = [n for n, m in seq.named_modules() if isinstance(m, nn.Conv2d)][-1]
                out.append(f"{self._det_path}.{branch}.{i}.{last}")
        return out

    def fixed_convs(self) -> dict[str, str]:
        """DFL's integral conv: fixed weights 0..reg_max-1, never trained, always float."""
        if isinstance(getattr(self.detect.dfl, "conv", None), nn.Conv2d):
            return {f"{self._det_path}.dfl.conv": "DFL (fixed weights)"}
        return {}

    def skeleton(self) -> dict:
        """``{"family": "ultralytics", "options": {"cfg": <name of a yaml shipped with Ultralytics>}}``
        (a user's own yaml names Python modules to build, so it is not stored in a ``.kdbnn``)."""
        yaml_file = str((getattr(self.model, "yaml", None) or {}).get("yaml_file") or "")
        name = Path(yaml_file).name
        if not name or Path(yaml_file).parent != Path("."):
            shipped = Path(import_ultralytics().__file__).resolve().parent / "cfg"
            if not name or shipped not in Path(yaml_file).resolve().parents:
                raise NotImplementedError(
                    f"this Ultralytics model was built from {yaml_file or 'an unnamed architecture'}; a .kdbnn "
                    "rebuilds an Ultralytics architecture only from the name of a yaml shipped with Ultralytics "
                    "(e.g. yolov8n.yaml), because a user's yaml names Python modules to build")
        options: dict = {"cfg": name}
        if self.head_classes != self.num_classes:
            options["head_classes"] = self.head_classes
        return {"family": "ultralytics", "options": options}

    def with_classes(self, class_names: Sequence[str], sources: Sequence[int | None]) -> UltralyticsDetector:
        """Head transfer (:meth:`Detector.with_classes`): a copy whose Detect head predicts
        ``class_names``: the last conv of every class branch (``cv3``, and ``one2one_cv3`` of an
        end-to-end head) gets ``len(class_names)`` output channels, channel ``j`` copied from this
        model's class ``sources[j]``; a class with no source starts with zero weights and
        Ultralytics' class-bias prior ``log(5 / nc / (640 / stride)^2)``. The box branches and
        everything else are copied unchanged, so the new model's score of class ``j`` equals this
        model's score of class ``sources[j]`` exactly."""
        import copy

        names = [str(n) for n in class_names]
        if not names or len(sources) != len(names):
            raise ValueError(f"with_classes: expected one source per class name ({len(names)}), found {len(sources)}")
        c_old, c_new = self.num_classes, len(names)
        for name, src in zip(names, sources):
            if src is not None and not (isinstance(src, int) and 0 <= src < c_old):
                raise ValueError(f"with_classes: source of class {name!r} must be None or a class index in "
                                 f"[0, {c_old - 1}], found {src!r}")
        model = copy.deepcopy(self.model)
        detect = model.model[-1]
        strides = [float(v) for v in detect.stride.tolist()]
        idx = torch.tensor([-1 if v is None else v for v in sources])
        have = idx >= 0
        with torch.no_grad():
            for branch in ("cv3", "one2one_cv3"):
                seqs = getattr(detect, branch, None)
                if seqs is None:
                    continue
                for i, seq in enumerate(seqs):
                    path = [n for n, m in seq.named_modules() if isinstance(m, nn.Conv2d)][-1]
                    parent_path, _, leaf = path.rpartition(".")
                    parent = seq.get_submodule(parent_path) if parent_path else seq
                    old = getattr(parent, leaf)
                    conv = nn.Conv2d(old.in_channels, c_new, old.kernel_size, old.stride, old.padding,
                                     old.dilation, old.groups, bias=old.bias is not None).to(old.weight)
                    w = torch.zeros_like(conv.weight)
                    w[have] = old.weight[idx[have]]
                    conv.weight.copy_(w)
                    if conv.bias is not None:
                        b = torch.full_like(conv.bias, math.log(5 / c_new / (640 / strides[i]) ** 2))
                        b[have] = old.bias[idx[have]]
                        conv.bias.copy_(b)
                    setattr(parent, leaf, conv)
        detect.nc = c_new
        detect.no = c_new + 4 * int(detect.reg_max)
        if isinstance(getattr(model, "yaml", None), dict):
            model.yaml["nc"] = c_new
        new = UltralyticsDetector(model, names, self.input_size, head_classes=self.head_classes)
        return new.train(self.training)

    # -- forward and format conversion -------------------------------------------------------
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> per-scale raw maps (B, 4*reg_max + C, H/s, W/s)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), found {tuple(images.shape)}")
        if images.shape[-2] % self.max_stride or images.shape[-1] % self.max_stride:
            _check_input_size(tuple(images.shape[-2:]), self.max_stride)
        preds = self.model(images)
        if isinstance(preds, tuple):  # eval mode: (decoded, raw dict)
            preds = preds[1]
        if "one2many" in preds:
            return self._dict_to_maps(preds["one2many"]) + self._dict_to_maps(preds["one2one"])
        return self._dict_to_maps(preds)

    @staticmethod
    def _dict_to_maps(d: dict) -> list[torch.Tensor]:
        b = d["boxes"].shape[0]
        sizes = [f.shape[-2] * f.shape[-1] for f in d["feats"]]
        boxes = d["boxes"].split(sizes, dim=2)
        scores = d["scores"].split(sizes, dim=2)
        return [torch.cat((bx, sc), dim=1).view(b, -1, *f.shape[-2:])
                for bx, sc, f in zip(boxes, scores, d["feats"])]

    def _maps_to_dict(self, maps: Sequence[torch.Tensor]) -> dict:
        nb = 4 * int(self.detect.reg_max)
        b = maps[0].shape[0]
        flat = [m.reshape(b, m.shape[1], -1) for m in maps]
        return {"boxes": torch.cat([f[:, :nb] for f in flat], dim=2),
                "scores": torch.cat([f[:, nb:] for f in flat], dim=2),
                "feats": list(maps)}

    def _split_raw(self, raw: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        nl = len(self.strides)
        raw = list(raw)
        expected = 2 * nl if self.end2end else nl
        if len(raw) != expected:
            raise ValueError(f"expected {expected} raw maps from this Ultralytics model, found {len(raw)}")
        no = 4 * int(self.detect.reg_max) + self.num_classes
        for r in raw:
            if r.ndim != 4 or r.shape[1] != no:
                raise ValueError(f"raw map: expected (B, {no}, H, W), found {tuple(r.shape)}")
        return (raw[:nl], raw[nl:]) if self.end2end else (raw, None)

    # -- loss ----------------------------------------------------------------------------------
    def _get_criterion(self, device: torch.device):
        if self._criterion is None or self._criterion_device != device:
            import_ultralytics()
            self._criterion = self.model.init_criterion()
            self._criterion_device = device
        return self._criterion

    def _bce_modules(self, criterion) -> list:
        parts = [criterion.one2many, criterion.one2one] if hasattr(criterion, "one2many") else [criterion]
        for p in parts:
            if not isinstance(p.bce, _MaskedBCE):
                p.bce = _MaskedBCE()
        return [p.bce for p in parts]

    def _dontcare_mask(self, maps: Sequence[torch.Tensor], ignore: Sequence[torch.Tensor] | None) -> torch.Tensor | None:
        """(B, N, 1) True where an anchor point counts as a negative (outside every DontCare box)."""
        if ignore is None or not any(t is not None and len(t) for t in ignore):
            return None
        pts = []
        for m, s in zip(maps, self.strides):
            h, w = m.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h, device=m.device), torch.arange(w, device=m.device), indexing="ij")
            pts.append(torch.stack(((xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s), dim=1))
        pts = torch.cat(pts).to(maps[0].dtype)
        keep = torch.ones(len(ignore), pts.shape[0], 1, dtype=torch.bool, device=pts.device)
        for b, dc in enumerate(ignore):
            if dc is None or not len(dc):
                continue
            dc = torch.as_tensor(dc, dtype=pts.dtype, device=pts.device).reshape(-1, 4)
            inside = ((pts[:, None, 0] >= dc[None, :, 0]) & (pts[:, None, 0] <= dc[None, :, 2])
                      & (pts[:, None, 1] >= dc[None, :, 1]) & (pts[:, None, 1] <= dc[None, :, 3])).any(1)
            keep[b, :, 0] = ~inside
        return keep

    def loss(self, raw: Sequence[torch.Tensor], targets: torch.Tensor,
             ignore: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Ultralytics' detection loss per image; parts ``box``, ``cls``, ``dfl`` (gains applied)."""
        o2m, o2o = self._split_raw(raw)
        bsz = o2m[0].shape[0]
        dev = o2m[0].device
        in_h, in_w = o2m[0].shape[-2] * self.strides[0], o2m[0].shape[-1] * self.strides[0]
        if ignore is not None and len(ignore) != bsz:
            raise ValueError(f"ignore: expected one tensor of DontCare boxes per image ({bsz}), found {len(ignore)}")
        t = check_targets(targets, bsz, (in_h, in_w), dev)
        if t.shape[0] and ((t[:, 1] < 0) | (t[:, 1] >= self.num_classes)).any():
            raise ValueError(f"targets: class must be in [0, {self.num_classes - 1}], found {sorted(set(t[:, 1].tolist()))}")
        xywh = torch.stack((((t[:, 2] + t[:, 4]) / 2) / in_w, ((t[:, 3] + t[:, 5]) / 2) / in_h,
                            (t[:, 4] - t[:, 2]) / in_w, (t[:, 5] - t[:, 3]) / in_h), dim=1)
        batch = {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": xywh}
        criterion = self._get_criterion(dev)
        mask = self._dontcare_mask(o2m, ignore)
        for bce in self._bce_modules(criterion):
            bce.mask = mask
        try:
            preds = self._maps_to_dict(o2m)
            if o2o is not None:
                preds = {"one2many": preds, "one2one": self._maps_to_dict(o2o)}
            loss_vec, _ = criterion(preds, batch)
        finally:
            for bce in self._bce_modules(criterion):
                bce.mask = None
        loss_vec = loss_vec / bsz
        names = ("box", "cls", "dfl")
        return loss_vec.sum(), {n: loss_vec[i] for i, n in enumerate(names)}

    # -- predict -------------------------------------------------------------------------------
    def decode(self, raw: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps -> (boxes xyxy (B, N, 4) in input pixels, class scores (B, N, C)), from the
        one-to-many branch."""
        ultra = import_ultralytics()  # noqa: F841 - makes the utils importable offline-safely
        from ultralytics.utils.tal import dist2bbox, make_anchors

        o2m, _ = self._split_raw(raw)
        d = self._maps_to_dict([m.detach() for m in o2m])
        anchors, strides = make_anchors(d["feats"], self.detect.stride.to(o2m[0].device), 0.5)
        dist = self.detect.dfl(d["boxes"])
        boxes = dist2bbox(dist, anchors.transpose(0, 1).unsqueeze(0), xywh=False, dim=1) * strides.transpose(0, 1)
        return boxes.transpose(1, 2), d["scores"].sigmoid().transpose(1, 2)

    def predict(self, raw: Sequence[torch.Tensor], conf_thres: float = 0.005, iou_thres: float = 0.45,
                max_det: int = 300) -> list[Detections]:
        """Decode and class-wise NMS; scores are the sigmoid class scores (no objectness)."""
        o2m, _ = self._split_raw(raw)
        in_size = (o2m[0].shape[-2] * self.strides[0], o2m[0].shape[-1] * self.strides[0])
        with torch.no_grad():
            boxes, scores = self.decode(raw)
        return postprocess(boxes, scores, None, conf_thres, iou_thres, max_det, in_size, multi_label=True)


def build_ultralytics_model(cfg: str | os.PathLike, num_classes: int | None = None, trust: bool = False):
    """An Ultralytics ``DetectionModel`` from a yaml (name or path) or a trained ``.pt``.

    Returns:
        (model, class names stored in the checkpoint or None).
    """
    import_ultralytics()
    cfg_s = str(cfg)
    if cfg_s.endswith(".pt"):
        path = Path(cfg_s)
        if not trust:
            raise PermissionError(f"refusing to load {path}: {_TRUST_HELP}")
        if not path.is_file():
            raise FileNotFoundError(f"Ultralytics checkpoint {path} does not exist (nothing is downloaded)")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user (see above)
        model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else ckpt
        if not isinstance(model, nn.Module):
            raise ValueError(f"{path}: expected an Ultralytics checkpoint holding a 'model' or 'ema' module")
        model = model.float()
        args = ckpt.get("train_args") if isinstance(ckpt, dict) else None
        if isinstance(args, dict):
            model.args = args
        names = getattr(model, "names", None)
        names = [names[i] for i in sorted(names)] if isinstance(names, dict) else names
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        return model, names
    if not cfg_s.endswith((".yaml", ".yml")):
        raise ValueError(f"model.cfg: expected an Ultralytics .yaml (e.g. yolov8n.yaml) or a trained .pt, found {cfg_s!r}")
    from ultralytics.nn.tasks import DetectionModel

    try:
        model = DetectionModel(cfg_s, ch=3, nc=num_classes, verbose=False)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"Ultralytics model yaml {cfg_s!r} not found (a file path or a name shipped with "
                                f"Ultralytics such as yolov8n.yaml, yolo11n.yaml, yolov3-tiny.yaml): {exc}") from None
    return model, None


@DETECTORS.register("ultralytics")
def build_ultralytics(cfg: str | os.PathLike = "yolov8n.yaml", class_names: Sequence[str] | None = None,
                      input_size: tuple[int, int] = (384, 1248), weights: str | os.PathLike | None = None,
                      trust: bool = False, hyp: dict | None = None) -> UltralyticsDetector:
    """Factory for ``model.family: ultralytics``.

    `cfg` is a yaml (a fresh model with ``len(class_names)`` classes) or a trained ``.pt``
    (needs ``trust=True``); `weights` may name the ``.pt`` instead of `cfg`.
    """
    source = weights if weights is not None else cfg
    if weights is not None and not str(weights).endswith(".pt"):
        raise ValueError(f"model.weights: the ultralytics family loads trained .pt files, found {weights!r}")
    nc = len(class_names) if class_names is not None else None
    model, stored_names = build_ultralytics_model(source, nc, trust)
    if class_names is None:  # the model's own classes: a checkpoint's names, else the yaml's nc
        class_names = stored_names if stored_names is not None else [f"class{i}" for i in range(int(model.yaml["nc"]))]
    elif stored_names is not None and len(stored_names) != len(class_names):
        raise ClassCountError(f"{source}: the checkpoint predicts {len(stored_names)} classes "
                              f"({', '.join(map(str, list(stored_names)[:12]))}{', ...' if len(stored_names) > 12 else ''}), "
                              f"but {len(class_names)} class names were given: {list(class_names)}",
                              model_classes=len(stored_names), given=len(class_names), model_names=stored_names)
    return UltralyticsDetector(model, class_names, input_size, hyp)


def shipped_model_yaml(name: str) -> dict:
    """The model dict of an architecture yaml shipped inside the Ultralytics package, by bare name
    (``yolov8n.yaml``: the file ``yolov8.yaml`` at scale ``n``, as Ultralytics resolves names).

    Only the package's own ``cfg/models`` tree is searched - never the working directory - so a
    name read from a ``.kdbnn`` cannot make the toolkit read a file placed by someone else.
    """
    import yaml

    ultralytics = import_ultralytics()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+\.ya?ml", name) or name.startswith("."):
        raise SkeletonError(f"ultralytics skeleton cfg: expected the bare name of a yaml shipped with "
                            f"Ultralytics (e.g. yolov8n.yaml), found {name!r}")
    root = Path(ultralytics.__file__).resolve().parent / "cfg" / "models"
    stem, suffix = name.rsplit(".", 1)
    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", stem) + "." + suffix
    for cand in (name, unified):
        hits = sorted(root.rglob(cand))
        if hits:
            d = yaml.safe_load(hits[0].read_text())
            m = re.search(r"yolo(e-)?v?\d+([nslmx])", stem)
            d["scale"] = m.group(2) if m else ""
            d["yaml_file"] = name
            return d
    raise SkeletonError(f"ultralytics skeleton cfg {name!r}: no such architecture shipped with Ultralytics "
                        f"{getattr(ultralytics, '__version__', '')}")


#: the largest ``head_classes`` a ``.kdbnn`` skeleton may ask to build (LVIS has 1203 classes)
MAX_HEAD_CLASSES = 4096


def _build_skeleton(class_names: list[str], input_size: tuple[int, int], opts: dict) -> UltralyticsDetector:
    from ultralytics.nn.tasks import DetectionModel

    d = shipped_model_yaml(opts.get("cfg", "yolov8n.yaml"))
    head = opts.get("head_classes")
    if head is None or head == len(class_names):
        return UltralyticsDetector(DetectionModel(d, ch=3, nc=len(class_names), verbose=False), class_names, input_size)
    if not 1 <= head <= MAX_HEAD_CLASSES:
        raise SkeletonError(f"ultralytics skeleton head_classes: expected a class count in [1, {MAX_HEAD_CLASSES}], "
                            f"found {head}")
    # a head-transferred model (with_classes): built with `head` classes, then resized
    base = UltralyticsDetector(DetectionModel(d, ch=3, nc=head, verbose=False), [f"class{i}" for i in range(head)],
                               input_size)
    return base.with_classes(class_names, [None] * len(class_names))


# A .kdbnn rebuilds only architectures shipped with Ultralytics, by name (a user's yaml or .pt
# names code to run: its modules by name, its pickle by reference). ``head_classes``: the class
# count a head-transferred model was built with (the width of Detect's class branch follows it).
register_skeleton("ultralytics", {"cfg": "name", "head_classes": "int?"}, _build_skeleton)
