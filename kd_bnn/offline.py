"""The one place that makes third-party libraries offline-safe (no downloads at run time).

`import_ultralytics()` is the only way the package imports Ultralytics: lazily, with the offline
variables (`YOLO_OFFLINE`, `YOLO_AUTOINSTALL`, ...) and a settings directory inside the user's
config folder set for the duration of that import only (Ultralytics reads them when it is first
imported), so `import kd_bnn` leaves the user's own environment and Ultralytics settings alone;
torch's thread count and `PIL.Image.open` are restored afterwards (Ultralytics forces one CPU
thread and patches PIL at import).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "YOLO_VERBOSE": "False",
}


@contextmanager
def offline_env() -> Iterator[None]:
    """Set the offline variables for the duration of the block (any value the user already set is
    kept), then remove those this function added."""
    added = [k for k in _OFFLINE_ENV if k not in os.environ]
    for key in added:
        os.environ[key] = _OFFLINE_ENV[key]
    if "YOLO_CONFIG_DIR" not in os.environ:
        cfg_dir = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kd_bnn" / "ultralytics"
        try:
            cfg_dir.mkdir(parents=True, exist_ok=True)
            os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
            added.append("YOLO_CONFIG_DIR")
        except OSError:  # read-only home: Ultralytics falls back to a temp dir itself
            pass
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def import_ultralytics():
    """Import and return the `ultralytics` module without its global side effects.

    Raises:
        ImportError: with an actionable message when Ultralytics is not installed.
    """
    import torch
    from PIL import Image

    threads = torch.get_num_threads()
    pil_open = Image.open
    try:
        with offline_env():
            import ultralytics
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Ultralytics models need the 'ultralytics' package: pip install ultralytics"
        ) from exc
    torch.set_num_threads(threads)
    # Ultralytics replaces PIL.Image.open process-wide with a wrapper that, on an unidentified
    # file, tries to install and import a HEIF plugin (ModuleNotFoundError offline): a corrupt
    # image would no longer be a PIL error the data checks can name.
    Image.open = pil_open
    return ultralytics
