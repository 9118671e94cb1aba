"""A .kdbnn is data: its skeleton is rebuilt only from what the file holds, never from a file it
names, never with ``trust``, never through anything that unpickles (issue: hostile .kdbnn)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from toolload import load_tool

from kd_bnn.binary import binarize
from kd_bnn.deploy.export import ExportError, export
from kd_bnn.deploy.format import FormatError, load_container, save_container
from kd_bnn.deploy.runtime import Runtime
from kd_bnn.models.darknet.model import darknet, random_weights_
from kd_bnn.models.detector import SkeletonError, check_skeleton

CLASSES = ["Car", "Pedestrian", "Cyclist"]
SIZE = (64, 192)


class _Payload:
    """Unpickling this touches ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> pathlib.Path:
    teacher = random_weights_(darknet("yolov2-demo", class_names=CLASSES, input_size=SIZE), 0)
    student = binarize(teacher, {"mode": "bwn"})[0].eval()
    p = tmp_path_factory.mktemp("kdbnn") / "good.kdbnn"
    export(student, p, SIZE)
    return p


def _hostile(good: pathlib.Path, dst: pathlib.Path, skeleton: dict) -> pathlib.Path:
    blobs, meta = load_container(good)
    meta["skeleton"] = skeleton
    save_container(dst, blobs, meta)  # consistent checksum: only the skeleton check can refuse it
    return dst


def _evil_pt(folder: pathlib.Path) -> pathlib.Path:
    torch.save({"model": _Payload(str(folder / "PWNED"))}, folder / "evil.pt")
    return folder / "evil.pt"


