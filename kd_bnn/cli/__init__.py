"""``kd-bnn``: one command for the toolkit, one argument style.

    kd-bnn train CONFIG [key=value ...] [--resume]          (python tools/train.py)
    kd-bnn val --model CKPT|MODEL.kdbnn [--config CONFIG] [key=value ...]
    kd-bnn val --gt-dir LABELS --pred-dir RESULTS [--split IDS]   (python tools/eval.py)
    kd-bnn export --model CKPT --out MODEL.kdbnn [key=value ...]  (python tools/export.py)
    kd-bnn predict --model MODEL.kdbnn|CKPT --source FILE|DIR|GLOB --out DIR  (python tools/infer.py)
    kd-bnn benchmark kernels|model|train ...                 (python tools/benchmark.py)
    kd-bnn demo [key=value ...]                              (python tools/demo.py)

Each subcommand is a module of this package with ``main(argv, prog) -> int``, imported only
when it runs (``kd-bnn val --gt-dir ...`` never imports torch); ``tools/<name>.py`` are thin
wrappers around the same ``main``.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: subcommand -> (module in kd_bnn.cli, the tools/ script it replaces, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "train.py", "train a teacher or a binary student from a config"),
    "val": ("val", "eval.py", "evaluate a checkpoint or .kdbnn on the val split, or KITTI result files"),
    "export": ("export", "export.py", "export a trained student to a bit-packed .kdbnn (and ONNX)"),
    "predict": ("predict", "infer.py", "detect objects in an image, a folder or a glob; KITTI result files"),
    "benchmark": ("benchmark", "benchmark.py", "time kernels, a whole .kdbnn model, or training steps"),
    "demo": ("demo", "demo.py", "the whole pipeline on synthetic KITTI and the ablation table"),
    "make-synthetic": ("make_synthetic", "make_synthetic.py", "generate a synthetic KITTI set"),
    "compare": ("compare", "compare_students.py", "compare binary students at an equal training budget"),
    "anchors": ("anchors", "anchors.py", "anchors by k-means on KITTI labels"),
    "bench-eval": ("bench_eval", "bench_eval.py", "time the KITTI evaluator against the official devkit"),
}

#: other spellings: the names of the tools/ scripts
ALIASES = {"eval": "val", "infer": "predict", "compare-students": "compare", "make_synthetic": "make-synthetic",
           "bench_eval": "bench-eval"}


def _help() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    rows = "\n".join(f"  {name:<{width}}{text}  (tools/{tool})" for name, (_, tool, text) in COMMANDS.items())
    return (
        "usage: kd-bnn COMMAND [ARGS ...]\n\n"
        "Binary-weight YOLO detectors trained by knowledge distillation (kd_bnn).\n\n"
        f"commands:\n{rows}\n\n"
        "`kd-bnn COMMAND --help` describes a command. Commands that read a config take key=value\n"
        "overrides (train.epochs=5 data.batch_size=4); val, export and predict take one model\n"
        "argument, --model (a kd_bnn checkpoint, whose stored config makes --config optional, or a\n"
        ".kdbnn), also written model=PATH.\n"
        f"aliases: {', '.join(f'{a} = {c}' for a, c in ALIASES.items())}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """``kd-bnn COMMAND ARGS``: run COMMAND's ``main(ARGS)``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help":  # kd-bnn help val
            return main([argv[1], "--help"])
        out = sys.stdout if argv else sys.stderr
        print(_help(), end="", file=out)
        return 0 if argv else 2
    if argv[0] == "--version":
        from kd_bnn import __version__

        print(f"kd-bnn {__version__}")
        return 0
    name = ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        print(f"kd-bnn: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"kd_bnn.cli.{COMMANDS[name][0]}")
    try:
        return int(module.main(argv[1:], prog=f"kd-bnn {name}") or 0)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
