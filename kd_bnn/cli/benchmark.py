"""Benchmarks (scripts, not timed tests).

    kd-bnn benchmark kernels [--threads N] [--json OUT] [--repeat R] [--isa NAME] [--torch-isa avx2]
    kd-bnn benchmark model --model model.kdbnn [--teacher-config CONFIG] [--threads 1] [--json OUT]
                           [--isa NAME] [--torch-isa avx2]
    kd-bnn benchmark train --config configs/demo.yaml [--batch N] [--steps N] [--random-data] [key=value ...]
    (python tools/benchmark.py takes the same arguments.)

Subcommands register themselves in ``SUBCOMMANDS`` (name -> (add_arguments, run)); add
``model`` / ``train`` the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

# What caps torch's own CPU kernels at an ISA: oneDNN (torch's fp32 convolutions) and ATen's
# dispatch each read one variable, once, when torch first uses them.
_TORCH_ISA_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def _torch_isa_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--torch-isa",
        choices=("native", *_TORCH_ISA_ENV),
        default="native",
        help="cap torch's baseline kernels (oneDNN, ATen) at this ISA, as they run on a CPU that lacks "
        "AVX-512; with --isa avx2 this emulates an AVX2-only machine (default: what this CPU has)",
    )


def _cap_torch_isa(name: str) -> None:
    """Set the environment that caps torch's kernels at ISA `name` (before torch is imported)."""
    env = _TORCH_ISA_ENV.get(name, {})
    if not env or all(os.environ.get(k) == v for k, v in env.items()):
        return
    if "torch" in sys.modules:
        raise ValueError(
            f"--torch-isa {name}: torch is already imported in this process, so its ISA is fixed; "
            f"run with {' '.join(f'{k}={v}' for k, v in env.items())} in the environment instead"
        )
    os.environ.update(env)


def _kernels_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--repeat", type=int, default=10, help="interleaved timing rounds; the minimum is kept"
    )
    p.add_argument("--isa", default=None, help="force a kernel ISA path: scalar|popcnt|avx2|avx512")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or the thread's CPU clock (robust on a busy machine; --threads 1 only)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON to this file")
    _torch_isa_arg(p)


def _kernels_run(args: argparse.Namespace) -> int:
    try:
        _cap_torch_isa(args.torch_isa)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from kd_bnn.deploy.kernels import available_isas
    from kd_bnn.deploy.kernels.bench import benchmark_kernels
    from kd_bnn.io import atomic_write_text

    rows = benchmark_kernels(
        threads=args.threads, repeat=args.repeat, isa=args.isa, clock=args.clock
    )
    print(
        f"kernel ISA paths available: {available_isas()}; timed: {rows[0].isa}; torch: {rows[0].torch_isa}; "
        f"threads: {args.threads}; {args.clock} clock, min of {args.repeat} interleaved rounds"
    )
    head = f"{'layer':28s} {'torch fp32':>10s} {'xnor':>8s} {'x':>6s} {'xnor pk':>8s} {'x':>6s} {'bwn':>8s} {'x':>6s} {'w1a8':>8s} {'x':>6s} {'w1a8 f':>8s} {'w fp32':>8s} {'w bin':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.shape:28s} {r.torch_fp32_ms:8.2f}ms {r.xnor_ms:6.2f}ms {r.xnor_speedup:5.2f}x "
            f"{r.xnor_packed_ms:6.2f}ms {r.xnor_packed_speedup:5.2f}x {r.bwn_ms:6.2f}ms {r.bwn_speedup:5.2f}x "
            f"{r.w1a8_ms:6.3f}ms {r.w1a8_speedup:5.2f}x {r.w1a8_float_ms:6.3f}ms "
            f"{r.weight_bytes_fp32 / 1024:6.0f}KB {r.weight_bytes_packed / 1024:6.1f}KB"
        )
    print(
        "ratios = torch fp32 time / kernel time (torch = best of NCHW and channels_last); "
        "'xnor' = float in/out incl. binarize+pack, 'xnor pk' = packed in/out (chained layers), "
        "'w1a8' = int8 in -> int8 out (chained W1A8 layers), 'w1a8 f' = int8 in -> float out"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML with a student and distill terms")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is kept")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the config's)")
    p.add_argument("--random-data", action="store_true", help="random images/boxes instead of the dataset")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON to this file")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")


def _train_run(args: argparse.Namespace) -> int:
    from kd_bnn.config import ConfigError, load_config
    from kd_bnn.engine.bench import format_train_benchmark, train_benchmark
    from kd_bnn.io import atomic_write_text

    try:
        cfg = load_config(args.config, args.overrides)
        res = train_benchmark(cfg, args.batch, args.steps, rounds=args.rounds, device=args.device,
                              random_data=args.random_data)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_train_benchmark(res))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=".kdbnn file written by kd-bnn export (tools/export.py)")
    p.add_argument("--teacher-config", default=None,
                   help="experiment YAML whose teacher is timed (default: the file's skeleton in fp32)")
    p.add_argument("--threads", type=int, default=1, help="torch/kernel intra-op threads (default 1)")
    p.add_argument("--repeat", type=int, default=10, help="timed forwards per model; min and median kept")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON to this file")
    p.add_argument("--isa", default=None, help="force the runtime's kernel ISA path: scalar|popcnt|avx2|avx512")
    _torch_isa_arg(p)


def _model_run(args: argparse.Namespace) -> int:
    # both models run in fresh processes, which inherit this environment
    try:
        _cap_torch_isa(args.torch_isa)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.isa:
        os.environ["KDBNN_ISA"] = args.isa
    from kd_bnn.deploy.format import FormatError
    from kd_bnn.engine.bench_model import benchmark_model, format_model_benchmark
    from kd_bnn.io import atomic_write_text

    try:
        res = benchmark_model(args.model, args.teacher_config, args.threads, repeat=args.repeat)
    except (FormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from kd_bnn.cli.common import backend_line

    print(backend_line())
    print(format_model_benchmark(res))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


SUBCOMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
] = {
    "kernels": (
        _kernels_args,
        _kernels_run,
        "torch fp32 conv2d vs XNOR / BWN / W1A8 kernels on standard layers",
    ),
    "train": (_train_args, _train_run, "images/s of teacher, student and KD training steps (kd_bnn.engine.bench)"),
    "model": (_model_args, _model_run, "whole .kdbnn student (packed kernels) vs float teacher: latency, memory, size"),
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _run, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides of `train` given between or after its flags
        if args.command != "train" or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    raise SystemExit(main())
