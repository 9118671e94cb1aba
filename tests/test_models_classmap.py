"""Models of other classes on the dataset's classes (`kd_bnn.models.classmap`): the class-mapped
wrapper keeps the `Detector` contract and maps predictions, loss targets and distillation outputs;
head transfer (`Detector.with_classes`) of Darknet [yolo]/[region] and Ultralytics Detect heads
copies box / objectness rows and starts each class from its mapped class; bad names and maps are
errors naming what is wrong. Tiny shipped cfgs with random weights: no shared data needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_bnn.config import ConfigError, load_config
from kd_bnn.distill.losses import DistillContext, OutputKD
from kd_bnn.engine.build import build_model, build_student
from kd_bnn.models.classmap import (
    ABSENT_LOGIT,
    ClassMapError,
    ClassMappedDetector,
    adapt_classes,
    read_names,
    resolve_class_map,
)
from kd_bnn.models.darknet.model import darknet, random_weights_
from kd_bnn.models.detector import Detections, build_from_skeleton

DATA = ["Car", "Pedestrian", "Cyclist"]
SRC = ["person", "car", "bicycle"]  # a "COCO-like" 3-class teacher in another order
SIZE = (64, 128)
CMAP = {"car": "Car", "person": "Pedestrian", "bicycle": "Cyclist"}


def _teacher(cfg: str = "yolov3-tiny-demo", seed: int = 0):
    return random_weights_(darknet(cfg, class_names=SRC, input_size=SIZE), seed).eval()


def _images(n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ head transfer
@pytest.mark.parametrize("cfg", ["yolov3-tiny-demo", "yolov2-demo"])
def test_darknet_head_transfer_copies_box_obj_and_mapped_class_rows(cfg):
    t = _teacher(cfg)
    new = t.with_classes(["Car", "Pedestrian", "Truck", "Cyclist"], [1, 0, None, 2])
    assert new.class_names == ["Car", "Pedestrian", "Truck", "Cyclist"] and new.num_classes == 4
    assert all(h.num_classes == 4 for h in new.heads)
    assert "classes=4" in new.cfg_text()
    old_sd, new_sd = t.state_dict(), new.state_dict()
    pred = {f"layers.{hl - 1}" for hl in t.head_layers}
    for k, v in new_sd.items():
        if ".".join(k.split(".")[:2]) not in pred:
            assert torch.equal(v, old_sd[k]), k
    for hl, head in zip(t.head_layers, t.heads):
        ow, nw = t.layers[hl - 1].conv.weight, new.layers[hl - 1].conv.weight
        ob, nb = t.layers[hl - 1].conv.bias, new.layers[hl - 1].conv.bias
        for a in range(head.num_anchors):
            o, n = a * 8, a * 9  # 5 + 3 old, 5 + 4 new rows per anchor
            assert torch.equal(nw[n:n + 5], ow[o:o + 5]) and torch.equal(nb[n:n + 5], ob[o:o + 5])
            for j, src in enumerate([1, 0, None, 2]):
                if src is None:
                    assert not nw[n + 5 + j].any()
                    assert torch.isclose(nb[n + 5 + j], ob[o + 5:o + 8].mean())
                else:
                    assert torch.equal(nw[n + 5 + j], ow[o + 5 + src]) and nb[n + 5 + j] == ob[o + 5 + src]
    x = _images()
    with torch.no_grad():
        ro, rn = t(x), new(x)
    do, dn = t.distill_outputs(ro), new.distill_outputs(rn)
    torch.testing.assert_close(dn["obj"], do["obj"])
    torch.testing.assert_close(dn["box"], do["box"])
    torch.testing.assert_close(dn["cls"][..., [0, 1, 3]], do["cls"][..., [1, 0, 2]])
    # the model rebuilds from its skeleton (the .kdbnn path) and takes the state dict strictly
    sk = new.skeleton()
    rebuilt = build_from_skeleton(sk["family"], sk["options"], new.class_names, SIZE)
    rebuilt.load_state_dict(new.state_dict())


def test_yolo_head_transfer_keeps_scores_exactly():
    """[yolo]: independent sigmoids, so the transferred model scores class j exactly as the
    teacher scores its source class."""
    t = _teacher()
    new = t.with_classes(DATA, [1, 0, 2])
    x = _images()
    with torch.no_grad():
        a = ClassMappedDetector(t, resolve_class_map(SRC, DATA, CMAP)).predict(t(x), conf_thres=0.01)
        b = new.predict(new(x), conf_thres=0.01)
    for p, q in zip(a, b):
        assert len(p) == len(q) > 0
        assert torch.equal(p.labels, q.labels)
        torch.testing.assert_close(p.scores, q.scores)
        torch.testing.assert_close(p.boxes, q.boxes)


def test_head_transfer_bad_sources():
    t = _teacher()
    with pytest.raises(ValueError, match="3 class names but 2 sources"):
        t.with_classes(DATA, [0, 1])
    with pytest.raises(ValueError, match="source of class 'Car'"):
        t.with_classes(DATA, [7, 1, 2])


def test_ultralytics_head_transfer_and_skeleton():
    pytest.importorskip("ultralytics")
    from kd_bnn.models.detector import build_detector

    torch.manual_seed(0)
    coco = build_detector("ultralytics", cfg="yolov8n.yaml", input_size=SIZE)  # its own 80 classes
    assert coco.num_classes == 80 and coco.class_names[:2] == ["class0", "class1"]
    coco.eval()
    new = coco.with_classes(["Car", "Pedestrian", "Cyclist"], [2, 0, None])
    assert new.num_classes == 3 and new.detect.nc == 3 and new.head_classes == 80
    x = _images(1)
    with torch.no_grad():
        bo, so = coco.decode(coco(x))
        bn, sn = new.decode(new(x))
    torch.testing.assert_close(bn, bo)
    torch.testing.assert_close(sn[..., :2], so[..., [2, 0]])
    for i, seq in enumerate(new.detect.cv3):
        last = seq[-1]
        assert not last.weight[2].any()
        s = float(new.detect.stride[i])
        assert torch.isclose(last.bias[2], torch.tensor(float(torch.log(torch.tensor(5 / 3 / (640 / s) ** 2)))))
    sk = new.skeleton()
    assert sk["options"] == {"cfg": "yolov8n.yaml", "head_classes": 80}
    rebuilt = build_from_skeleton(sk["family"], sk["options"], new.class_names, SIZE)
    rebuilt.load_state_dict(new.state_dict())
    # training still works on the resized head (the loss reads the new class count)
    new.train()
    total, _ = new.loss(new(x), torch.tensor([[0, 1, 8.0, 8.0, 60.0, 50.0]]))
    assert torch.isfinite(total)


# ------------------------------------------------------------------------------ the wrapper
def test_mapped_detector_contract_and_predictions():
    t = _teacher()
    m = ClassMappedDetector(t, resolve_class_map(SRC, DATA, CMAP))
    assert m.class_names == DATA and m.num_classes == 3 and tuple(m.input_size) == SIZE
    modules = dict(m.named_modules())
    assert m.taps and all(p in modules for p in m.taps.values())
    assert m.prediction_convs() == [f"model.{p}" for p in t.prediction_convs()]
    x = _images()
    with torch.no_grad():
        raw = m(x)
        inner = t.predict(raw, conf_thres=0.01, max_det=10_000)
        mapped = m.predict(raw, conf_thres=0.01, max_det=10_000)
    to_data = {0: 1, 1: 0, 2: 2}
    for p, q in zip(inner, mapped):
        assert torch.equal(q.labels, torch.tensor([to_data[int(v)] for v in p.labels], dtype=torch.long))
        torch.testing.assert_close(q.scores, p.scores)
    with torch.no_grad():
        few = m.predict(raw, conf_thres=0.01, max_det=5)
    assert all(len(d) == 5 for d in few)
    with pytest.raises(NotImplementedError, match="not exported"):
        m.skeleton()


def test_mapped_detector_drops_unmapped_and_merges_many_to_one():
    t = _teacher()
    only_car = ClassMappedDetector(t, resolve_class_map(SRC, DATA, {"car": "Car"}))
    merged = ClassMappedDetector(t, resolve_class_map(SRC, DATA, {"car": "Car", "bicycle": "Car"}))
    x = _images()
    with torch.no_grad():
        raw = t(x)
        inner = t.predict(raw, conf_thres=0.01, max_det=10_000)
        a = only_car.predict(raw, conf_thres=0.01, max_det=10_000)
        b = merged.predict(raw, conf_thres=0.01, max_det=10_000)
    from torchvision.ops import box_iou

    for p, q, r in zip(inner, a, b):
        assert (q.labels == 0).all() and len(q) == int((p.labels == 1).sum())
        union = (p.labels == 1) | (p.labels == 2)
        assert (r.labels == 0).all() and 0 < len(r) < int(union.sum())  # car and bicycle boxes merged by NMS
        iou = box_iou(r.boxes, r.boxes).fill_diagonal_(0)
        assert (iou <= 0.45).all()
        assert torch.all(r.scores[:-1] >= r.scores[1:])


def test_mapped_distill_outputs_and_output_kd_with_the_student():
    t = _teacher()
    m = ClassMappedDetector(t, resolve_class_map(SRC, DATA, {"car": "Car", "person": "Pedestrian"}))
    x = _images()
    with torch.no_grad():
        raw = m(x)
    out, inner = m.distill_outputs(raw), t.distill_outputs(raw)
    assert out["cls"].shape[-1] == 3
    torch.testing.assert_close(out["cls"][..., 0], inner["cls"][..., 1])
    torch.testing.assert_close(out["cls"][..., 1], inner["cls"][..., 0])
    assert (out["cls"][..., 2] == ABSENT_LOGIT).all()  # Cyclist: no teacher class
    torch.testing.assert_close(out["obj"], inner["obj"])
    student = m.transferred()
    assert type(student) is type(t) and student.class_names == DATA
    s_raw = student(x)
    ctx = DistillContext(student_model=student, teacher_model=m, image_size=SIZE,
                         targets=torch.tensor([[0, 0, 8.0, 8.0, 60.0, 50.0]]))
    loss = OutputKD()(s_raw, raw, ctx)
    assert torch.isfinite(loss)
    loss.backward()


def test_mapped_loss_relabels_targets_and_ignores_classes_without_a_source():
    t = _teacher()
    t.train()
    m = ClassMappedDetector(t, resolve_class_map(SRC, DATA, {"car": "Car", "person": "Pedestrian"}))
    m.train()
    x = _images()
    raw = m(x)
    targets = torch.tensor([[0, 0, 8.0, 8.0, 60.0, 50.0], [1, 1, 70.0, 4.0, 90.0, 60.0],
                            [1, 2, 20.0, 10.0, 50.0, 60.0]])
    with pytest.warns(UserWarning, match="class-mapped"):
        total, parts = m.loss(raw, targets, None)
    relabelled = torch.tensor([[0, 1, 8.0, 8.0, 60.0, 50.0], [1, 0, 70.0, 4.0, 90.0, 60.0]])
    ignore = [torch.zeros(0, 4), torch.tensor([[20.0, 10.0, 50.0, 60.0]])]
    ref, _ = t.loss(raw, relabelled, ignore)
    torch.testing.assert_close(total, ref)
    empty, _ = m.loss(raw, torch.zeros(0, 6), None)
    assert torch.isfinite(empty)


# ------------------------------------------------------------------------------ config and bad input
def _names(tmp_path: Path, names: list[str], name: str = "my.names") -> str:
    p = tmp_path / name
    p.write_text("\n".join(names) + "\n")
    return str(p)


def _cfg(overrides: list[str]):
    return load_config(None, ["teacher.family=darknet", "teacher.cfg=yolov3-tiny-demo",
                              "data.input_size=[64, 128]"] + overrides)


def test_build_model_class_map_and_reset_head(tmp_path):
    names = _names(tmp_path, SRC)
    cfg = _cfg([f"teacher.names={names}", "teacher.class_map={car: Car, person: Pedestrian, bicycle: Cyclist}"])
    t = build_model(cfg.teacher, cfg.data.classes, cfg.data.input_size)
    assert isinstance(t, ClassMappedDetector) and t.class_names == DATA and t.source_names == SRC
    cfg2 = load_config(None, [*cfg_overrides(cfg), "student.binary.mode=bwn"])
    student, _ = build_student(t, cfg2)
    assert not isinstance(student, ClassMappedDetector) and student.class_names == DATA
    reset = build_model(_cfg([f"teacher.names={names}", "teacher.reset_head=true",
                              "teacher.class_map={car: Car, person: Pedestrian}"]).teacher, DATA, SIZE)
    assert not isinstance(reset, ClassMappedDetector) and reset.class_names == DATA
    # reset_head without a map: same-named classes only (here none: every class starts fresh)
    fresh = build_model(_cfg([f"teacher.names={names}", "teacher.reset_head=true"]).teacher, DATA, SIZE)
    assert fresh.class_names == DATA
    same = build_model(_cfg(["teacher.reset_head=true"]).teacher, ["class0", "class1", "class2"], SIZE)
    assert same.class_names == ["class0", "class1", "class2"] and not isinstance(same, ClassMappedDetector)


def cfg_overrides(cfg) -> list[str]:
    t = cfg.teacher
    return [f"teacher.family={t.family}", f"teacher.cfg={t.cfg}", f"teacher.names={t.names}",
            f"teacher.class_map={t.class_map}", "data.input_size=[64, 128]"]


def test_bad_class_maps_name_the_class(tmp_path):
    names = _names(tmp_path, SRC)
    with pytest.raises(ConfigError, match=r"teacher.class_map: 'Car' is not a class of the model \(did you mean 'car'\?\)"):
        build_model(_cfg([f"teacher.names={names}", "teacher.class_map={Car: Car}"]).teacher, DATA, SIZE)
    with pytest.raises(ConfigError, match=r"car -> 'Van': 'Van' is not in data.classes \(Car, Pedestrian, Cyclist\)"):
        build_model(_cfg([f"teacher.names={names}", "teacher.class_map={car: Van}"]).teacher, DATA, SIZE)
    with pytest.raises(ConfigError, match="carries no class names: set teacher.names"):
        build_model(_cfg(["teacher.class_map={car: Car}"]).teacher, DATA, SIZE)
    with pytest.raises(ConfigError, match="teacher.class_map.*at least one"):
        _cfg(["teacher.class_map={}"])


def test_names_file_errors(tmp_path):
    four = _names(tmp_path, SRC + ["truck"], "four.names")
    with pytest.raises(ConfigError, match=r"teacher.names: .*four.names lists 4 class names but the model predicts 3 classes"):
        build_model(_cfg([f"teacher.names={four}", "teacher.class_map={car: Car}"]).teacher, DATA, SIZE)
    empty = tmp_path / "empty.names"
    empty.write_text("\n \n")
    with pytest.raises(ClassMapError, match="lists no class names"):
        read_names(empty)
    dup = _names(tmp_path, ["car", "person", "car"], "dup.names")
    with pytest.raises(ClassMapError, match=r"dup.names:3: class 'car' is listed twice \(first at line 1\)"):
        read_names(dup)
    with pytest.raises(FileNotFoundError, match="names file"):
        read_names(tmp_path / "missing.names")


def test_other_classes_without_map_or_reset_say_which_option(tmp_path):
    names = _names(tmp_path, SRC)
    with pytest.raises(ConfigError) as ei:
        build_model(_cfg([f"teacher.names={names}"]).teacher, DATA, SIZE)
    msg = str(ei.value)
    assert "predicts 3 classes (person, car, bicycle)" in msg and "teacher.class_map" in msg
    assert "teacher.reset_head=true" in msg and "evaluation and distillation" in msg and "fine-tune" in msg
    # a cfg of another class count with no key set at all: the same advice (not the cfg's count error)
    with pytest.raises(ConfigError, match=r"the model predicts 3 classes but data.classes has 2 \(Car, Pedestrian\)"):
        build_model(_cfg([]).teacher, ["Car", "Pedestrian"], SIZE)


def test_adapt_classes_is_a_no_op_for_matching_classes():
    t = random_weights_(darknet("yolov3-tiny-demo", class_names=DATA, input_size=SIZE))
    assert adapt_classes(t, DATA, None, False) is t
    assert adapt_classes(t, DATA, None, True) is t
    with pytest.raises(ClassMapError, match="class_map"):
        adapt_classes(t, ["Car", "Cyclist", "Pedestrian"], None, False)


def test_detections_type_is_kept():
    t = _teacher()
    m = ClassMappedDetector(t, resolve_class_map(SRC, DATA, CMAP))
    with torch.no_grad():
        d = m.predict(m(_images(1)), conf_thres=0.5)
    assert isinstance(d[0], Detections) and d[0].labels.dtype == torch.int64


def test_ultralytics_pt_carries_its_names(tmp_path):
    """An Ultralytics .pt names its classes: class_map keys are checked against them (no names
    file), a names file of another length is an error with both numbers, and reset_head gives a
    plain Ultralytics model of data.classes."""
    pytest.importorskip("ultralytics")
    from kd_bnn.models.ultralytics import UltralyticsDetector, build_ultralytics_model

    torch.manual_seed(0)
    model, _ = build_ultralytics_model("yolov8n.yaml", 5)
    model.names = {i: n for i, n in enumerate(["person", "bicycle", "car", "truck", "dog"])}
    pt = tmp_path / "coco5.pt"
    torch.save({"model": model}, pt)
    base = ["teacher.family=ultralytics", f"teacher.weights={pt}", "teacher.trust=true", "data.input_size=[64, 128]"]
    cfg = load_config(None, base + ["teacher.class_map={car: Car, truck: Car, person: Pedestrian}"])
    t = build_model(cfg.teacher, DATA, SIZE)
    assert isinstance(t, ClassMappedDetector) and t.source_names == ["person", "bicycle", "car", "truck", "dog"]
    assert t.class_map.sources == ((2, 3), (0,), ())
    with torch.no_grad():
        d = t.predict(t.eval()(_images(1)), conf_thres=0.0, max_det=20)
    assert set(d[0].labels.tolist()) <= {0, 1}
    student, _ = build_student(t, load_config(None, base + ["teacher.class_map={car: Car, person: Pedestrian}",
                                                             "student.binary.mode=bwn"]))
    assert isinstance(student, UltralyticsDetector) and student.class_names == DATA and student.head_classes == 5
    with pytest.raises(ConfigError, match="'cat' is not a class of the model.*carried by the model"):
        build_model(load_config(None, base + ["teacher.class_map={cat: Car}"]).teacher, DATA, SIZE)
    names = _names(tmp_path, ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"lists 3 class names but the model predicts 5 classes"):
        build_model(load_config(None, base + [f"teacher.names={names}", "teacher.class_map={a: Car}"]).teacher,
                    DATA, SIZE)
    with pytest.raises(ConfigError, match=r"(?s)predicts 5 classes \(person, bicycle, car, truck, dog\).*reset_head"):
        build_model(load_config(None, base).teacher, DATA, SIZE)
    reset = build_model(load_config(None, base + ["teacher.reset_head=true", "teacher.class_map={car: Car}"]).teacher,
                        DATA, SIZE)
    assert isinstance(reset, UltralyticsDetector) and reset.class_names == DATA


def test_ultralytics_skeleton_head_classes_is_bounded():
    pytest.importorskip("ultralytics")
    from kd_bnn.models.detector import SkeletonError, check_skeleton

    with pytest.raises(SkeletonError, match="head_classes: expected int"):
        check_skeleton("ultralytics", {"cfg": "yolov8n.yaml", "head_classes": "80"})
    with pytest.raises(SkeletonError, match=r"head_classes: expected a class count in \[1, 4096\], found 1000000"):
        build_from_skeleton("ultralytics", {"cfg": "yolov8n.yaml", "head_classes": 1_000_000}, DATA, SIZE)
