"""Name -> class registries that fail loudly on an unknown or duplicate name.

A package of registered classes (`mmjax.models.fusion`, `mmjax.models.encoders`) calls
`import_modules(__name__, __path__)` in its `__init__`: every module in it is imported and so
registers itself; a new fusion or encoder is one new file, with no list to update.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_modules(package: str, path) -> None:
    """Imports every module of a package (its files register their classes)."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}

    def register(self, name: str):
        def add(cls):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name].__name__})")
            self._entries[name] = cls
            return cls

        return add

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
