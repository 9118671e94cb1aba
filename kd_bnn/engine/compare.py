"""Compare binary students at an equal training budget (issue: binary-friendly students).

For each student config, train it without and with knowledge transfer from the same trained
teacher, export it to ``.kdbnn`` and time it on the packed `Runtime` (1 thread). One row per
run: params, packed MB, compression, KITTI AP_R40 (Moderate) per class, latency. The students
are a binary copy of the teacher (Xu et al., ICRA 2019), BinaryDenseNet-YOLO (Bethge et al.,
2019) and Bi-Real-YOLO (Liu et al., ECCV 2018).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from kd_bnn.config import ExperimentConfig, load_config
from kd_bnn.deploy.runtime import Runtime
from kd_bnn.engine.build import load_student
from kd_bnn.engine.evaluate import evaluate_model
from kd_bnn.engine.experiment import model_size, run_experiment
from kd_bnn.engine.export import export_checkpoint
from kd_bnn.io import atomic_write_text


def runtime_latency_ms(path: str | Path, threads: int = 1, warmup: int = 2, repeat: int = 10) -> float:
    """Minimum forward latency (ms) of a `.kdbnn` model on the packed runtime, batch 1."""
    old = torch.get_num_threads()
    try:
        rt = Runtime(path, threads=threads)
        h, w = rt.input_size
        x = torch.rand(1, 3, int(h), int(w), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for _ in range(warmup):
                rt(x)
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                rt(x)
                best = min(best, time.perf_counter() - t0)
        return best * 1000.0
    finally:
        torch.set_num_threads(old)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"PATH[@key=value@key=value...]"`` -> (config path, overrides of that variant only),
    e.g. ``configs/demo.yaml@student.binary.mode=xnor`` for an XNOR copy of the teacher."""
    path, *overrides = spec.split("@")
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"student variant {spec!r}: expected PATH@key=value..., found {o!r} without '='")
    return path, overrides


def compare_students(configs: list[str], teacher_weights: str, epochs: int, out_dir: str | Path,
                     overrides: list[str] | None = None, threads: int = 1,
                     progress: bool | None = False) -> list[dict[str, Any]]:
    """Train every config in ``configs`` (``PATH[@key=value...]``, see `parse_variant`) without
    and with KD from ``teacher_weights`` for ``epochs`` epochs each, export, evaluate and time;
    returns the table rows. Rows already in ``out_dir/compare_students.json`` (same run name)
    are kept, so an interrupted comparison resumes where it stopped."""
    out_dir = Path(out_dir)
    table = out_dir / "compare_students.json"
    done = {r["name"]: r for r in json.loads(table.read_text())} if table.is_file() else {}
    rows = []
    for spec in configs:
        path, variant = parse_variant(spec)
        for kd in (False, True):
            base = load_config(path, (overrides or []) + variant)
            name = f"{base.name}_{base.student.binary.mode}_{'kd' if kd else 'nokd'}_e{epochs}_s{base.seed}"
            if name in done:
                rows.append(done[name])
                continue
            cfg: ExperimentConfig = load_config(path, (overrides or []) + variant + [
                f"name={name}", f"output_dir={out_dir}", f"teacher.weights={teacher_weights}",
                "teacher_train=null", f"train.epochs={epochs}", f"train.eval_interval={epochs}",
                f"distill.enabled={str(kd).lower()}"])
            res = run_experiment(cfg, progress=progress)
            ckpt = res["student"]["checkpoint"]
            student = load_student(cfg, ckpt).eval()
            metrics = res["student"]["metrics"] if res["student"].get("metrics_of_checkpoint") else None
            if metrics is None:
                metrics, _ = evaluate_model(student, cfg)
            kdbnn = Path(res["run_dir"]) / "student.kdbnn"  # the folder the run used (name-2 after a stop)
            export_checkpoint(cfg, ckpt, kdbnn)
            size = model_size(student, tuple(cfg.data.input_size))
            family = cfg.student.model.family if cfg.student.model is not None else f"{cfg.teacher.family} copy"
            rows.append({
                "name": name, "student": family, "mode": cfg.student.binary.mode, "kd": kd, "seed": cfg.seed,
                **size, "file_mb": kdbnn.stat().st_size / 2**20,
                "ap_r40_moderate": {c: metrics.get(f"{c}/moderate/R40", float("nan")) for c in cfg.data.classes},
                "latency_ms": runtime_latency_ms(kdbnn, threads=threads),
            })
            atomic_write_text(table, json.dumps(rows + [r for n, r in done.items()
                                                        if n not in {x["name"] for x in rows}], indent=2))
    atomic_write_text(out_dir / "compare_students.txt", format_comparison(rows, threads))
    return rows


def format_comparison(rows: list[dict[str, Any]], threads: int = 1) -> str:
    """Markdown table of `compare_students` rows."""
    classes = list(rows[0]["ap_r40_moderate"]) if rows else []
    head = ("| student | mode | KD | params | packed MB | compression | "
            + " | ".join(f"{c} AP_R40 mod" for c in classes) + f" | runtime ms ({threads} thread) |")
    lines = [head, "|" + "---|" * (7 + len(classes))]
    for r in rows:
        aps = " | ".join(f"{r['ap_r40_moderate'][c]:.2f}" for c in classes)
        lines.append(f"| {r['student']} | {r['mode']} | {'yes' if r['kd'] else 'no'} | {r['params'] / 1e6:.2f} M | "
                     f"{r['packed_mb']:.3f} | {r['compression']:.1f}x | {aps} | {r['latency_ms']:.1f} |")
    return "\n".join(lines) + "\n"
