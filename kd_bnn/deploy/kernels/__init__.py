"""Binary convolution kernels: C++ extension build/load, run-time ISA dispatch, torch fallback.

The ops, each with a C++ path (the ``*.cpp`` files of this folder, one per concern and ISA, see
``common.h``; built once with ``torch.utils.cpp_extension.load`` and cached under
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/kd_bnn/kernels`` in a folder named by the hash of the
sources' contents, so editing any file rebuilds and identical sources share one build) and a
pure-torch path with identical results:

* :func:`xnor_conv2d` - binary activations x binary weights (XNOR-Net, Rastegari et al. 2016):
  ``dot = K - 2*popcount(a XOR w)`` with ``K = C_in*KH*KW``, exact integers, then the fused
  transform ``dot*scale[c] + bias[c]``, activation, and float / int / re-packed output.
  AVX2 path: PSHUFB nibble-lookup popcount of 2 pixels x 16 channels (byte counters widened
  every 31 words), AVX2 binarize+pack of the float input and AVX2 epilogue (transform, 8x8
  transposed NCHW stores); re-packed output compares each popcount with per-channel integer
  bounds that are exactly equivalent to ``transform(dot) >= 0`` (finite scale/bias; else the
  float test).
* Packed chains (``kd_bnn.models.binary_students_packed``): :func:`xnor_conv2d`'s fused epilogue
  (residual, float + packed output, popcount bounds, a per-channel map of the output as a fused
  multiply-add where :func:`output_affine` proves it exact, else a table), and
  :func:`concat_packed` (one pass: packed parts copied or shifted, float parts binarized, against
  :func:`sign_thresholds` of a BatchNorm where given).
* :func:`bwn_conv2d` - float activations x packed binary weights ``alpha[c]*sign(W)`` (the BWN
  case of Xu et al., ICRA 2019), weights held bit-packed (32x smaller), never a whole layer's
  float weights. ``avx2`` and ``avx512`` paths: lookup-table conv (Jeon et al., "BiQGEMM", SC
  2020; one source, ``bwn_lut.h``, over a 16-pixel vector: one zmm or two ymm): per tile of 16
  output pixels and group of g = 4 or 5 input channels at one tap, the 2^g sums
  ``+-x0+-x1+-...`` are tabulated once and each output channel adds the entry its g weight bits
  select (``vaddps zmm, zmm, [table + s*64]``: 16 pixels x g MACs per add), then
  ``alpha*sum + bias`` and the activation in the same pass. For stride-1 3x3 layers (rows >= 16
  wide, <= 128 output channels) a second kernel tiles 16 columns x 2 output rows so the KH taps of
  one kernel column share their tables; a third (other stride-1 layers with rows >= 48 wide, <= 128
  output channels) tiles 64 positions as 4 interleaved vectors so the KW taps of one kernel row
  share theirs. All read the input in place (padding reads 0). Transient
  memory per call: one offset byte per g weights (about 1/16 of a float copy; none with
  :func:`bwn_prepare`'s ``prepared=``, computed once per layer), per thread one pass of tables
  (16-32 KB) + the accumulators. ``scalar``/``popcnt`` paths
  (portable C++): direct conv on an NHWC copy with one 16-channel panel unpacked to floats per
  thread (``C_in*KH*KW*16`` floats). Sums are re-associated, so results match ``F.conv2d`` to
  float rounding (the tests check a per-output bound, ``tests/test_deploy_kernels.py``), not bit
  for bit. Tuning: ``KDBNN_BWN_G`` (4..6), ``KDBNN_BWN_R4`` (0/1), ``KDBNN_BWN_ROWS`` (rows per
  tile, 2..3, 0 = off), ``KDBNN_BWN_PG`` (tables per pass) override the per-layer plan.
* :func:`w1a8_conv2d` - int8 activations x packed binary weights (W1A8), exact: int32 sums
  ``sum sign(W) * xq``, then the float32 epilogue ``float(acc)*scale[o] + bias[o]``, activation,
  and float or re-quantized int8 output (:func:`quantize_activations`' rounding), bit for bit the
  same as its torch path. ``avx2`` and ``avx512`` paths: the BWN lookup table in integers
  (``w1a8_lut.h``; T-MAC / BiQGEMM style): per 32 output positions and g = 4 or 5 input channels
  at one tap an int16 table of the 2^g signed sums, one ``vpaddw`` per g MACs x 32 positions,
  int16 sums widened to int32 before they could overflow (proved bound, -128 included); a
  kw-sharing variant (``avx512``, stride 1) tabulates a kernel row once for its KW taps. The input
  is copied once per call (zero-padded, stride phases split, int8); the table offsets (one byte per
  g weights) are rebuilt per call, or computed once per layer by :func:`w1a8_prepare` (its
  ``prepared=``). ``scalar``/``popcnt``: a direct int32 conv (``w1a8.cpp``).
  Tuning: ``KDBNN_W1A8_G`` (4/5), ``KDBNN_W1A8_PG`` (tables per pass), ``KDBNN_W1A8_R4`` (0/1).
* :func:`stem_conv2d` - a float conv with few input channels (a detector's first conv,
  ``C_in <= 8``): direct conv vectorised over the output width from zero-padded per-row copies of
  the input (``stem.cpp``; AVX-512F / AVX2+FMA row kernels in ``stem_x86.cpp``), bias and
  activation fused; ``F.conv2d`` is slow there (its reduction is only ``C_in*KH*KW`` long).
  Optionally fused with a following Darknet 2x2 stride-2 max-pool (``pool=``: only the pooled map
  is written, exact).
* :func:`pointwise_conv2d` - a float 1x1 conv on the same row kernels over the flattened plane
  (about 2x torch's GEMM at one thread on AVX-512).

ISA paths (``ISAS``): ``avx512`` (AVX-512 VPOPCNTDQ), ``avx2``, ``popcnt``, ``scalar``; the best
one the CPU has is used unless ``isa=`` or the ``KDBNN_ISA`` environment variable names one.
``KDBNN_NO_EXT=1`` forces the torch fallback (``backend="torch"`` does it per call); a missing
compiler or ninja gives one warning and the fallback, never a crash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from kd_bnn.binary.blocks import map_channels, shortcut_kind
from kd_bnn.deploy.pack import num_words, pack_activations, unpack_activations, unpack_signs

__all__ = [
    "ISAS",
    "ACTIVATIONS",
    "load_extension",
    "extension_available",
    "available_isas",
    "default_isa",
    "resolve_isa",
    "weight_panel",
    "pack_input",
    "pad_packed",
    "concat_packed",
    "sign_thresholds",
    "xnor_conv2d",
    "popcount_bounds",
    "output_table",
    "OutputMap",
    "output_affine",
    "bwn_conv2d",
    "bwn_prepare",
    "w1a8_prepare",
    "w1a8_conv2d",
    "quantize_activations",
    "stem_conv2d",
    "pointwise_weights",
    "pointwise_conv2d",
    "SHORTCUT_KINDS",
    "block_epilogue",
]

ISAS: tuple[str, ...] = ("scalar", "popcnt", "avx2", "avx512")
ACTIVATIONS: dict[str, int] = {"none": 0, "linear": 0, "relu": 1, "leaky": 2}
_MODES = {"int": 0, "float": 1, "packed": 2}
#: Channel maps of a binary block's real shortcut (kd_bnn.binary.blocks), as block.cpp codes them.
SHORTCUT_KINDS: dict[str, int] = {"none": 0, "identity": 1, "repeat": 2, "fold": 3}
_CO_BLOCK = 16
_DIR = Path(__file__).resolve().parent
_EXT_NAME = "kdbnn_binconv"
_BUILT = "BUILT"  # written into the build folder once the module built and loaded

_lock = threading.Lock()
_ext: Any = None
_ext_tried = False
_warned = False
_isa_cache: dict[int, list[str]] = {}


def _sources() -> list[Path]:
    """The extension's files: every ``*.cpp`` (compiled) and ``*.h`` of this folder, by name
    (hidden files such as editor locks excluded)."""
    return sorted(
        p
        for p in _DIR.iterdir()
        if p.suffix in (".cpp", ".h") and not p.name.startswith(".") and p.is_file()
    )


def _omp_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _build_flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags.

    -fopenmp: at::parallel_for is OpenMP-based in torch's CPU builds and runs serially without
    it (torch ships libgomp.so.1, which the module then shares).
    """
    return ["-O3", *_omp_flags()], _omp_flags()


