"""A small name -> factory registry, as timm and larq use, so configs name components by string."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. A `KeyError` (a failed lookup) and a `ValueError` (bad
    input: the CLIs print it as one ``error:`` line); ``str()`` is the message, unquoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """Maps names to classes or factories.

    Example:
        >>> QUANTIZERS = Registry("quantizer")
        >>> @QUANTIZERS.register("ste_sign")
        ... class SteSign: ...
        >>> QUANTIZERS.get("ste_sign")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._items if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