HOSTILE = {
    "ultralytics-pt-trust": {"family": "ultralytics", "options": {"cfg": "evil.pt", "trust": True}},
    "ultralytics-weights": {"family": "ultralytics", "options": {"weights": "evil.pt", "trust": True}},
    "ultralytics-pt-name": {"family": "ultralytics", "options": {"cfg": "evil.pt"}},
    "ultralytics-path": {"family": "ultralytics", "options": {"cfg": "./evil.yaml"}},
    "mobilenet-weights": {"family": "mobilenet_yolo", "options": {"weights": "evil.pt"}},
    "mobilenet-backbone": {"family": "mobilenet_yolo", "options": {"backbone_weights": "evil.pt"}},
    "bireal-trust": {"family": "bireal", "options": {"preset": "small", "trust": True}},
    "darknet-extra-key": {"family": "darknet", "cfg_text": "[net]\n", "weights": "evil.pt"},
    "darknet-options-extra": {"family": "darknet", "options": {"cfg_text": "[net]\n", "weights": "evil.pt"}},
    "options-and-extra": {"family": "bireal", "options": {"preset": "small"}, "weights": "evil.pt"},
    "unknown-family": {"family": "os.system", "options": {}},
    "value-not-plain": {"family": "bireal", "options": {"preset": {"__class__": "x"}}},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_skeleton_refused_by_runtime(good_file, tmp_path, monkeypatch, case):
    _evil_pt(tmp_path)
    monkeypatch.chdir(tmp_path)  # the reproduction named the payload by a relative path
    p = _hostile(good_file, tmp_path / "hostile.kdbnn", HOSTILE[case])
    with pytest.raises(FormatError, match="hostile.kdbnn: .*(skeleton|expected the bare name)"):
        Runtime(p)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("tool,args", [
    ("infer", ["--images", "imgs", "--out", "out"]),
    ("benchmark", []),
])
def test_hostile_kdbnn_through_the_tools(good_file, tmp_path, monkeypatch, capsys, tool, args):
    """The exact reproduction: tools/infer.py and tools/benchmark.py model on a file whose skeleton
    says ``family: ultralytics, cfg: evil.pt, trust: true``, with evil.pt beside it."""
    _evil_pt(tmp_path)
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    _hostile(good_file, tmp_path / "hostile.kdbnn",
             {"family": "ultralytics", "options": {"cfg": "evil.pt", "trust": True}})
    argv = (["model"] if tool == "benchmark" else []) + ["--model", "hostile.kdbnn"] + args
    rc = load_tool(tool).main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "unknown keys ['trust']" in err and "hostile.kdbnn" in err
    assert not (tmp_path / "PWNED").exists()


def test_ultralytics_name_is_looked_up_in_the_package_not_the_working_dir(tmp_path, monkeypatch):
    """A yolov8n.yaml in the working directory (whose module names could name any function of
    Ultralytics' namespace) is never read when a skeleton names yolov8n.yaml."""
    pytest.importorskip("ultralytics")
    from kd_bnn.models.ultralytics import shipped_model_yaml

    (tmp_path / "yolov8n.yaml").write_text("backbone: [[-1, 1, torch_safe_load, ['evil.pt']]]\nhead: []\n")
    monkeypatch.chdir(tmp_path)
    d = shipped_model_yaml("yolov8n.yaml")
    assert d["scale"] == "n" and all(layer[2] != "torch_safe_load" for layer in d["backbone"])
    with pytest.raises(SkeletonError, match="no such architecture shipped"):
        shipped_model_yaml("evil.yaml")


@pytest.mark.parametrize("family,options,match", [
    ("bireal", {"preset": "small", "cfg": "x.cfg"}, r"unknown keys \['cfg'\]"),
    ("bireal", {"widths": "64"}, r"bireal.widths: expected ints, found '64'"),
    ("mobilenet_yolo", {"width_mult": True}, r"mobilenet_yolo.width_mult: expected float, found True"),
    ("mobilenet_yolo", {"anchors": [[1.0, -2.0]]}, r"expected anchors\?"),
    ("binary_densenet", {"activation": "../x"}, r"expected name\?"),
    ("nope", {}, r"skeleton family 'nope' cannot be rebuilt from a .kdbnn; rebuildable families: "),
])
def test_skeleton_schema_messages(family, options, match):
    import kd_bnn.models  # noqa: F401  (registers the schemas)

    with pytest.raises(SkeletonError, match=match):
        check_skeleton(family, options)


def test_export_refuses_a_skeleton_the_loader_would_refuse(tmp_path):
    from kd_bnn.models.detector import build_detector

    m = build_detector("bireal", class_names=CLASSES, input_size=SIZE, preset="small").eval()
    with pytest.raises(ExportError, match=r"unknown keys \['trust'\]"):
        export(m, tmp_path / "m.kdbnn", SIZE, {"skeleton": {"family": "bireal",
                                                             "options": {"preset": "small", "trust": True}}})
    assert not (tmp_path / "m.kdbnn").exists()
    assert os.listdir(tmp_path) == []


def test_export_of_an_ultralytics_user_yaml_is_refused(tmp_path):
    """A model built from a user's own yaml cannot be described by data alone: refused at export."""
    pytest.importorskip("ultralytics")
    import kd_bnn.models  # noqa: F401
    from kd_bnn.models.detector import build_detector

    src = pathlib.Path(__import__("ultralytics").__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    own = tmp_path / "arch" / "mine.yaml"
    own.parent.mkdir()
    own.write_text(src.read_text())
    m = build_detector("ultralytics", cfg=str(own), class_names=CLASSES, input_size=(64, 64)).eval()
    with pytest.raises(ExportError, match="only from the name of a yaml shipped with Ultralytics"):
        export(m, tmp_path / "u.kdbnn", (64, 64))
    shipped = build_detector("ultralytics", cfg="yolov8n.yaml", class_names=CLASSES, input_size=(64, 64)).eval()
    assert shipped.skeleton() == {"family": "ultralytics", "options": {"cfg": "yolov8n.yaml"}}


# ----------------------------------------------------------------------------- tools/export.py outputs

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def _student_checkpoint(path: pathlib.Path, size=(96, 320), binary_convs: int | None = None,
                        student_section: bool = True) -> pathlib.Path:
    from kd_bnn.config import config_to_dict, load_config
    from kd_bnn.engine.build import build_model, build_student
    from kd_bnn.engine.checkpoint import save_checkpoint

    cfg = load_config(DEMO, [f"data.input_size=[{size[0]},{size[1]}]"])
    teacher = random_weights_(build_model(cfg.teacher, cfg.data.classes, size, False), 3)
    model = build_student(teacher, cfg)[0] if binary_convs != 0 else teacher
    saved = config_to_dict(cfg)
    if not student_section:
        saved["student"] = None
    state = {"model": model.state_dict(), "input_size": list(size), "config": saved}
    if binary_convs is not None:
        state["binary_convs"] = binary_convs
    save_checkpoint(path, state)
    return path


def test_export_out_onto_its_own_checkpoint_is_refused(tmp_path, capsys):
    """Reproduction: ``tools/export.py --checkpoint mine.pt --out mine.pt`` replaced the checkpoint."""
    ckpt = _student_checkpoint(tmp_path / "mine.pt")
    before = ckpt.read_bytes()
    rc = load_tool("export").main(["--config", DEMO, "--checkpoint", str(ckpt), "--out", str(ckpt),
                                   "data.input_size=[96,320]"])
    assert rc == 2
    assert "--out" in (err := capsys.readouterr().err) and "also the --checkpoint path" in err
    assert ckpt.read_bytes() == before
    # the same file through another spelling of its path, and the --json report onto it
    rc = load_tool("export").main(["--config", DEMO, "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.kdbnn"),
                                   "--json", str(tmp_path / "." / "mine.pt"), "data.input_size=[96,320]"])
    assert rc == 2 and ckpt.read_bytes() == before and not (tmp_path / "m.kdbnn").exists()


def test_export_out_onto_a_folder_or_a_foreign_file_is_refused(tmp_path, capsys):
    rc = load_tool("export").main(["--config", DEMO, "--out", str(tmp_path), "data.input_size=[96,320]"])
    assert rc == 2 and "is a folder" in capsys.readouterr().err
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    rc = load_tool("export").main(["--config", DEMO, "--out", str(precious), "data.input_size=[96,320]"])
    assert rc == 2 and "is not a .kdbnn file" in capsys.readouterr().err and precious.read_text() == "mine"
    # an earlier export is replaced, as a user re-exporting expects
    out = tmp_path / "m.kdbnn"
    assert load_tool("export").main(["--config", DEMO, "--out", str(out), "data.input_size=[96,320]"]) == 0
    assert load_tool("export").main(["--config", DEMO, "--out", str(out), "data.input_size=[96,320]"]) == 0


def test_export_of_a_float_teacher_checkpoint_needs_the_flag(tmp_path, capsys):
    """Reproduction: exporting the teacher's best.pt as the student silently binarized it."""
    for name, kw in (("marked.pt", {"binary_convs": 0}), ("teacher_only.pt", {"student_section": False})):
        ckpt = _student_checkpoint(tmp_path / name, **kw)
        argv = ["--config", DEMO, "--checkpoint", str(ckpt), "--out", str(tmp_path / f"{name}.kdbnn"),
                "data.input_size=[96,320]"]
        assert load_tool("export").main(argv) == 2
        assert "holds a float model" in capsys.readouterr().err and not (tmp_path / f"{name}.kdbnn").exists()
        assert load_tool("export").main(argv + ["--binarize-float"]) == 0


def test_export_at_another_input_size_needs_the_flag(tmp_path, capsys):
    ckpt = _student_checkpoint(tmp_path / "s.pt", size=(96, 320), binary_convs=8)
    argv = ["--config", DEMO, "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.kdbnn"), "data.input_size=[128,416]"]
    assert load_tool("export").main(argv) == 2
    err = capsys.readouterr().err
    assert "trained at input size [96, 320]" in err and "data.input_size=[96,320]" in err
    assert load_tool("export").main(argv + ["--allow-input-size-change"]) == 0
    assert load_tool("export").main(argv[:-1] + ["data.input_size=[96,320]"]) == 0


