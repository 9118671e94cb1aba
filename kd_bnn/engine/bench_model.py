"""Whole-model benchmark: a ``.kdbnn`` student on the packed kernels vs its float32 teacher in torch.

Each model is measured in its own fresh process (spawn), so that peak memory is that model's
alone. Two peaks, each the resident set size high-water mark (VmHWM, reset through
``/proc/self/clear_refs``) minus the RSS where it was reset: ``load_rss_delta`` from just before
the model is built (after importing torch and one warm-up conv) to the end of loading - the
model's weights plus whatever loading held at once - and ``peak_rss_delta`` from the loaded
model to the end of the timed forwards: activations and workspaces above the loaded baseline,
what inference costs on top of the weights. Latency: ``warmup`` runs, then the minimum and median of
``repeat`` forwards of one ``(1, 3, H, W)`` input at the file's input size, with
``torch.set_num_threads(threads)`` (the kernels use the same intra-op pool).
The teacher is the same architecture in torch fp32 (the skeleton stored in the file, with float
weights: PyTorch's initialisation, or ``teacher_config``'s teacher weights when given).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

__all__ = ["benchmark_model", "format_model_benchmark"]


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _measure(kind: str, model_path: str, teacher_config: str | None, threads: int, warmup: int,
             repeat: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from kd_bnn.deploy.format import read_metadata

    meta = read_metadata(model_path)
    h, w = (int(v) for v in meta["input_size"])
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    if kind == "runtime":
        from kd_bnn.deploy.kernels import load_extension

        load_extension()  # build/load outside the measured region
    import kd_bnn.deploy.runtime  # noqa: F401  (imports outside the measured region)
    import kd_bnn.models  # noqa: F401

    if teacher_config:
        import kd_bnn.engine.build  # noqa: F401
    torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3), padding=1)  # torch's lazy one-time setup
    reset = _reset_peak()
    rss0 = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    if kind == "runtime":
        from kd_bnn.deploy.runtime import Runtime

        model = Runtime(model_path)
        run = model.__call__
        weight_bytes = model.resident_weight_bytes()
    else:
        if teacher_config:
            from kd_bnn.config import load_config
            from kd_bnn.engine.build import build_model

            cfg = load_config(teacher_config)
            has_w = cfg.teacher.weights is not None and Path(cfg.teacher.weights).is_file()
            model = build_model(cfg.teacher, cfg.data.classes, (h, w), load_weights=has_w)
        else:
            from kd_bnn.deploy.format import FormatError
            from kd_bnn.deploy.schema import build_skeleton

            try:
                model = build_skeleton(meta)
            except FormatError as exc:
                raise FormatError(f"{model_path}: {exc}") from None
        model.eval()
        weight_bytes = sum(t.numel() * t.element_size() for t in
                           {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())

        def run(inp):
            with torch.no_grad():
                return model(inp)
    load_s = time.perf_counter() - t0
    load_peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()
    rss1 = _status_bytes("VmRSS")
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t) * 1e3)
    peak = (_status_bytes("VmHWM") if reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    if kind == "runtime":
        from kd_bnn.deploy.kernels import default_isa, extension_available

        isa = default_isa() if extension_available() else "torch"
    else:
        from kd_bnn.deploy.kernels.bench import torch_isa

        isa = torch_isa()
    return {"kind": kind, "threads": threads, "input_size": [h, w], "load_s": load_s, "isa": isa,
            "min_ms": min(times), "median_ms": statistics.median(times), "repeat": repeat,
            "weight_bytes": weight_bytes, "load_rss_delta": max(load_peak - rss0, 0),
            "peak_rss_delta": max(peak - rss1, 0)}


def benchmark_model(model_path: str | os.PathLike, teacher_config: str | None = None, threads: int = 1,
                    warmup: int = 2, repeat: int = 10) -> dict[str, Any]:
    """Latency, peak memory and sizes of the ``.kdbnn`` runtime and the float teacher."""
    path = str(Path(model_path))
    from kd_bnn.deploy.format import read_metadata

    read_metadata(path)  # fail early with the format's message
    ctx = mp.get_context("spawn")
    rows = {}
    for kind in ("teacher", "runtime"):
        with ctx.Pool(1) as pool:
            rows[kind] = pool.apply(_measure, (kind, path, teacher_config, threads, warmup, repeat))
    t, r = rows["teacher"], rows["runtime"]
    return {
        "model": path,
        "file_bytes": Path(path).stat().st_size,
        "teacher_fp32_bytes": t["weight_bytes"],
        "teacher": t,
        "runtime": r,
        "speedup": t["min_ms"] / r["min_ms"],
        "memory_ratio": t["peak_rss_delta"] / r["peak_rss_delta"] if r["peak_rss_delta"] else float("nan"),
    }


def format_model_benchmark(res: dict[str, Any]) -> str:
    """A small text table of :func:`benchmark_model`'s result."""
    mb = 2**20
    lines = [f"{res['model']}: input {res['runtime']['input_size']}, {res['runtime']['threads']} thread(s), "
             f"min/median of {res['runtime']['repeat']} runs",
             f"{'model':22s} {'min ms':>9s} {'median ms':>10s} {'weights MB':>11s} {'load RSS +MB':>13s} "
             f"{'run RSS +MB':>12s}"]
    for key, label in (("teacher", "float32 teacher (torch)"), ("runtime", ".kdbnn runtime")):
        r = res[key]
        lines.append(f"{label:22s} {r['min_ms']:9.2f} {r['median_ms']:10.2f} {r['weight_bytes'] / mb:11.2f} "
                     f"{r['load_rss_delta'] / mb:13.1f} {r['peak_rss_delta'] / mb:12.1f}")
    lines.append(f"file: {res['file_bytes'] / mb:.2f} MB vs float32 weights {res['teacher_fp32_bytes'] / mb:.2f} MB; "
                 f"speedup {res['speedup']:.2f}x (teacher min / runtime min); inference memory ratio "
                 f"{res['memory_ratio']:.1f}x (teacher / runtime peak RSS above the loaded model)")
    lines.append(f"instruction sets: teacher torch {res['teacher']['isa']}; runtime kernels {res['runtime']['isa']}")
    return "\n".join(lines)
