"""Kernel micro-benchmark: torch fp32 conv2d vs the XNOR, BWN and W1A8 kernels on one layer.

Timings are interleaved (one repetition of every method per round, in a shuffled order so no
method always runs right after torch's large working set) and the minimum over rounds is kept,
so a CPU shared with other jobs biases all methods alike and the ratios stay meaningful.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kd_bnn.deploy import kernels as K
from kd_bnn.deploy.pack import pack_signs

__all__ = ["ConvShape", "DEFAULT_SHAPES", "KernelTiming", "benchmark_kernels", "torch_isa"]


def torch_isa() -> str:
    """The instruction sets torch's own CPU kernels use in this process: ATen's dispatch level
    and oneDNN's cap (``ONEDNN_MAX_CPU_ISA``; oneDNN runs torch's fp32 convolutions)."""
    return f"aten={torch.backends.cpu.get_cpu_capability()}, onednn={os.environ.get('ONEDNN_MAX_CPU_ISA') or 'native'}"


@dataclass(frozen=True)
class ConvShape:
    """One conv layer: ``c_in -> c_out`` at ``size x size``, square kernel, batch ``batch``."""

    c_in: int
    c_out: int
    size: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    batch: int = 1

    @property
    def name(self) -> str:
        return f"{self.kernel}x{self.kernel} {self.c_in}->{self.c_out} @{self.size}x{self.size} s{self.stride}"

    @property
    def macs(self) -> int:
        out = (self.size + 2 * self.padding - self.kernel) // self.stride + 1
        return self.batch * self.c_out * self.c_in * self.kernel**2 * out * out


DEFAULT_SHAPES: tuple[ConvShape, ...] = (
    ConvShape(64, 64, 80),
    ConvShape(128, 128, 40),
    ConvShape(256, 256, 20),
    ConvShape(512, 512, 10),
    ConvShape(512, 1024, 10, kernel=1, padding=0),
)


@dataclass
class KernelTiming:
    """One benchmark row (milliseconds, minimum over interleaved rounds)."""

    shape: str
    threads: int
    isa: str
    clock: str
    torch_fp32_ms: float
    torch_nchw_ms: float
    torch_cl_ms: float
    xnor_ms: float  # float NCHW in -> binarize+pack -> XNOR -> fused transform -> float NCHW out
    xnor_packed_ms: float  # packed (padded) NHWC in -> packed NHWC out (layer-to-layer chaining)
    bwn_ms: float  # float in, bit-packed weights (unpacked per panel), float out
    xnor_speedup: float
    xnor_packed_speedup: float
    bwn_speedup: float
    weight_bytes_fp32: int
    weight_bytes_packed: int
    # int8 in (quantized outside the timed region, as a layer of a W1A8 chain receives it), bit-packed
    # weights, exact integer sums, leaky, int8 out re-quantized for the next layer
    w1a8_ms: float = float("nan")
    w1a8_float_ms: float = float("nan")  # the same with float32 output
    w1a8_speedup: float = float("nan")
    torch_isa: str = ""  # the baseline's instruction sets (:func:`torch_isa`)

    def as_dict(self) -> dict:
        return asdict(self)


def _time_once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


def _methods(
    s: ConvShape, isa: str, gen: torch.Generator
) -> tuple[dict[str, Callable[[], object]], torch.Tensor, torch.Tensor]:
    """The timed callables of one layer, plus its float weight and packed weight."""
    x = torch.randn(s.batch, s.c_in, s.size, s.size, generator=gen)
    w = torch.randn(s.c_out, s.c_in, s.kernel, s.kernel, generator=gen)
    alpha = w.abs().mean(dim=(1, 2, 3))
    bias = torch.randn(s.c_out, generator=gen)
    wf = torch.where(w >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    wf_cl = wf.contiguous(memory_format=torch.channels_last)
    wp = pack_signs(w)
    xp = K.pack_input(x, s.padding, -1.0)
    s_in = float(x.abs().max()) / 127.0
    xq = K.quantize_activations(x, 1.0 / s_in)  # int8 input: prepared outside the timed region
    qscale = alpha * s_in
    panel = K.weight_panel(wp)  # a runtime computes it once at load time
    # the BWN and W1A8 kernels rebuild their table offsets per call, as the runtime runs them
    # (PackedBinaryConv keeps no bwn_prepare / w1a8_prepare offsets: see its bwn path)
    methods: dict[str, Callable[[], object]] = {
        "nchw": lambda: F.conv2d(x, wf, bias, s.stride, s.padding),
        "cl": lambda: F.conv2d(x_cl, wf_cl, bias, s.stride, s.padding),
        "xnor": lambda: K.xnor_conv2d(
            x,
            wp,
            s.c_in,
            s.kernel,
            s.stride,
            s.padding,
            -1.0,
            scale=alpha,
            bias=bias,
            activation="leaky",
            panel=panel,
            isa=isa,
        ),
        "xnor_packed": lambda: K.xnor_conv2d(
            xp,
            wp,
            s.c_in,
            s.kernel,
            s.stride,
            s.padding,
            -1.0,
            scale=alpha,
            bias=bias,
            activation="leaky",
            output="packed",
            x_is_padded=True,
            panel=panel,
            isa=isa,
        ),
        "bwn": lambda: K.bwn_conv2d(
            x, wp, alpha, s.kernel, s.stride, s.padding, bias=bias, isa=isa
        ),
        "w1a8": lambda: K.w1a8_conv2d(
            xq, wp, qscale, s.kernel, s.stride, s.padding, bias, "leaky", 8.0, isa=isa
        ),
        "w1a8_float": lambda: K.w1a8_conv2d(
            xq, wp, qscale, s.kernel, s.stride, s.padding, bias, "leaky", None, isa=isa
        ),
    }
    return methods, w, wp


def benchmark_kernels(
    shapes: tuple[ConvShape, ...] = DEFAULT_SHAPES,
    threads: int = 1,
    repeat: int = 10,
    warmup: int = 2,
    isa: str | None = None,
    seed: int = 0,
    clock: str = "wall",
) -> list[KernelTiming]:
    """Time torch fp32 conv2d (best of NCHW / channels_last), XNOR, BWN and W1A8 kernels per shape.

    ``clock="cpu"`` times with the calling thread's CPU clock (``time.thread_time``), which
    ignores time the thread spends descheduled on a busy machine; it needs ``threads=1``.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', found {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures the calling thread only: use threads=1")
    tick = time.perf_counter if clock == "wall" else time.thread_time
    if not K.extension_available():
        raise RuntimeError(
            "the C++ kernels are unavailable (KDBNN_NO_EXT set or build failed): nothing to benchmark"
        )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    isa_name = isa or K.default_isa()
    K.resolve_isa(isa_name)
    gen = torch.Generator().manual_seed(seed)
    rows: list[KernelTiming] = []
    try:
        with torch.inference_mode():
            for s in shapes:
                methods, w, wp = _methods(s, isa_name, gen)
                for _ in range(warmup):
                    for fn in methods.values():
                        fn()
                best = {k: float("inf") for k in methods}
                order = list(methods.items())
                rng = random.Random(seed)
                for _ in range(repeat):
                    rng.shuffle(order)
                    for k, fn in order:
                        best[k] = min(best[k], _time_once(fn, tick))
                ref = min(best["nchw"], best["cl"])
                rows.append(
                    KernelTiming(
                        shape=s.name,
                        threads=threads,
                        isa=isa_name,
                        clock=clock,
                        torch_fp32_ms=ref,
                        torch_nchw_ms=best["nchw"],
                        torch_cl_ms=best["cl"],
                        xnor_ms=best["xnor"],
                        xnor_packed_ms=best["xnor_packed"],
                        bwn_ms=best["bwn"],
                        xnor_speedup=ref / best["xnor"],
                        xnor_packed_speedup=ref / best["xnor_packed"],
                        bwn_speedup=ref / best["bwn"],
                        weight_bytes_fp32=w.numel() * 4,
                        weight_bytes_packed=wp.numel() * 8,
                        w1a8_ms=best["w1a8"],
                        w1a8_float_ms=best["w1a8_float"],
                        w1a8_speedup=ref / best["w1a8"],
                        torch_isa=torch_isa(),
                    )
                )
    finally:
        torch.set_num_threads(old_threads)
    return rows
