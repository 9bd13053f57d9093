"""Name -> class registries that fail loudly on an unknown or duplicate name."""

from __future__ import annotations


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