def _cache_dir(files: list[Path] | None = None) -> Path:
    """Build folder keyed by content: names and bytes of all sources, plus what the binary
    depends on besides them (torch and Python versions, machine, flags), never the checkout path,
    so editing any file rebuilds and two checkouts with identical sources share one build."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "kd_bnn" / "kernels"
    h = hashlib.sha256()
    for p in _sources() if files is None else files:
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode())
        h.update(data)
    cflags, ldflags = _build_flags()
    env = (torch.__version__, sys.implementation.cache_tag, platform.machine(), cflags, ldflags)
    h.update(repr(env).encode())
    return base / f"binconv_{h.hexdigest()[:16]}"


def _stage_sources(files: list[Path], dst: Path) -> list[str]:
    """Copy the sources into ``dst`` (the content-keyed build folder) and return the ``.cpp`` paths.

    Compiling the copies makes the build commands independent of the checkout. A file is only
    written when missing or different, so ninja does not see a newer source and recompile.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for p in files:
        data, target = p.read_bytes(), dst / p.name
        if not target.is_file() or target.read_bytes() != data:
            tmp = dst / f".{p.name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return [str(dst / p.name) for p in files if p.suffix == ".cpp"]


def _load_built(build_dir: Path) -> Any | None:
    """Import the module of a finished build in ``build_dir`` without running the build tool
    (another checkout or virtualenv may have built it); None when there is none or it fails."""
    so = build_dir / f"{_EXT_NAME}{'.pyd' if sys.platform == 'win32' else '.so'}"
    if not (build_dir / _BUILT).is_file() or not so.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(_EXT_NAME, so)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 - e.g. an ABI mismatch: rebuild through cpp_extension
        return None


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        _warned = True


def _import_cpp_extension():
    """``torch.utils.cpp_extension`` without its import-time "No CUDA runtime is found" warning
    (a CUDA build of torch on a CPU machine: these kernels are CPU-only, the warning is noise)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def load_extension(verbose: bool = False) -> Any | None:
    """Build (first call, ~30 s) or load the cached C++ extension; None when unavailable.

    A finished build in the content-keyed cache folder (see :func:`_cache_dir`) is imported
    directly; otherwise "compiling binary kernels" is printed to stderr once and the sources are
    compiled. Returns None without building when ``KDBNN_NO_EXT=1``. A build failure (no
    compiler, no ninja, compile error) warns once and returns None, so callers fall back to torch.
    """
    global _ext, _ext_tried
    if os.environ.get("KDBNN_NO_EXT", "0") not in ("", "0"):
        return None
    if _ext_tried:  # fast path once built or failed (a plain read of two globals)
        return _ext
    with _lock:
        if _ext_tried:
            return _ext
        _ext_tried = True
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            _warn_once(
                f"kd_bnn kernels: C++ compiler '{cxx}' not found; using the slow pure-torch fallback"
            )
            return None
        try:
            cpp_extension = _import_cpp_extension()
            cpp_extension.verify_ninja_availability()
        except Exception as exc:  # noqa: BLE001 - any failure means: no build tool
            _warn_once(
                f"kd_bnn kernels: ninja not available ({exc}); using the slow pure-torch fallback"
            )
            return None
        files = _sources()
        build_dir = _cache_dir(files)
        try:
            _ext = _load_built(build_dir)
            if _ext is None:
                print("compiling binary kernels (once, ~30 s)", file=sys.stderr, flush=True)
                cflags, ldflags = _build_flags()
                _ext = cpp_extension.load(
                    name=_EXT_NAME,
                    sources=_stage_sources(files, build_dir / "src"),
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    build_directory=str(build_dir),
                    verbose=verbose,
                )
                try:  # mark the build finished: later processes import it without ninja
                    (build_dir / _BUILT).write_text(f"{build_dir.name}\n")
                except OSError:
                    pass
        except Exception as exc:  # noqa: BLE001
            detail = str(exc).strip().splitlines()[-1:] or [""]
            _warn_once(
                f"kd_bnn kernels: building the C++ kernels failed ({type(exc).__name__}: {detail[0][:300]}); "
                f"using the slow pure-torch fallback (build log in {build_dir})"
            )
            _ext = None
        return _ext


def extension_available() -> bool:
    """Whether the compiled kernels can be used (built or buildable, not disabled)."""
    return load_extension() is not None


def available_isas() -> list[str]:
    """ISA paths this CPU can run with the compiled extension (empty without it)."""
    ext = load_extension()
    if ext is None:
        return []
    key = id(ext)
    if key not in _isa_cache:  # CPU flags do not change: ask the extension once
        _isa_cache[key] = [name for code, name in enumerate(ISAS) if ext.has_isa(code)]
    return list(_isa_cache[key])


def default_isa() -> str:
    """``KDBNN_ISA`` if set, else the fastest available path."""
    env = os.environ.get("KDBNN_ISA", "").strip().lower()
    if env:
        return env
    avail = available_isas()
    for name in ("avx512", "avx2", "popcnt", "scalar"):
        if name in avail:
            return name
    return "scalar"


def resolve_isa(isa: str | None) -> int:
    """ISA name (or None for the default) -> code; errors name the valid choices."""
    name = (isa or default_isa()).lower()
    if name not in ISAS:
        raise ValueError(f"unknown ISA path '{name}', expected one of {list(ISAS)}")
    avail = available_isas()
    if name not in avail:
        raise RuntimeError(
            f"ISA path '{name}' is not supported by this CPU/build; available: {avail}"
        )
    return ISAS.index(name)


def _act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}', expected one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _use_ext(backend: str | None) -> Any | None:
    if backend not in (None, "auto", "ext", "torch"):
        raise ValueError(f"unknown backend '{backend}', expected 'auto', 'ext' or 'torch'")
    if backend == "torch":
        return None
    ext = load_extension()
    if ext is None and backend == "ext":
        raise RuntimeError(
            "backend='ext' requested but the C++ kernels are unavailable (see earlier warning "
            "or unset KDBNN_NO_EXT)"
        )
    return ext


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float32 CPU tensor without autograd history (no copy when it already is one)."""
    if t.dtype == torch.float32 and not t.requires_grad and t.device.type == "cpu":
        return t
    return t.detach().cpu().float()


