"""What the training commands share: one convention for the errors a user can fix and for Ctrl-C.

A fixable error (missing file, bad value, unreadable checkpoint) is one ``error:`` line and exit
status 1; a stopped training phase prints how to resume it and exits 130 (128 + SIGINT, as a
shell reports a Ctrl-C).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kd_bnn.engine.checkpoint import CheckpointError
from kd_bnn.engine.experiment import RunInterrupted

__all__ = ["EXIT_INTERRUPTED", "run_command"]

EXIT_INTERRUPTED = 130


def run_command(fn: Callable[[], Any], tool: str, leading: Sequence[str],
                overrides: Sequence[str]) -> tuple[int, Any]:
    """``(0, fn())``, or ``(exit status, None)`` after printing what went wrong to stderr.

    ``tool``, ``leading`` (the arguments before the overrides) and ``overrides`` spell the
    command that resumes an interrupted run: the same command with ``name=<its folder>
    --resume``.
    """
    try:
        return 0, fn()
    except RunInterrupted as exc:
        keep = [o for o in overrides if not o.startswith("name=")]
        again = shlex.join([*leading, *keep, f"name={exc.run_dir.name}", "--resume"])
        print(f"interrupted: {exc}\nresume with: python tools/{tool}.py {again}", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except KeyboardInterrupt:
        print("interrupted (outside a training phase)", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1, None
