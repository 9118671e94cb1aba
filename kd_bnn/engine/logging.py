"""Run folder logging: ``runs/<name>/`` with config.yaml, train.log, metrics.csv, TensorBoard.

Only rank 0 writes (the others get a logger that prints nothing). TensorBoard events are written
when ``torch.utils.tensorboard`` can be imported, and skipped silently otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from kd_bnn.io import atomic_write_text


def is_tty(stream: Any = None) -> bool:
    """Whether `stream` (stderr by default) is an interactive terminal."""
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class RunLogger:
    """Writes the files of one run.

    Args:
        run_dir: the run's folder (created).
        enabled: False on non-zero ranks: nothing is written and messages go nowhere.
        config: the resolved config dict, written to ``config.yaml``.
        tensorboard: try to write TensorBoard events.
        console: also print log lines to stderr.
        keep_rows: keep the rows of an existing metrics.csv (a resumed run); otherwise a new run
            in the same folder starts a fresh table.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, config: dict | None = None,
                 tensorboard: bool = True, console: bool = True, keep_rows: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.tb = None
        name = f"kd_bnn.run.{id(self)}"
        self.log = logging.getLogger(name)
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        self._handlers: list[logging.Handler] = []
        if not enabled:
            self.log.addHandler(logging.NullHandler())
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(self.run_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._handlers.append(fh)
        if console:
            ch = logging.StreamHandler(sys.stderr)
            ch.setFormatter(logging.Formatter("%(message)s"))
            self._handlers.append(ch)
        for h in self._handlers:
            self.log.addHandler(h)
        if config is not None:
            self.write_config(config)
        if keep_rows and (self.run_dir / "metrics.csv").is_file():  # resumed run: keep earlier rows
            with open(self.run_dir / "metrics.csv", newline="") as fh_csv:
                self.rows = [dict(r) for r in csv.DictReader(fh_csv)]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except Exception:
                self.tb = None

    def write_config(self, config: dict) -> None:
        if self.enabled:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def info(self, msg: str, *args: Any) -> None:
        self.log.info(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log.warning(msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self.log.error(msg, *args)

    def log_epoch(self, row: dict[str, Any], step: int | None = None) -> None:
        """Append a row (epoch, lr, loss parts, eval metrics) to metrics.csv and TensorBoard."""
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in row.items()}
        epoch = row.get("epoch")
        self.rows = [r for r in self.rows if str(r.get("epoch")) != str(epoch)] + [row]
        columns: list[str] = []
        for r in self.rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step if step is not None else int(epoch or 0))
            self.tb.flush()

    def truncate(self, last_epoch: int) -> None:
        """Drop rows after `last_epoch` (a run resumed from an earlier checkpoint)."""
        self.rows = [r for r in self.rows if _as_int(r.get("epoch")) <= last_epoch]

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone
            self.close()

    def close(self) -> None:
        for h in self._handlers:
            h.close()
            self.log.removeHandler(h)
        self._handlers.clear()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _as_int(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except Exception:
            return str(v)
    return v
