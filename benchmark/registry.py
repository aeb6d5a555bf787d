"""Plugin registries: one small class, two instances (``DEFENSES`` and ``ATTACKS``).

Built-in plugins register by explicit import (``defenses/__init__.py``, ``attacks/__init__.py``).
Third-party plugins arrive from a file (``--plugin my_ue.py``), from installed packages through the
entry-point groups ``uebench.defenses`` / ``uebench.attacks``, or as a dotted path
``package.module:ClassName``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from benchmark.errors import UEBenchError

log = logging.getLogger(__name__)
T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> plugin class. Registration is a decorator; duplicates and unknown names fail loudly."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._classes: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(cls: T) -> T:
            key = name or getattr(cls, "name", None)
            if not isinstance(key, str) or not key.isidentifier():
                raise UEBenchError(f"{self.kind} {cls.__qualname__}: name {key!r} must be a Python identifier")
            existing = self._classes.get(key)
            if existing is not None and existing is not cls:
                raise UEBenchError(
                    f"{self.kind} name {key!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; choose another name"
                )
            cls.name = key
            self._classes[key] = cls
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)

    def get(self, name: str) -> T:
        if ":" in name and "." in name.split(":", 1)[0]:
            return self.load_dotted(name)
        self.load_entry_points()
        try:
            return self._classes[name]
        except KeyError:
            raise UEBenchError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        self.load_entry_points()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def load_entry_points(self) -> None:
        """Import every plugin that installed packages expose in this registry's entry-point group."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party package must not hide the built-ins
                log.warning("could not load %s plugin %r from entry point %s: %s", self.kind, ep.name, ep.value, exc)
                continue
            if isinstance(obj, type) and obj not in self._classes.values():
                self.register(ep.name)(obj)

    def load_dotted(self, path: str) -> T:
        """Import ``package.module:ClassName`` and register the class (under its own name)."""
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UEBenchError(f"cannot import {self.kind} module {module_name!r}: {exc}") from exc
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise UEBenchError(f"{module_name!r} has no class {attr!r}")
        if cls not in self._classes.values():
            self.register(getattr(cls, "name", None) or attr.lower())(cls)
        return cls


DEFENSES: Registry = Registry("defense", "uebench.defenses")
ATTACKS: Registry = Registry("attack", "uebench.attacks")


def load_plugin_file(path: str | Path) -> list[str]:
    """Execute a Python file whose ``@DEFENSES.register()`` / ``@ATTACKS.register()`` decorators run.

    Returns the names it registered, as ``kind:name``.
    """
    path = Path(path)
    if not path.is_file():
        raise UEBenchError(f"plugin file {str(path)!r} does not exist")
    before = {("defense", n) for n in DEFENSES._classes} | {("attack", n) for n in ATTACKS._classes}
    module_name = f"uebench_plugin_{path.stem}_{abs(hash(path.resolve())) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UEBenchError(f"cannot load plugin file {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UEBenchError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise UEBenchError(f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    after = {("defense", n) for n in DEFENSES._classes} | {("attack", n) for n in ATTACKS._classes}
    added = sorted(f"{kind}:{name}" for kind, name in after - before)
    log.info("plugin file %s registered %s", path, ", ".join(added) or "nothing")
    return added
