"""Forward hooks by module path that collect intermediate feature maps (torchdistill-style).

Hooks are bound methods of a tiny picklable object (`_TapHook`), never local closures, so a
model with taps attached can still be ``copy.deepcopy``-ed (EMA) or pickled. A deep copy gets
its own copy of the recorder, so it never writes into the original's ``features``;
`remove_tap_hooks` strips such copied hooks from a copy that should not record at all.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class TapError(KeyError):
    """A tap name or module path that does not exist in the model."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (``.module``), else the model itself."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve_tap(model: nn.Module, name_or_path: str) -> str:
    """Module path of a tap given by the Detector's ``taps`` name or by a raw module path.

    Raises:
        TapError: naming the closest tap names / module paths when nothing matches.
    """
    model = unwrap_model(model)
    taps = getattr(model, "taps", None) or {}
    modules = dict(model.named_modules())
    if name_or_path in taps:
        path = taps[name_or_path]
        if path not in modules:
            close = difflib.get_close_matches(path, [m for m in modules if m], n=5)
            raise TapError(
                f"tap {name_or_path!r} of {type(model).__name__} points to module path {path!r}, "
                f"which does not exist; closest module paths: {close or 'none'}")
        return path
    if name_or_path in modules:
        return name_or_path
    candidates = list(taps) + [m for m in modules if m]
    close = difflib.get_close_matches(name_or_path, candidates, n=5, cutoff=0.5)
    raise TapError(
        f"{type(model).__name__} has no tap or module path {name_or_path!r}; "
        f"closest matches: {close or 'none'}; named taps: {sorted(taps) or 'none'}")


class _TapRecorder:
    """Holds the features of the latest forward: ``{tap name: output}``."""

    def __init__(self) -> None:
        self.features: dict[str, Any] = {}
        self.enabled = True

    def clear(self, module: nn.Module, inputs: Any) -> None:
        """Forward pre-hook on the root module: a new forward starts with no stale features."""
        self.features.clear()

    def __getstate__(self) -> dict:
        # Pickling a model with taps attached must not drag the stored activations along.
        return {"features": {}, "enabled": self.enabled}


class _TapHook:
    """Forward hook writing one module's output under ``name`` into a recorder."""

    def __init__(self, name: str, recorder: _TapRecorder) -> None:
        self.name = name
        self.recorder = recorder

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.recorder.enabled:
            self.recorder.features[self.name] = output


class FeatureTaps:
    """Record the outputs of named modules during each forward.

    Args:
        model: the model to tap (DDP wrappers are unwrapped).
        paths: ``{name: tap name or module path}``; a list of names means ``{n: n}``.

    Example:
        >>> with FeatureTaps(model, {"s16": "backbone.12"}) as taps:
        ...     model(images)
        ...     taps.features["s16"].shape
    """

    def __init__(self, model: nn.Module, paths: dict[str, str] | list[str]) -> None:
        self.model = unwrap_model(model)
        if not isinstance(paths, dict):
            paths = {p: p for p in paths}
        self.paths = {name: resolve_tap(self.model, p) for name, p in paths.items()}
        self._recorder = _TapRecorder()
        modules = dict(self.model.named_modules())
        self._handles: list[RemovableHandle] = [
            self.model.register_forward_pre_hook(self._recorder.clear)]
        for name, path in self.paths.items():
            hook = _TapHook(name, self._recorder)
            self._handles.append(modules[path].register_forward_hook(hook.hook))

    @property
    def features(self) -> dict[str, Any]:
        """Outputs of the latest forward of the tapped model, by tap name."""
        return self._recorder.features

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._recorder.features[name]
        except KeyError:
            raise TapError(
                f"tap {name!r} recorded nothing in the latest forward (module "
                f"{self.paths.get(name)!r} did not run, or no forward yet); "
                f"recorded: {sorted(self._recorder.features)}") from None

    def clear(self) -> None:
        """Drop the stored features (frees the activations they keep alive)."""
        self._recorder.features.clear()

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone
            self.remove()


def _is_tap_hook(fn: Any) -> bool:
    owner = getattr(fn, "__self__", None)
    return isinstance(owner, (_TapHook, _TapRecorder))


def remove_tap_hooks(model: nn.Module) -> int:
    """Strip every `FeatureTaps` hook from `model` (e.g. from a deep copy made for EMA).

    Returns:
        the number of hooks removed.
    """
    removed = 0
    for m in model.modules():
        for store in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, fn in store.items() if _is_tap_hook(fn)]:
                del store[key]
                removed += 1
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                          "_forward_pre_hooks_with_kwargs"):
                d = getattr(m, extra, None)
                if isinstance(d, dict):
                    for key in [k for k in d if k not in m._forward_hooks and k not in m._forward_pre_hooks]:
                        d.pop(key, None)
    return removed