def _vec(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous 1-D CPU tensor of ``dtype`` (as is when it already is one: per-call
    arguments made once at plan time cost no dispatcher calls)."""
    if t.dtype == dtype and t.dim() == 1 and t.is_contiguous() and not t.requires_grad and t.device.type == "cpu":
        return t
    return t.detach().cpu().to(dtype).reshape(-1).contiguous()


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_packed_weight(w_packed: torch.Tensor, c_in: int, kh: int, kw: int) -> None:
    if w_packed.dtype != torch.int64 or w_packed.dim() != 3:
        raise ValueError(
            f"packed weight must be int64 (C_out, KH*KW, nw), found {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    if w_packed.shape[1] != kh * kw or w_packed.shape[2] != num_words(c_in):
        raise ValueError(
            f"packed weight shape {tuple(w_packed.shape)} does not match C_in={c_in}, kernel {kh}x{kw}: "
            f"expected (C_out, {kh * kw}, {num_words(c_in)})"
        )


def _check_conv_args(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    kernel_size: int | tuple[int, int],
    **per_channel: torch.Tensor | None,
) -> tuple[int, int, int]:
    """``(kh, kw, C_in)`` of a float/int8-input packed-weight conv (:func:`bwn_conv2d`,
    :func:`w1a8_conv2d`) after checking that ``x`` is ``(N, C, H, W)``, that ``w_packed`` matches
    it and the kernel, and that each named per-output-channel tensor (None: skipped) has C_out values."""
    kh, kw = _pair(kernel_size)
    if x.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), found {tuple(x.shape)}")
    c_in = x.shape[1]
    _check_packed_weight(w_packed, c_in, kh, kw)
    c_out = w_packed.shape[0]
    for name, t in per_channel.items():
        if t is not None and t.numel() != c_out:
            raise ValueError(f"{name} has {t.numel()} values, expected C_out={c_out}")
    return kh, kw, c_in


def weight_panel(w_packed: torch.Tensor) -> torch.Tensor:
    """Kernel layout of packed weights: ``(KH*KW*nw, C_out rounded up to 16)`` int64, zero filled."""
    c_out = w_packed.shape[0]
    cop = -(-c_out // _CO_BLOCK) * _CO_BLOCK
    flat = w_packed.reshape(c_out, -1)
    panel = torch.zeros(flat.shape[1], cop, dtype=torch.int64)
    panel[:, :c_out] = flat.t()
    return panel


def _check_threshold(threshold: torch.Tensor | None, c: int) -> torch.Tensor | None:
    if threshold is None:
        return None
    if threshold.numel() != c:
        raise ValueError(f"threshold has {threshold.numel()} values, expected one per channel ({c})")
    return _f32(threshold).reshape(-1).contiguous()


def _binarize(x: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """+1 where ``x >= threshold[c]`` (0 when None), else -1 (the torch path's binarization)."""
    t = 0 if threshold is None else threshold.view(1, -1, 1, 1)
    return torch.where(x.detach().float() >= t, 1.0, -1.0)


def pack_input(
    x: torch.Tensor,
    padding: int = 0,
    pad_value: float = -1.0,
    backend: str | None = None,
    threshold: torch.Tensor | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """Binarize (``x >= 0`` -> +1) and pack ``(N,C,H,W)`` into padded NHWC words ``(N,H+2p,W+2p,nw)``.

    ``threshold``: per-channel ``(C,)``: ``x >= threshold[c]`` -> +1 instead; ``-b`` gives RSign's
    ``sign(x + b)`` exactly (``round(x + b) >= 0`` iff ``x >= -b``, for finite ``x``, ``b``) with
    no shifted copy of ``x``. ``isa``: the row packer of that path (default: the best one).
    """
    if pad_value not in (1.0, -1.0):
        raise ValueError(f"binary padding value must be +1 or -1, found {pad_value}")
    thr = _check_threshold(threshold, x.shape[1])
    ext = _use_ext(backend)
    if ext is not None:
        code = -1 if isa is None else resolve_isa(isa)
        return ext.pack_input(x.detach().cpu(), int(padding), float(pad_value), thr, code)
    if thr is not None:
        x = _binarize(x, thr)
    return pad_packed(pack_activations(x), x.shape[1], padding, pad_value, backend="torch")


def pad_packed(
    xp: torch.Tensor,
    channels: int,
    padding: int,
    pad_value: float = -1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Pad packed NHWC words ``(N,H,W,nw)`` spatially with the words of ``pad_value`` (+1 or -1)."""
    if pad_value not in (1.0, -1.0):
        raise ValueError(f"binary padding value must be +1 or -1, found {pad_value}")
    if padding == 0:
        return xp
    ext = _use_ext(backend)
    if ext is not None:
        return ext.pad_packed(xp, int(channels), int(padding), float(pad_value))
    x = unpack_activations(xp, channels)
    x = F.pad(x, (padding,) * 4, value=float(pad_value))
    return pack_activations(x)


_NO_THR, _NO_LE = torch.empty(0), torch.empty(0, dtype=torch.uint8)  # concat_packed: a part without thresholds


def concat_packed(
    parts: list[tuple],
    padding: int = 0,
    pad_value: float = -1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Packed words ``(N, H+2p, W+2p, nw)`` of the channel concatenation of ``parts`` ``(t, c)`` or
    ``(t, c, (thr, le))``: ``t`` unpadded packed words ``(N, H, W, ceil(c/64))``, or a float
    ``(N, c, H, W)`` map binarized here (``x >= 0`` -> +1, as :func:`pack_input`; with thresholds
    ``(c,)`` from :func:`sign_thresholds`: ``x >= thr[k]``, or ``x <= thr[k]`` where ``le[k]``),
    padded spatially with ``pad_value`` words, in one pass (C++): parts starting on a 64-channel
    boundary are copied, others shifted into place (each source word spans two output words)."""
    if pad_value not in (1.0, -1.0):
        raise ValueError(f"binary padding value must be +1 or -1, found {pad_value}")
    thr = [p[2][0] if len(p) > 2 and p[2] is not None else _NO_THR for p in parts]
    le = [p[2][1] if len(p) > 2 and p[2] is not None else _NO_LE for p in parts]
    ext = _use_ext(backend)
    if ext is not None:
        return ext.concat_packed([p[0] if p[0].dtype == torch.int64 else _f32(p[0]) for p in parts],
                                 [int(p[1]) for p in parts], int(padding), float(pad_value), thr, le)
    packed = []
    for (t, c, *_), th, lo in zip(parts, thr, le):
        if t.dtype != torch.int64:
            if th.numel():
                th, lo = th.float().view(1, -1, 1, 1), lo.bool().view(1, -1, 1, 1)
                t = torch.where(torch.where(lo, t <= th, t >= th), 1.0, -1.0)
            t = pack_input(t, 0, -1.0, backend="torch")
        packed.append((t, c))
    n, h, w = packed[0][0].shape[:3]
    total = sum(c for _, c in packed)
    nw = num_words(total)
    out = torch.zeros(n, h, w, nw, dtype=torch.int64)
    off = 0
    for words, c in packed:
        for j in range(num_words(c)):
            src = words[..., j]
            d, sh = divmod(off + 64 * j, 64)
            out[..., d] |= src << sh
            if sh and d + 1 < nw:  # the high bits of src, shifted down logically
                out[..., d + 1] |= (src >> (64 - sh)) & ((1 << sh) - 1)
        off += c
    return pad_packed(out, total, padding, pad_value, backend="torch")


def _float_keys(k: torch.Tensor) -> torch.Tensor:
    """float32 values of ordered keys (int64): key ``k >= 0`` is the float with bits ``k``, ``k < 0``
    the float with bits ``-k`` and the sign set (the keys order the floats as numbers, -0 = +0)."""
    bits = torch.where(k >= 0, k, (-k) | (1 << 31)).to(torch.int64)
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def sign_thresholds(predicate, c: int, probes: int = 4096) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel thresholds ``(thr float32 (c,), le uint8 (c,))`` with ``predicate(x)[k]`` (a
    per-channel elementwise map of float ``(1, c, 1, M)`` to bool, e.g. ``bn(x) >= 0`` of a
    BatchNorm) equal to ``x >= thr[k]``, or ``x <= thr[k]`` where ``le[k]``, for every float ``x``:
    the packer's binarization of that map without the map. Found by bisection over the ordered
    floats (-inf..+inf), which is exact when the predicate is monotone in ``x`` (a BatchNorm is:
    each of its rounded operations is monotone for a fixed channel); checked at the boundaries,
    infinities, NaN (must be False) and ``probes`` spread values per channel. None when a
    channel fails (e.g. a zero BatchNorm scale: ``bn(+-inf)`` is NaN)."""
    inf = float("inf")

    def pred(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return predicate(v.view(1, c, 1, -1).contiguous()).reshape(c, -1).bool()

    ends = pred(torch.tensor([-inf, inf, float("nan")]).repeat(c, 1))
    lo_true, hi_true = ends[:, 0], ends[:, 1]
    if ends[:, 2].any():
        return None
    lo = torch.full((c,), -0x7F800000, dtype=torch.int64)  # key(-inf)
    hi = torch.full((c,), 0x7F800000, dtype=torch.int64)  # key(+inf)
    up = ~lo_true & hi_true  # increasing: find the first key with the predicate true
    down = lo_true & ~hi_true  # decreasing: find the last key with the predicate true
    for _ in range(33):
        mid = (lo + hi) // 2
        p = pred(_float_keys(mid).view(c, 1))[:, 0]
        move_hi = torch.where(up, p, ~p)  # the boundary lies at or below mid
        hi = torch.where(move_hi & (up | down), mid, hi)
        lo = torch.where(~move_hi & (up | down), mid, lo)
    thr = torch.where(up, _float_keys(hi), _float_keys(lo))
    thr = torch.where(up | down, thr, torch.where(lo_true, torch.tensor(-inf), torch.tensor(float("nan"))))
    le = down.to(torch.uint8)
    # check: boundaries and their neighbours, the infinities, NaN and spread values
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-0x7F800000, 0x7F800001, (c, probes), generator=g, dtype=torch.int64)
    x = torch.cat([_float_keys(keys), torch.tensor([-inf, inf, 0.0, -0.0, float("nan")]).repeat(c, 1),
                   thr.view(c, 1), torch.nextafter(thr, torch.tensor(inf)).view(c, 1),
                   torch.nextafter(thr, torch.tensor(-inf)).view(c, 1)], 1)
    t = thr.view(c, 1)
    mine = torch.where(down.view(c, 1), x <= t, x >= t)
    if not torch.equal(mine, pred(x)):
        return None
    return thr.contiguous(), le.contiguous()


def _transform(
    v: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, act: int
) -> torch.Tensor:
    if scale is not None:
        v = v * scale.float().view(1, -1, 1, 1)
    if bias is not None:
        v = v + bias.float().view(1, -1, 1, 1)
    if act == 1:
        v = torch.where(v > 0, v, torch.zeros((), dtype=v.dtype))
    elif act == 2:
        v = torch.where(v > 0, v, v * 0.1)
    return v


def xnor_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    c_in: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    pad_value: float = -1.0,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    output: str = "float",
    out_padding: int = 0,
    out_pad_value: float = -1.0,
    x_is_padded: bool = False,
    panel: torch.Tensor | None = None,
    isa: str | None = None,
    backend: str | None = None,
    threshold: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    packed_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    table: torch.Tensor | None = None,
    affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """XNOR convolution ``sign(x) * sign(W)``, then ``dot*scale + bias`` and an activation.

    Args:
        x: float ``(N, C_in, H, W)`` (binarized here, ``x >= 0`` -> +1), or packed int64 NHWC words
            ``(N, H, W, nw)`` (e.g. the ``output="packed"`` result of the previous layer); with
            ``x_is_padded=True`` the packed input already carries ``padding`` on each side.
        w_packed: ``pack_signs(W)``, int64 ``(C_out, KH*KW, ceil(C_in/64))``.
        c_in: input channels; kernel_size: ``KH`` or ``(KH, KW)``; stride, padding: as conv2d.
        pad_value: value of padded activations, +1 or -1 (as the training layer pads).
        scale, bias: per-output-channel float (C_out,) of the fused transform (None: 1 and 0).
        activation: ``none`` | ``relu`` | ``leaky`` (slope 0.1).
        output: ``int`` -> int32 dot products ``(N, C_out, OH, OW)`` (no transform);
            ``float`` -> float32 ``(N, C_out, OH, OW)``; ``packed`` -> int64 NHWC words of the
            sign of the transformed output, ``(N, OH+2*out_padding, OW+2*out_padding, nw_out)``
            padded with ``out_pad_value`` words.
        panel: ``weight_panel(w_packed)`` computed once at load time (same words, reordered for
            the kernel); None recomputes it per call.
        isa: force an ISA path (see ``ISAS``); backend: ``torch`` forces the fallback.
        threshold: float input only: per-input-channel ``(C_in,)`` binarization threshold,
            ``x >= threshold[c]`` -> +1 (see :func:`pack_input`: ``-b`` is RSign's ``sign(x + b)``).
        residual: ``float``/``both`` only: float ``(N, C_out, OH, OW)`` added after the activation
            (``act(dot*scale + bias) + residual``, the same float add as torch's), in the epilogue.
        packed_bounds: ``both`` or ``packed``, no residual: int ``(C_out,)`` popcount bounds ``(lo, hi)``;
            the packed bit of channel ``c`` is ``lo[c] <= popcount <= hi[c]`` (``dot = K -
            2*popcount``): the sign of any monotone function of the output, e.g. the next layer's
            BatchNorm (see :func:`popcount_bounds`).
        table: ``float``/``both`` only, no ``packed_bounds``: float ``(C_out, K + 1)``; the float
            output of popcount ``p`` in channel ``c`` is ``table[c, p]`` instead of the transform
            (any per-channel function of the conv output tabulated exactly, e.g. a BatchNorm that
            was not folded: :func:`output_table`), then the residual.
        affine: with ``table``, or alone: float ``(C_out,)`` coefficients ``(a, b)``; channels where
            ``a[c]`` is a number output ``fma(v, a[c], b[c])`` (one rounding) of the transformed
            value ``v`` (a vectorised epilogue instead of a lookup), and ``table`` then holds only
            the rows of the channels where ``a[c]`` is NaN, in channel order (``(rows, K + 1)``; None
            when there are none). :func:`output_affine` makes both, checked equal to the full table.

    ``output="both"`` returns ``(float, packed)`` from one kernel pass: the float output (with the
    residual) and, as ``packed`` above, the sign words of that float output (``>= 0`` -> +1, as
    :func:`pack_input` binarizes it) or the bits of ``packed_bounds``.
    """
    kh, kw = _pair(kernel_size)
    _check_packed_weight(w_packed, c_in, kh, kw)
    if panel is not None and (
        panel.dtype != torch.int64 or panel.shape[0] != w_packed.shape[1] * w_packed.shape[2]
    ):
        raise ValueError(
            f"panel must be weight_panel(w_packed), found {panel.dtype} {tuple(panel.shape)}"
        )
    if stride < 1 or padding < 0 or out_padding < 0:
        raise ValueError(f"bad stride/padding/out_padding: {stride}/{padding}/{out_padding}")
    if output not in _MODES and output != "both":
        raise ValueError(f"unknown output '{output}', expected one of {[*_MODES, 'both']}")
    if pad_value not in (1.0, -1.0):
        raise ValueError(f"binary padding value must be +1 or -1, found {pad_value}")
    if residual is not None and output not in ("float", "both"):
        raise ValueError(f"a residual needs output 'float' or 'both', found '{output}'")
    if packed_bounds is not None and (output not in ("both", "packed") or residual is not None):
        raise ValueError("packed_bounds needs output 'both' or 'packed' and no residual")
    if output in ("packed", "both") and out_pad_value not in (1.0, -1.0):
        raise ValueError(f"binary out_pad_value must be +1 or -1, found {out_pad_value}")
    act = _act_code(activation)
    c_out = w_packed.shape[0]
    packed_in = x.dtype == torch.int64
    if packed_in:
        if x.dim() != 4 or x.shape[3] != num_words(c_in):
            raise ValueError(
                f"packed input must be (N, H, W, {num_words(c_in)}) int64, found {tuple(x.shape)}"
            )
    elif x.dim() != 4 or x.shape[1] != c_in:
        raise ValueError(f"input must be (N, {c_in}, H, W), found {tuple(x.shape)}")
    if x_is_padded and not packed_in:
        raise ValueError("x_is_padded applies to packed int64 inputs only")
    if threshold is not None and packed_in:
        raise ValueError("threshold applies to float inputs only")
    thr = _check_threshold(threshold, c_in)
    oh = (x.shape[1 if packed_in else 2] + (0 if x_is_padded else 2 * padding) - kh) // stride + 1
    ow = (x.shape[2 if packed_in else 3] + (0 if x_is_padded else 2 * padding) - kw) // stride + 1
    if residual is not None and tuple(residual.shape) != (x.shape[0], c_out, oh, ow):
        raise ValueError(f"residual must be ({x.shape[0]}, {c_out}, {oh}, {ow}), found {tuple(residual.shape)}")
    if table is not None or affine is not None:
        if output not in ("float", "both") or packed_bounds is not None:
            raise ValueError("an output table needs output 'float' or 'both' and no packed_bounds")
        rows = c_out
        if affine is not None:
            affine = tuple(_vec(t, torch.float32) for t in affine)
            if any(t.numel() != c_out for t in affine):
                raise ValueError(f"affine coefficients need {c_out} values each")
            # (counted only with a table: without one the kernel and _mapped need no rows either)
            rows = int(affine[0].isnan().sum()) if table is not None else 0
        if rows and (table is None or tuple(table.shape) != (rows, c_in * kh * kw + 1)):
            raise ValueError(f"table must be ({rows}, {c_in * kh * kw + 1}), found "
                             f"{None if table is None else tuple(table.shape)}")
        table = _f32(table).contiguous() if rows else None
    bounds = None
    if packed_bounds is not None:
        bounds = tuple(_vec(torch.as_tensor(b), torch.int32) for b in packed_bounds)
        if any(b.numel() != c_out for b in bounds):
            raise ValueError(f"packed_bounds need {c_out} values each")

    ext = _use_ext(backend)
    if ext is not None:
        code = resolve_isa(isa)
        if packed_in:
            xp = x.contiguous()
            if padding and not x_is_padded:
                xp = ext.pad_packed(xp, c_in, int(padding), float(pad_value))
        else:
            xp = ext.pack_input(_f32(x), int(padding), float(pad_value), thr, code)
        if residual is not None or output == "both" or bounds is not None or table is not None or affine is not None:
            outs = ext.xnor_conv_ex(
                xp, weight_panel(w_packed) if panel is None else panel, c_out, c_in, kh, kw, int(stride),
                None if scale is None else _f32(scale), None if bias is None else _f32(bias), act,
                None if residual is None else _f32(residual).contiguous(), output != "packed",
                output != "float",
                None if bounds is None else bounds[0], None if bounds is None else bounds[1], table,
                None if affine is None else affine[0], None if affine is None else affine[1],
                int(out_padding), float(out_pad_value), code,
            )
            return (outs[0], outs[1]) if output == "both" else outs[0]
        return ext.xnor_conv(
            xp,
            weight_panel(w_packed) if panel is None else panel,
            c_out,
            c_in,
            kh,
            kw,
            int(stride),
            None if scale is None else _f32(scale),
            None if bias is None else _f32(bias),
            act,
            _MODES[output],
            int(out_padding),
            float(out_pad_value),
            code,
        )

    # pure-torch reference path: the same integers and the same float ops
    if packed_in:
        xs = unpack_activations(x, c_in)
        if not x_is_padded and padding:
            xs = F.pad(xs, (padding,) * 4, value=float(pad_value))
    else:
        xs = _binarize(x, thr)
        if padding:
            xs = F.pad(xs, (padding,) * 4, value=float(pad_value))
    ws = unpack_signs(w_packed, c_in, kh, kw)
    dot = F.conv2d(xs, ws, stride=stride).round().to(torch.int32)  # exact: |dot| <= K < 2**24
    if output == "int":
        return dot
    v = _transform(dot.float(), scale, bias, act)
    if table is not None or affine is not None:
        v = _mapped(v, dot, kh * kw * c_in, table, affine)
    if residual is not None:
        v = v + residual.detach().float()
    if output == "float":
        return v
    if output == "both" or bounds is not None:
        if bounds is not None:
            cnt = torch.div(kh * kw * c_in - dot, 2, rounding_mode="floor")
            lo, hi = (b.view(1, -1, 1, 1) for b in bounds)
            signs = torch.where((cnt >= lo) & (cnt <= hi), 1.0, -1.0)
        else:
            signs = v
        words = pad_packed(pack_activations(signs), c_out, out_padding, out_pad_value, backend="torch")
        return (v, words) if output == "both" else words
    return pad_packed(pack_activations(v), c_out, out_padding, out_pad_value, backend="torch")


def _mapped(v: torch.Tensor, dot: torch.Tensor, k: int, table: torch.Tensor | None,
            affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The torch path of :func:`xnor_conv2d`'s ``table`` / ``affine`` output map of ``v``."""
    c_out = v.shape[1]
    if affine is None:
        rows, out = torch.arange(c_out), None
    else:
        a, b = affine
        out = _fma32(v, a.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
        tab = a.isnan()
        if table is None:
            return out
        rows = (torch.cumsum(tab.long(), 0) - 1).clamp(min=0)
    cnt = torch.div(k - dot, 2, rounding_mode="floor").long()
    looked = table[rows.view(1, -1, 1, 1), cnt]
    return looked if out is None else torch.where(tab.view(1, -1, 1, 1), looked, out)


def _fma32(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``fma(v, a, b)`` of float32 tensors rounded once to float32, as the kernel's fused
    multiply-add, through float64: ``p = v*a`` is exact there; ``r = p + b`` rounds once and its
    error ``e`` is exact (Knuth's two-sum). Rounding ``r`` to float32 gives the single-rounded
    result except where ``r`` is exactly halfway between two float32 values and ``e`` is not 0:
    then the exact sum lies past the midpoint on ``e``'s side, and that neighbour is taken."""
    p, bd = v.double() * a.double(), b.double()
    r = p + bd
    bp = r - p
    e = (p - (r - bp)) + (bd - bp)
    f = r.float()
    fd = f.double()
    up, down = torch.nextafter(f, torch.tensor(float("inf"))), torch.nextafter(f, torch.tensor(float("-inf")))
    f = torch.where((r > fd) & ((fd + up.double()) / 2 == r) & (e > 0), up, f)
    return torch.where((r < fd) & ((fd + down.double()) / 2 == r) & (e < 0), down, f)


class OutputMap(NamedTuple):
    """A per-channel function of an XNOR conv's float output for :func:`xnor_conv2d`
    (``affine=(a, b), table=table``): fused multiply-adds where exact, table rows elsewhere."""

    a: torch.Tensor
    b: torch.Tensor
    table: torch.Tensor | None

    @property
    def affine_channels(self) -> int:
        return int((~self.a.isnan()).sum())


def output_affine(c_in, kernel_size, scale, bias, activation, fn, c_out: int) -> OutputMap:
    """:func:`output_table` of ``fn`` as a per-channel fused multiply-add ``fma(v, a[c], b[c])``
    wherever that equals ``fn`` on every value ``v`` the conv output can take (checked bit for
    bit against the table, as the kernel computes it), and the table rows only of the other
    channels (``a[c]`` NaN). ``b = fn(0)`` and ``a = fn(2**64) / 2**64`` (exact for a map of the
    form ``fma(v, a, b)``, such as torch's BatchNorm in eval mode on FMA builds); any other form
    fails the check and keeps its table rows, so the result is always exactly ``fn``."""
    table = output_table(c_in, kernel_size, scale, bias, activation, fn, c_out)
    v = output_values(c_in, kernel_size, scale, bias, activation, c_out).reshape(c_out, -1)
    probe = 2.0 ** 64
    with torch.no_grad():
        b = fn(torch.zeros(1, c_out, 1, 1)).detach().float().reshape(-1)
        a = (fn(torch.full((1, c_out, 1, 1), probe)).detach().float().reshape(-1) / probe).contiguous()
    f = _fma32(v, a.view(-1, 1), b.view(-1, 1))
    ok = (f.view(torch.int32) == table.view(torch.int32)).all(1) & a.isfinite() & b.isfinite()
    a = torch.where(ok, a, torch.tensor(float("nan")))
    rows = table[~ok].contiguous()
    return OutputMap(a, b.contiguous(), rows if rows.shape[0] else None)


def output_values(
    c_in: int,
    kernel_size: int | tuple[int, int],
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str,
    c_out: int,
) -> torch.Tensor:
    """Every float output an XNOR conv can give, float ``(1, C_out, 1, K + 1)``: entry ``p`` is
    ``act((K - 2p)*scale + bias)`` (popcount ``p``), by the kernel's float ops."""
    kh, kw = _pair(kernel_size)
    k = c_in * kh * kw
    dot = (k - 2 * torch.arange(k + 1, dtype=torch.int32)).float().view(1, 1, 1, -1).expand(1, c_out, 1, k + 1)
    return _transform(dot, scale, bias, _act_code(activation)).contiguous()


def output_table(c_in, kernel_size, scale, bias, activation, fn, c_out: int) -> torch.Tensor:
    """:func:`xnor_conv2d`'s ``table`` of ``fn`` (a per-channel elementwise map of float
    ``(1, C_out, 1, K + 1)``, e.g. a BatchNorm module in eval mode) applied to the conv's output:
    exact, ``fn`` runs on every value the output can take."""
    v = output_values(c_in, kernel_size, scale, bias, activation, c_out)
    with torch.no_grad():
        return fn(v).detach().float().reshape(c_out, -1).contiguous()


def popcount_bounds(
    c_in: int,
    kernel_size: int | tuple[int, int],
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str,
    predicate,
    c_out: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Popcount bounds ``(lo, hi)`` (int32 ``(C_out,)``) for :func:`xnor_conv2d`'s ``packed_bounds``:
    bit ``c`` of an output is ``predicate(v)[c]`` where ``v`` is the conv's float output.

    The conv's float outputs take only ``K + 1`` values per channel (``v = act((K - 2p)*scale +
    bias)`` for popcount ``p``, the kernel's float ops), so ``predicate`` (an elementwise,
    per-channel map of float ``(1, C_out, 1, K + 1)`` to bool, e.g. ``bn(v) >= 0`` of the next
    layer) is evaluated on all of them: exact for whatever float ops the predicate uses. None when
    some channel's set of popcounts is not one interval (a non-monotone predicate).
    """
    kh, kw = _pair(kernel_size)
    k = c_in * kh * kw
    if c_out is None:
        c_out = (scale if scale is not None else bias).numel()
    p = torch.arange(k + 1, dtype=torch.int32)
    dot = (k - 2 * p).float().view(1, 1, 1, -1).expand(1, c_out, 1, k + 1)
    v = _transform(dot, scale, bias, _act_code(activation))
    ok = predicate(v.contiguous()).reshape(c_out, k + 1).bool()
    lo = torch.ones(c_out, dtype=torch.int32)
    hi = torch.zeros(c_out, dtype=torch.int32)
    for c in range(c_out):
        idx = ok[c].nonzero().flatten()
        if idx.numel() == 0:
            continue
        a, b = int(idx[0]), int(idx[-1])
        if b - a + 1 != idx.numel():
            return None
        lo[c], hi[c] = a, b
    return lo, hi


def bwn_prepare(
    w_packed: torch.Tensor,
    in_shape: tuple[int, ...] | torch.Size,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    isa: str | None = None,
    backend: str | None = None,
) -> torch.Tensor | None:
    """The lookup-table kernel's table offsets for :func:`bwn_conv2d` (its ``prepared=``): what
    each call otherwise rebuilds from ``w_packed``, computed once per layer and input size (a
    uint8 tensor; its header names the plan, which depends on the layer and the input size; a call
    whose plan differs rebuilds them as without it). ``in_shape``: ``(N, C, H, W)`` or
    ``(C, H, W)`` of the input. None where no lookup-table kernel runs (torch backend, no
    extension, an ISA path without one)."""
    return _lut_prepare("bwn_prepare", w_packed, in_shape, kernel_size, stride, padding, isa, backend)


def _lut_prepare(fn, w_packed, in_shape, kernel_size, stride, padding, isa, backend) -> torch.Tensor | None:
    """The prepared table offsets of a lookup-table kernel (extension function ``fn``:
    ``bwn_prepare`` / ``w1a8_prepare``), or None where none runs."""
    ext = _use_ext(backend)
    if ext is None:
        return None
    c_in, h, w = (int(v) for v in tuple(in_shape)[-3:])
    kh, kw = _pair(kernel_size)
    _check_packed_weight(w_packed, c_in, kh, kw)
    t = getattr(ext, fn)(w_packed, c_in, h, w, kh, kw, int(stride), int(padding), resolve_isa(isa))
    return t if t.numel() else None


def bwn_conv2d(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    alpha: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    isa: str | None = None,
    backend: str | None = None,
    prepared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float input x binary weights: ``conv2d(x, alpha[c]*sign(W), bias, stride, padding)`` + activation.

    Zero padding (float activations). ``w_packed = pack_signs(W)``; ``alpha`` float ``(C_out,)``.
    ``prepared``: :func:`bwn_prepare` of the same ``w_packed`` (saves rebuilding the kernel's table
    offsets per call; ignored where it does not match the call's plan).
    """
    kh, kw, c_in = _check_conv_args(x, w_packed, kernel_size, alpha=alpha)
    act = _act_code(activation)
    ext = _use_ext(backend)
    if ext is not None:
        code = resolve_isa(isa)
        return ext.bwn_conv(
            _f32(x),
            w_packed,
            _f32(alpha),
            None if bias is None else _f32(bias),
            kh,
            kw,
            int(stride),
            int(padding),
            act,
            code,
            prepared,
        )
    w = unpack_signs(w_packed, c_in, kh, kw) * alpha.detach().float().view(-1, 1, 1, 1)
    y = F.conv2d(x.detach().float(), w, None, stride=stride, padding=padding)
    return _transform(y, None, bias, act)


def _w1a8_epilogue(
    acc: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: int,
    out_scale_inv: float | None,
) -> torch.Tensor:
    """The float32 epilogue of :func:`w1a8_conv2d` on int32 sums ``acc`` (N, C, OH, OW), one op
    at a time as the C++ kernels do it (single roundings, no fused multiply-add)."""
    y = acc.to(torch.float32) * scale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    if act == 1:
        y = torch.where(y > 0, y, torch.zeros((), dtype=torch.float32))
    elif act == 2:
        y = torch.where(y > 0, y, y * torch.tensor(0.1, dtype=torch.float32))
    if out_scale_inv is None:
        return y
    return _quantize_torch(y, out_scale_inv)


def _quantize_torch(x: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """``clamp(rint(x * float32(inv_scale)), -127, 127)`` as int8 (``torch.round``: half to even)."""
    z = x * torch.tensor(inv_scale, dtype=torch.float32)
    return z.round().clamp_(-127.0, 127.0).to(torch.int8)


def quantize_activations(
    x: torch.Tensor, inv_scale: float, backend: str | None = None, isa: str | None = None
) -> torch.Tensor:
    """Float activations -> the int8 input of :func:`w1a8_conv2d`: ``clamp(rint(x * inv_scale),
    -127, 127)`` with ``inv_scale`` rounded to float32 and rint = round half to even (so ``x =
    xq / inv_scale`` approximately, never -128). Same shape, int8, no autograd. NaN is not
    supported (the result is unspecified). ``backend="torch"`` forces the torch path (identical
    values); ``isa`` forces an ISA path of the C++ one (``avx512``/``avx2`` vector loops, else
    portable)."""
    if not x.dtype.is_floating_point:
        raise ValueError(f"quantize_activations expects a float tensor, found {x.dtype}")
    ext = _use_ext(backend)
    if ext is not None:
        return ext.quantize_act(_f32(x), float(inv_scale), -1 if isa is None else resolve_isa(isa))
    return _quantize_torch(x.detach().float(), float(inv_scale))


def w1a8_prepare(
    w_packed: torch.Tensor,
    in_shape: tuple[int, ...] | torch.Size,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    isa: str | None = None,
    backend: str | None = None,
) -> torch.Tensor | None:
    """The lookup-table kernel's table offsets for :func:`w1a8_conv2d` (its ``prepared=``), as
    :func:`bwn_prepare` for :func:`bwn_conv2d`: computed once per layer and input size (uint8, a
    header naming the plan, then one byte per g weights); None where no lookup-table kernel runs
    (torch backend, no extension, the scalar/popcnt paths)."""
    return _lut_prepare("w1a8_prepare", w_packed, in_shape, kernel_size, stride, padding, isa, backend)


def w1a8_conv2d(
    xq: torch.Tensor,
    w_packed: torch.Tensor,
    scale: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    out_scale_inv: float | None = None,
    isa: str | None = None,
    backend: str | None = None,
    prepared: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 activations x packed binary weights (W1A8), exact integer sums, float32 epilogue.

    ``xq``: int8 ``(N, C_in, H, W)`` meaning ``x = s_in * xq``, values in [-127, 127] (what
    :func:`quantize_activations` produces; -128 is not checked, and the kernels are exact for it
    too). ``w_packed = pack_signs(W)`` (as :func:`bwn_conv2d`), ``scale`` float32 ``(C_out,)``
    (the caller folds ``alpha * s_in * bn_scale``), ``bias`` float32 ``(C_out,)`` or None; square
    or rectangular kernel, stride >= 1 (both axes), symmetric zero padding (0 in the integer
    domain).

    Computes ``acc[n,o,p] = sum_{c,kh,kw} sign(W[o,c,kh,kw]) * xq[n,c,ih,iw]`` in int32 (exact),
    then in float32, one op at a time with single roundings and no fused multiply-add:
    ``y = float(acc) * scale[o]; y = y + bias[o]``; activation ``none`` | ``relu`` (``max(y, 0)``)
    | ``leaky`` (``y > 0 ? y : y * 0.1f``). Returns float32 ``(N, C_out, OH, OW)`` ``y``, or, when
    ``out_scale_inv`` is given (a float32 scalar: the next layer's ``1 / s_in``), int8
    ``clamp(rint(y * out_scale_inv), -127, 127)`` (round half to even) for the next W1A8 layer.
    The C++ paths and the torch path (``backend="torch"`` or ``KDBNN_NO_EXT=1``: a float64 conv of
    the exact integers, exact since ``|acc| < 2**53``) are bit-identical (``torch.equal``; a NaN
    ``y`` from a NaN/inf scale or bias gives an unspecified int8 value). ``stride`` and ``padding``
    are ints (the same on both axes); ``isa``: force an ISA path (see ``ISAS``). ``prepared``:
    :func:`w1a8_prepare` of the same ``w_packed`` (saves rebuilding the kernel's table offsets per
    call; ignored where it does not match the call's plan).
    """
    if xq.dtype != torch.int8:
        raise ValueError(f"w1a8_conv2d input must be int8 (quantize_activations), found {xq.dtype}")
    kh, kw, c_in = _check_conv_args(xq, w_packed, kernel_size, scale=scale, bias=bias)
    if not isinstance(stride, int) or stride < 1 or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"stride must be an int >= 1 and padding an int >= 0, found {stride}/{padding}")
    if xq.shape[2] + 2 * padding < kh or xq.shape[3] + 2 * padding < kw:
        raise ValueError(
            f"padded input {xq.shape[2] + 2 * padding}x{xq.shape[3] + 2 * padding} is smaller than the kernel {kh}x{kw}"
        )
    act = _act_code(activation)
    inv = None if out_scale_inv is None else float(out_scale_inv)
    sc = _f32(scale).reshape(-1).contiguous()
    bi = None if bias is None else _f32(bias).reshape(-1).contiguous()
    ext = _use_ext(backend)
    if ext is not None:
        code = resolve_isa(isa)
        return ext.w1a8_conv(
            xq.detach().cpu(), w_packed, sc, bi, kh, kw, int(stride), int(padding), act, inv, code, prepared
        )
    ws = unpack_signs(w_packed, c_in, kh, kw).double()
    acc = F.conv2d(xq.detach().cpu().double(), ws, stride=stride, padding=padding).to(torch.int32)
    return _w1a8_epilogue(acc, sc, bi, act, inv)


def _stem_geometry(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
) -> tuple[int, int] | None:
    """``(stride, padding)`` when the stem kernel handles the conv, else None (torch runs it)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    kh, kw = weight.shape[2:]
    if not (sh == sw and sh in (1, 2) and ph == pw and 0 <= ph <= 64):
        return None
    if not (1 <= x.shape[1] <= 8 and 1 <= kh <= 7 and 1 <= kw <= 7):
        return None
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw or not x.dtype.is_floating_point:
        return None
    return sh, ph


def stem_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    activation: str = "none",
    backend: str | None = None,
    isa: str | None = None,
    pool: int | None = None,
) -> torch.Tensor:
    """Float conv with few input channels (a detector's first conv): ``act(conv2d(x, weight, bias))``.

    The C++ path (``stem.cpp``, ``stem_x86.cpp``) is a direct conv vectorised over the output
    width (one zmm / ymm / xmm of outputs per register, several output channels' accumulators at
    once, each weight broadcast, FMA), with the bias and the activation fused in the store. It
    handles ``C_in <= 8``, ``KH, KW <= 7``, equal strides 1 or 2 and equal (symmetric) zero padding;
    any other geometry, ``backend="torch"`` or a missing extension runs ``F.conv2d`` and the
    activation in torch. Float32 ``(N, C_out, OH, OW)`` out, no autograd.

    Rounding: each output is a sequential sum of its ``K = C_in*KH*KW`` products, then the bias,
    then the activation, so ``|out - exact| <= (2K + 4) * 2**-24 * (sum|w||x| + |bias|)`` (exact:
    real arithmetic, leaky slope ``float32(0.1)``); ``F.conv2d`` sums in another order, so the two
    agree to within the sum of their rounding errors (``tests/test_deploy_stem.py`` checks both;
    about ``1e-5 * (sum|w||x| + |bias|)`` for a 3x3 conv of 3 channels), not bit for bit.

    Args:
        x: float ``(N, C_in, H, W)``; weight: ``(C_out, C_in, KH, KW)`` (groups 1);
        bias: ``(C_out,)`` or None; stride, padding: int or a pair, as ``F.conv2d``.
        activation: ``none`` | ``relu`` | ``leaky`` (slope 0.1), see :data:`ACTIVATIONS`.
        backend: ``torch`` forces the fallback; isa: force an ISA path (see ``ISAS``).
        pool: None, or the padding (0 or 1) of a Darknet size-2 stride-2 max-pool applied after
            the activation (``kd_bnn.models.darknet.model.darknet_maxpool``: windows at ``2*o``,
            taps past the map ``-inf``; output ``(OH + pool - 2) // 2 + 1``): the kernel computes
            two conv rows at a time and writes only their 2x2 maxima (exact: the same values as
            the unfused conv, activation and pool), never the full-size map.
    """
    if pool is not None and pool not in (0, 1):
        raise ValueError(f"pool must be None or a Darknet 2x2 max-pool padding 0 or 1, found {pool}")
    if x.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), found {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must be (C_out, {x.shape[1]}, KH, KW) for input {tuple(x.shape)}, "
            f"found {tuple(weight.shape)}"
        )
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"bias has {bias.numel()} values, expected C_out={weight.shape[0]}")
    if min(_pair(stride)) < 1 or min(_pair(padding)) < 0:
        raise ValueError(f"bad stride/padding: {stride}/{padding}")
    act = _act_code(activation)
    ext = _use_ext(backend)
    geom = _stem_geometry(x, weight, stride, padding)
    if ext is not None and geom is not None:
        return ext.stem_conv(
            _f32(x),
            _f32(weight),
            None if bias is None else _f32(bias),
            geom[0],
            geom[1],
            act,
            resolve_isa(isa),
            -1 if pool is None else int(pool),
        )
    y = F.conv2d(
        x.detach().float(),
        weight.detach().float(),
        None if bias is None else bias.detach().float(),
        _pair(stride),
        _pair(padding),
    )
    if act == 1:
        y = F.relu(y)
    elif act == 2:
        y = F.leaky_relu(y, 0.1)
    return y if pool is None else _darknet_pool2(y, pool)


def _darknet_pool2(y: torch.Tensor, padding: int) -> torch.Tensor:
    """Darknet's size-2 stride-2 max-pool with padding 0 or 1 (windows at ``2*o``, taps past the
    map ``-inf``), as ``kd_bnn.models.darknet.model.darknet_maxpool``."""
    h, w = y.shape[2:]
    oh, ow = (h + padding - 2) // 2 + 1, (w + padding - 2) // 2 + 1
    y = y[:, :, : 2 * oh, : 2 * ow]
    if 2 * oh > y.shape[2] or 2 * ow > y.shape[3]:
        y = F.pad(y, (0, 2 * ow - y.shape[3], 0, 2 * oh - y.shape[2]), value=float("-inf"))
    return F.max_pool2d(y, 2, 2)


def pointwise_weights(weight: torch.Tensor, isa: str | None = None) -> torch.Tensor | None:
    """A 1x1 conv's weights ``(C_out, C_in[, 1, 1])`` blocked for :func:`pointwise_conv2d` on ISA
    path ``isa``: float ``(ceil(C_out/cb), C_in, cb)`` (``cb`` the stem row kernel's channels per
    block, output channels past ``C_out`` zero); None without the extension."""
    ext = load_extension()
    if ext is None:
        return None
    cb = int(ext.stem_block(resolve_isa(isa)))
    w = _f32(weight).reshape(weight.shape[0], -1)
    c_out, c_in = w.shape
    nblk = -(-c_out // cb)
    wp = torch.zeros(nblk * cb, c_in, dtype=torch.float32)
    wp[:c_out] = w
    return wp.view(nblk, cb, c_in).transpose(1, 2).contiguous()


def pointwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "none",
    blocked: torch.Tensor | None = None,
    backend: str | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """A 1x1 float conv (stride 1, no padding, groups 1): ``act(conv2d(x, weight, bias))``.

    The C++ path runs the stem row kernels (``stem.cpp``) over the flattened ``H*W`` plane with
    tap ``k`` = input channel ``k``, read in place: per tile of 48 (AVX-512) outputs x 8 output
    channels the accumulators stay in registers over all ``C_in`` products (FMA), then bias and
    activation. At one thread this runs near the FMA peak where torch's GEMM (MKL / oneDNN) reaches
    about half of it on an AVX-512 CPU. Rounding: each output is a sequential sum of its ``C_in``
    products, so it agrees with ``F.conv2d`` to within the stem bound (:func:`stem_conv2d`, ``K =
    C_in``), not bit for bit. ``blocked``: :func:`pointwise_weights` of ``weight`` for the same ISA,
    computed once (None: per call). ``backend="torch"`` or no extension: ``F.conv2d``.
    """
    if x.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), found {tuple(x.shape)}")
    if weight.shape[1] != x.shape[1] or weight.numel() != weight.shape[0] * weight.shape[1]:
        raise ValueError(
            f"weight must be (C_out, {x.shape[1]}[, 1, 1]) for input {tuple(x.shape)}, found {tuple(weight.shape)}"
        )
    c_out = weight.shape[0]
    if bias is not None and bias.numel() != c_out:
        raise ValueError(f"bias has {bias.numel()} values, expected C_out={c_out}")
    act = _act_code(activation)
    ext = _use_ext(backend)
    if ext is not None and x.dtype.is_floating_point:
        code = resolve_isa(isa)
        if blocked is None:
            blocked = pointwise_weights(weight, isa)
        return ext.pointwise_conv(
            _f32(x), blocked, None if bias is None else _f32(bias), c_out, act, code
        )
    y = F.conv2d(
        x.detach().float(),
        weight.detach().float().reshape(c_out, -1, 1, 1),
        None if bias is None else bias.detach().float(),
    )
    if act == 1:
        return F.relu(y)
    if act == 2:
        return F.leaky_relu(y, 0.1)
    return y


def block_epilogue(
    y: torch.Tensor,
    s: torch.Tensor | None,
    kind: str,
    gamma: torch.Tensor,
    slope: torch.Tensor,
    zeta: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """A binary block's epilogue, in place on ``y`` (returned): ``prelu(y + S(s) - gamma, slope) + zeta``.

    ``y``: the binary conv output (BN folded), float ``(N, C, H, W)``; ``s``: the shortcut source
    (the block input, pooled for a strided conv) with the same ``H, W``, or None for kind
    ``none``; ``kind``: the channel map of :data:`SHORTCUT_KINDS` (identity, repeat ``c mod C_s``,
    fold = mean of ``s[j]`` with ``j mod C == c``). RPReLU (ReActNet, Liu et al. 2020) and any
    PReLU-shaped activation (leaky, ReLU, linear with zero shifts) are one per-channel formula.
    """
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"unknown shortcut kind '{kind}', expected one of {list(SHORTCUT_KINDS)}")
    if (s is None) != (kind == "none"):
        raise ValueError(f"shortcut kind '{kind}' {'needs' if s is None else 'takes no'} a shortcut tensor")
    c = y.shape[1]
    if s is not None and shortcut_kind(s.shape[1], c) != kind:
        raise ValueError(f"shortcut kind '{kind}' does not map {s.shape[1]} channels to {c} "
                         f"(that is '{shortcut_kind(s.shape[1], c)}')")
    gamma, slope, zeta = (_f32(t).contiguous() for t in (gamma, slope, zeta))
    ext = _use_ext(backend)
    if ext is not None and y.dtype == torch.float32 and y.is_contiguous() and not y.requires_grad:
        src = _f32(s).contiguous() if s is not None else torch.empty(0)
        ext.block_epilogue(y, src, SHORTCUT_KINDS[kind], gamma, slope, zeta)
        return y
    if s is not None:
        y = y + map_channels(s, c)
    v = y - gamma.view(1, -1, 1, 1)
    return torch.where(v >= 0, v, v * slope.view(1, -1, 1, 1)) + zeta.view(1, -1, 1, 1)
