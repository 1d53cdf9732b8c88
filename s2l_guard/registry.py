"""Registries: attacks and defenses are looked up by name from the config.

A registry refuses malformed names and classes that lack the metadata every
plugin declares, and answers a miss with the closest name and the full list.
Built-in plugins are found, not listed: on the first lookup every module of the
registry's packages is imported (a new attack is one new file in ``attacks/mia/``).
Third-party plugins join through the entry-point group named by the registry
(e.g. ``s2l_guard.shakers``).
"""

from __future__ import annotations

import difflib
import re
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from .errors import ConfigError, S2LError

T = TypeVar("T", bound=type)
NAME = re.compile(r"^[a-z][a-z0-9_]*(\+[a-z][a-z0-9_]*)*$")
THREAT_MODELS = ("open-weights", "finetune-api", "generate-api")
REQUIRED_METADATA = ("name", "paper", "threat_models", "summary")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str, builtin_packages: tuple[str, ...] = ()):
        self.kind = kind
        self.group = entry_point_group
        self._builtin_packages = builtin_packages  # packages or single modules whose modules register built-ins
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator; validates the class's metadata and its name."""
        missing = [attr for attr in REQUIRED_METADATA if not getattr(cls, attr, None)]
        if missing:
            raise S2LError(f"{self.kind} {cls.__name__} lacks class attribute(s) {', '.join(missing)}")
        if not NAME.match(cls.name):
            raise S2LError(f"{self.kind} name {cls.name!r} must be lower_snake_case (combinations joined by '+')")
        bad = [t for t in cls.threat_models if t not in THREAT_MODELS]
        if bad:
            raise S2LError(f"{self.kind} {cls.name}: unknown threat model(s) {bad}; use {', '.join(THREAT_MODELS)}")
        if cls.name in self._items and self._items[cls.name] is not cls:
            raise S2LError(f"{self.kind} {cls.name!r} is registered twice ({self._items[cls.name].__module__} and {cls.__module__})")
        self._items[cls.name] = cls
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        import importlib
        import pkgutil

        for name in self._builtin_packages:
            package = importlib.import_module(name)
            for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
                importlib.import_module(f"{name}.{module.name}")
        for entry in entry_points(group=self.group):
            try:
                entry.load()
            except Exception as exc:  # noqa: BLE001 - a broken third-party package, reported as the user's fix
                raise ConfigError(f"the {self.kind} plugin {entry.name!r} ({entry.value}) failed to load: {type(exc).__name__}: {exc}; "
                                  f"fix or uninstall the package that provides it") from None  # fmt: skip

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name in self._items:
            return self._items[name]
        near = difflib.get_close_matches(name, list(self._items), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.names())}")

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._items[name]) for name in self.names()]
