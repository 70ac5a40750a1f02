"""Formats registered by name (weight formats, KV cache formats): the rest of microscale asks for a name and
never branches on the format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what  # how errors name the knob
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            self._classes[name] = cls
            return cls

        return wrap

    def unregister(self, name: str) -> None:
        del self._classes[name]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def items(self) -> list[tuple[str, T]]:
        return list(self._classes.items())

    def get(self, name: str | None) -> T:
        """The class of scheme `name` (None: "none")."""
        key = name or "none"
        if key not in self._classes:
            raise ValueError(f"Unknown {self.what} {name!r}; known: {self.names()}.")
        return self._classes[key]
