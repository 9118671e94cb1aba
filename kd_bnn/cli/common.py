"""What the ``kd-bnn`` subcommands share: the one model argument, the config that goes with it,
image sources, the kernel backend line and the Ctrl-C convention of the training commands.

Torch-free at import (``kd-bnn val --gt-dir ... --pred-dir ...`` must not load torch): every
torch-using import sits inside the function that needs it.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_SUFFIXES",
    "backend_line",
    "config_for_model",
    "is_kdbnn",
    "list_images",
    "one_model",
    "parser",
    "run_command",
    "split_model_override",
    "teacher_phase_config",
]

#: image files a folder or glob source yields (those `kd_bnn.deploy.runtime` reads)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def parser(doc: str, prog: str | None, *, full_doc: bool = False) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of `doc` and whose epilog is
    the rest (or the whole `doc` as the description with ``full_doc``)."""
    if full_doc:
        return argparse.ArgumentParser(prog=prog, description=doc,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    head, _, rest = (doc or "").strip("\n").partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=" ".join(head.split()) or None,
                                   epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------------------ the model argument
def split_model_override(overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """``model=PATH`` taken out of the key=value overrides: ``(PATH or None, the other overrides)``.

    Raises:
        ValueError: ``model=`` given twice with different paths, or with an empty path.
    """
    model, rest = None, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "model":
            value = value.strip()
            if not value:
                raise ValueError("model=: expected a path, e.g. model=runs/demo/best.pt")
            if model is not None and value != model:
                raise ValueError(f"model= given twice ({model}, {value}); give one model")
            model = value
        else:
            rest.append(item)
    return model, rest


def one_model(ap: argparse.ArgumentParser, given: dict[str, str | None]) -> tuple[str | None, str]:
    """The model path from its spellings (``{"--model": ..., "--weights": ..., "model=": ...}``)
    and the flag it was given with (for messages); two different paths are a usage error."""
    named = {k: v for k, v in given.items() if v}
    if len(set(named.values())) > 1:
        ap.error("give the model once: " + ", ".join(f"{k} {v}" for k, v in named.items()))
    if not named:
        return None, next(iter(given), "--model")
    flag, path = next(iter(named.items()))
    return path, ("--model" if flag == "model=" else flag)


def is_kdbnn(path: str | os.PathLike) -> bool:
    """Whether `path` names a ``.kdbnn`` file (by suffix, or by its header for another name)."""
    p = Path(path)
    if p.suffix.lower() == ".kdbnn":
        return True
    if not p.is_file() or p.suffix.lower() in (".pt", ".pth", ".ckpt", ".weights", ".yaml", ".yml"):
        return False
    from kd_bnn.deploy.format import is_kdbnn_file

    return is_kdbnn_file(p)


def stored_state(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The state of a kd_bnn training checkpoint, or None for any other file (see
    `kd_bnn.engine.checkpoint.try_load_checkpoint`)."""
    from kd_bnn.engine.checkpoint import try_load_checkpoint

    return try_load_checkpoint(checkpoint)


def config_for_model(config: str | os.PathLike | None, overrides: Sequence[str],
                     checkpoint: str | os.PathLike | None, flag: str = "--model") -> tuple[Any, str]:
    """The experiment config of a command: ``(cfg, where it came from)``.

    `config` (a YAML) when given; else the resolved config a kd_bnn training checkpoint stores
    under ``"config"``. The key=value `overrides` apply on top of either.

    Raises:
        ConfigError: no config given and none stored in `checkpoint`, or an invalid config.
        FileNotFoundError: a `checkpoint` that does not exist (when its config is needed).
    """
    from kd_bnn.config import ConfigError, apply_overrides, load_config, validate

    if config is not None:
        return load_config(config, list(overrides)), str(config)
    if checkpoint is None:
        raise ConfigError(f"give {flag} CHECKPOINT (a kd_bnn training checkpoint stores its config) "
                          "or --config CONFIG")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    state = stored_state(checkpoint)
    saved = state.get("config") if state is not None else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{checkpoint} stores no experiment config (it is not a kd_bnn training "
                          "checkpoint, or an old one): pass --config CONFIG as well")
    source = f"{checkpoint} (stored config)"
    return validate(apply_overrides(untrusted(saved), list(overrides)), source), source


def untrusted(saved: dict[str, Any]) -> dict[str, Any]:
    """A config read from a file with every ``trust`` switched off: a checkpoint is data and never
    grants the unpickling of a ``.pt`` it names (say ``teacher.trust=true`` yourself to allow it)."""
    import copy

    out = copy.deepcopy(saved)
    for section in (out.get("teacher"), (out.get("student") or {}).get("model")):
        if isinstance(section, dict) and section.get("trust"):
            section["trust"] = False
    return out


def teacher_phase_config(cfg: Any, checkpoint: str | os.PathLike) -> tuple[Any, str]:
    """``(cfg, note)``: a run's teacher-phase checkpoint (``runs/<name>/teacher/best.pt``: float
    weights, ``binary_convs`` 0) read with the run's stored student config is the teacher, so
    the config loses its ``student`` section (with a note saying so); anything else unchanged."""
    if cfg.student is None:
        return cfg, ""
    state = stored_state(checkpoint) or {}
    if state.get("binary_convs") != 0:
        return cfg, ""
    return (cfg.model_copy(update={"student": None}),
            f"note: {checkpoint} holds a float model (the run's teacher phase): using it as the teacher")


# ------------------------------------------------------------------------------ image sources
def list_images(source: str | os.PathLike) -> list[Path]:
    """The images a ``--source`` names: one file, every image of a folder (not recursive), or
    the images matching a glob (``data/*.png``, ``frames/**/*.jpg``), sorted.

    Raises:
        FileNotFoundError: nothing there, or no image (``.png``/``.jpg``/``.jpeg``/``.bmp``).
        ValueError: two images with the same file stem (their result files would collide).
    """
    text = str(source)
    p = Path(text)
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{p}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    elif glob.has_magic(text):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True)
                       if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{text}: the pattern matches no images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        raise FileNotFoundError(f"{p}: no such image file, folder or glob pattern")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise ValueError(f"{seen[f.stem]} and {f} have the same name {f.stem!r}: their result files "
                             "would overwrite each other; predict them separately")
        seen[f.stem] = f
    return files


# ------------------------------------------------------------------------------ kernels
def backend_line(backend: str | None = None) -> str:
    """One line naming the kernels a ``.kdbnn`` runs on: the C++ extension and its ISA path,
    or the pure-torch fallback (and why)."""
    from kd_bnn.deploy.kernels import available_isas, default_isa, extension_available

    if backend == "torch":
        return "backend: pure-torch kernels (backend=torch)"
    if not extension_available():
        why = ("KDBNN_NO_EXT is set" if os.environ.get("KDBNN_NO_EXT", "0") not in ("", "0")
               else "C++ kernels unavailable, see the warning above")
        return f"backend: pure-torch fallback ({why})"
    return f"backend: C++ packed kernels, ISA {default_isa()} (available: {', '.join(available_isas())})"


# ------------------------------------------------------------------------------ training commands
def load_config_or_report(config: str, overrides: Sequence[str]) -> Any | None:
    """The experiment config, or None after printing the config error as one ``error:`` line (the
    caller exits with status 2)."""
    from kd_bnn.config import ConfigError, load_config

    try:
        return load_config(config, list(overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


#: Exit status of an interrupted run: 128 + SIGINT, as a shell reports a Ctrl-C.
EXIT_INTERRUPTED = 130


def run_command(fn: Callable[[], Any], prog: str, leading: Sequence[str],
                overrides: Sequence[str]) -> tuple[int, Any]:
    """``(0, fn())``, or ``(exit status, None)`` after printing what went wrong to stderr: a
    fixable error (missing file, bad value, unreadable or untrusted checkpoint) is one ``error:``
    line and exit 1; a stopped training phase prints the command that resumes it - the command as
    it was run (`prog`, e.g. ``kd-bnn train``, then `leading` and the overrides) with ``name=<its
    folder> --resume`` - and exits 130. A SIGTERM (``kill``, a scheduler ending a job) stops the run
    the same way as Ctrl-C, saving what resumes it."""
    import shlex
    import signal

    from kd_bnn.engine.checkpoint import CheckpointError
    from kd_bnn.engine.experiment import RunInterrupted

    def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave the handler alone
        previous = None
    try:
        return 0, fn()
    except RunInterrupted as exc:
        keep = [o for o in overrides if not o.startswith("name=")]
        again = shlex.join([*leading, *keep, f"name={exc.run_dir.name}", "--resume"])
        print(f"interrupted: {exc}\nresume with: {prog} {again}", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except KeyboardInterrupt:
        print("interrupted (outside a training phase)", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except (FileNotFoundError, PermissionError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
