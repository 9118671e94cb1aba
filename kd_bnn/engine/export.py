"""Export a trained experiment: rebuild the student of a config from its checkpoint and write a
``.kdbnn`` (and optionally ONNX), refusing what would destroy a user's file or silently change
the model (a float checkpoint, another input size)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kd_bnn.deploy.export import ExportError, export
from kd_bnn.deploy.onnx import export_onnx

__all__ = ["calibration_scales", "check_outputs", "export_checkpoint"]


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse outputs that would destroy something: a folder, one of the inputs, another output,
    or an existing file that is not a ``.kdbnn`` (for the ``.kdbnn`` output). ``outputs`` and
    ``inputs`` map option names (``--out``) to paths; None entries are ignored."""
    from kd_bnn.deploy.format import is_kdbnn_file

    seen: dict[Path, str] = {Path(v).resolve(): k for k, v in inputs.items() if v is not None}
    for key, value in outputs.items():
        if value is None:
            continue
        p = Path(value)
        if p.is_dir():
            raise ExportError(f"{key} {p}: is a folder; give a file path such as {p / 'model.kdbnn'}")
        r = p.resolve()
        if r in seen:
            raise ExportError(f"{key} {p}: is also the {seen[r]} path; writing there would destroy it")
        seen[r] = key
        if key == "--out" and p.is_file() and not is_kdbnn_file(p):
            raise ExportError(f"{key} {p}: exists and is not a .kdbnn file; refusing to replace it "
                              "(choose another path or remove it yourself)")


def _check_checkpoint_fits(state: dict[str, Any], cfg: Any, checkpoint: str | os.PathLike,
                           allow_float: bool, allow_input_size: bool) -> None:
    """A checkpoint exported as the student must hold a binary student trained at the export's
    input size, unless the caller opts in (see :func:`export_checkpoint`)."""
    size = [int(v) for v in state.get("input_size") or []]
    want = [int(v) for v in cfg.data.input_size]
    if size and size != want and not allow_input_size:
        raise ExportError(
            f"checkpoint {checkpoint} was trained at input size {size} (height, width), but the export "
            f"uses data.input_size={want}; add the override data.input_size=[{size[0]},{size[1]}] to export at "
            "the training size, or --allow-input-size-change to export at the config's size")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    binary_convs = state.get("binary_convs")
    is_float = binary_convs == 0 if binary_convs is not None else ("student" in saved and saved["student"] is None)
    if cfg.student is not None and is_float and not allow_float:
        raise ExportError(
            f"checkpoint {checkpoint} holds a float model (no binary convs: a teacher), but the config "
            "describes a binary student; exporting it would binarize the float weights without training. "
            "Export the student's checkpoint (runs/<name>/best.pt), or pass --binarize-float to do exactly that")


def calibration_scales(model: Any, images: list[Path], input_size: tuple[int, int],
                       batch: int = 8) -> tuple[dict[str, float], int]:
    """W1A8 input scales of ``model``'s binary-weight convs from image files, letterboxed to
    ``input_size`` as at evaluation (`kd_bnn.deploy.quantize.calibrate_activations`)."""
    import torch

    from kd_bnn.data.transforms import read_letterboxed
    from kd_bnn.deploy.quantize import calibrate_activations

    if not images:
        raise ExportError("calibration needs at least one image")

    def batches():
        for i in range(0, len(images), batch):
            yield torch.stack([read_letterboxed(f, input_size)[1] for f in images[i:i + batch]])

    scales, n = calibrate_activations(model, batches())
    if not scales:
        raise ExportError("8-bit activations: the model has no binary-weight conv that can run them "
                          "(W1A8 is for bwn students; XNOR convs already take binary inputs)")
    return scales, n


def export_checkpoint(config: str | os.PathLike | Any, checkpoint: str | os.PathLike | None,
                      out: str | os.PathLike, overrides: list[str] | None = None,
                      onnx: str | os.PathLike | None = None, allow_float: bool = False,
                      allow_input_size_change: bool = False, calibration: list[Path] | None = None,
                      act_bits: int | None = None) -> dict[str, Any]:
    """Rebuild the student of an experiment config (from ``checkpoint``, or randomly initialised
    when None, to size an architecture before training) and export it to ``out``.

    Refused: an ``out`` / ``onnx`` that is a folder, the checkpoint or config itself, or an existing
    non-``.kdbnn`` file; a float (teacher) checkpoint for a binary student unless ``allow_float``;
    a checkpoint trained at another input size unless ``allow_input_size_change``.
    ``act_bits=8`` with ``calibration`` (image files): the binary-weight convs run on 8-bit
    activations (W1A8) with input scales measured on those images (`calibration_scales`).
    Returns the :func:`export` report plus ``config``, ``checkpoint``, (with ``onnx``) the
    ONNX result and (W1A8) ``w1a8_convs``.
    """
    from kd_bnn.deploy.quantize import ACT_BITS

    if act_bits not in (None, 32, ACT_BITS):
        raise ExportError(f"--act-bits {act_bits}: supported are {ACT_BITS} (W1A8) and 32 (float activations)")
    if act_bits == ACT_BITS and not calibration:
        raise ExportError(f"--act-bits {ACT_BITS} needs --calibrate DIR: images to measure the activation ranges on")
    if calibration and act_bits != ACT_BITS:
        raise ExportError(f"--calibrate is for 8-bit activations: add --act-bits {ACT_BITS}")
    from kd_bnn.config import ExperimentConfig, load_config

    config_path = None if isinstance(config, ExperimentConfig) else config
    check_outputs({"--out": out, "--onnx": onnx}, {"--checkpoint": checkpoint, "--config": config_path})
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides or [])
    if checkpoint is None:
        from kd_bnn.binary.convert import apply_stages
        from kd_bnn.engine.build import build_model, build_student

        teacher = build_model(cfg.teacher, cfg.data.classes, cfg.data.input_size, load_weights=False)
        if cfg.student is None:
            model = teacher
        else:
            model, _ = build_student(teacher, cfg, init_weights=False)  # sizing: random init
            apply_stages(model, cfg.student.binary, 10**9)
    else:
        from kd_bnn.engine.build import load_student
        from kd_bnn.engine.checkpoint import load_checkpoint

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        _check_checkpoint_fits(load_checkpoint(checkpoint), cfg, checkpoint, allow_float, allow_input_size_change)
        model = load_student(cfg, checkpoint)
    model.eval()
    extra: dict[str, Any] = {"source": {"config": str(config) if not isinstance(config, ExperimentConfig)
                                        else cfg.name, "checkpoint": None if checkpoint is None else str(checkpoint)}}
    scales, n_images = {}, 0
    if act_bits == ACT_BITS:
        scales, n_images = calibration_scales(model, list(calibration or []), tuple(cfg.data.input_size))
    report = export(model, out, tuple(cfg.data.input_size), extra, act_scales=scales, calibration_images=n_images)
    if scales:
        report["w1a8_convs"] = len(scales)
        report["calibration_images"] = n_images
    report["config"] = extra["source"]["config"]
    report["checkpoint"] = extra["source"]["checkpoint"]
    if onnx is not None:
        report["onnx"] = export_onnx(model, onnx, tuple(cfg.data.input_size))
    return report
