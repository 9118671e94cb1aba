"""The one place that makes third-party libraries offline-safe (no downloads at run time).

Ultralytics reads these variables when it is first imported, so they are set when `kd_bnn` is
imported, before any room can import Ultralytics. `import_ultralytics()` is the only way the
package imports it: lazily, with its settings directory inside the user's cache, and with torch's
thread count restored afterwards (Ultralytics forces one CPU thread at import).
"""

from __future__ import annotations

import os
from pathlib import Path

_OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "YOLO_VERBOSE": "False",
}


def setup_offline_env() -> None:
    """Set the offline variables (keeping any value the user already set)."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if "YOLO_CONFIG_DIR" not in os.environ:
        cfg_dir = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kd_bnn" / "ultralytics"
        try:
            cfg_dir.mkdir(parents=True, exist_ok=True)
            os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
        except OSError:  # read-only home: Ultralytics falls back to a temp dir itself
            pass


def import_ultralytics():
    """Import and return the `ultralytics` module without its global side effects.

    Raises:
        ImportError: with an actionable message when Ultralytics is not installed.
    """
    setup_offline_env()
    import torch
    from PIL import Image

    threads = torch.get_num_threads()
    pil_open = Image.open
    try:
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