# ----------------------------------------------------------------------------- weights files that are pickles

def test_darknet_weights_that_are_a_pickle_are_a_one_line_error(tmp_path):
    """Reproduction: a darknet ``teacher.weights`` that is a pickle gave a traceback."""
    evil = _evil_pt(tmp_path)
    with pytest.raises(ValueError, match=r"evil.pt: not a state dict this toolkit reads safely .*UnpicklingError"):
        darknet("yolov2-demo", weights=evil, class_names=CLASSES, input_size=SIZE)
    assert not (tmp_path / "PWNED").exists()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        darknet("yolov2-demo", weights=junk, class_names=CLASSES, input_size=SIZE)


def test_unknown_family_is_a_value_error_with_the_choices(tmp_path, capsys):
    """Reproduction: an unknown family was a KeyError traceback; now one ``error:`` line."""
    from kd_bnn.models.detector import build_detector
    from kd_bnn.registry import UnknownNameError

    with pytest.raises(ValueError, match=r"^unknown detector 'darknt' \(did you mean darknet\?\); registered: "):
        build_detector("darknt")
    assert issubclass(UnknownNameError, KeyError)
    rc = load_tool("export").main(["--config", DEMO, "--out", str(tmp_path / "x.kdbnn"), "teacher.family=nope"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: unknown detector 'nope'")


def test_importing_ultralytics_leaves_pil_open_alone():
    """Ultralytics patches PIL.Image.open process-wide (a HEIF-plugin installer on unidentified
    files); through kd_bnn the patch is undone, so a corrupt image stays a PIL error the data checks name."""
    pytest.importorskip("ultralytics")
    from PIL import Image

    from kd_bnn.offline import import_ultralytics

    before = Image.open
    import_ultralytics()
    assert Image.open is before


def test_import_kd_bnn_leaves_the_users_environment_alone():
    """`import kd_bnn` no longer sets YOLO_OFFLINE / YOLO_CONFIG_DIR ... for the whole process; the
    offline settings apply to the toolkit's own Ultralytics import only, and are removed after it."""
    import subprocess
    import sys

    code = """
import os
keys = ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_VERBOSE", "YOLO_CONFIG_DIR", "NO_ALBUMENTATIONS_UPDATE")
before = {k: os.environ.get(k) for k in keys}
import kd_bnn, kd_bnn.models, kd_bnn.deploy
assert {k: os.environ.get(k) for k in keys} == before, "import changed the environment"
from kd_bnn.offline import import_ultralytics
u = import_ultralytics()
assert {k: os.environ.get(k) for k in keys} == before, "import_ultralytics left variables set"
import ultralytics.utils as uu
assert uu.ONLINE is False and uu.AUTOINSTALL is False, (uu.ONLINE, uu.AUTOINSTALL)
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_VERBOSE", "YOLO_CONFIG_DIR", "NO_ALBUMENTATIONS_UPDATE")}
    pytest.importorskip("ultralytics")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
