"""Named kinds: one small ``Registry`` class for defenses, attacks, backbones, data sets, presets, figures.

A registry maps a name to an object: a plugin class (``DEFENSES``, ``ATTACKS``, here), a backbone spec
(``benchmark.models.BACKBONES``), a data set loader (``benchmark.data.DATASETS``), a preset
(``benchmark.presets.PRESETS``) or a figure (``leaderboard.figures.FIGURES``). Registration is a decorator
(``@REG.register("name")``) or a call (``REG.add(obj)``); a duplicate name and an unknown name fail loudly,
the latter as ``unknown <kind> 'x'; valid names: a, b, c``.

Built-in plugins register by explicit import (``defenses/__init__.py``, ``attacks/__init__.py``).
Third-party plugins arrive from a file (``--plugin my_ue.py``), from installed packages through the
entry-point groups ``uebench.defenses`` / ``uebench.attacks``, or as a dotted path
``package.module:ClassName``; those two ways exist only for a registry with an entry-point group.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from benchmark.errors import UEBenchError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Names that are not plugin names (plugin names are Python identifiers, for the ``name:k=v`` syntax):
# lower-case words joined by ``_``, ``-`` or ``.``, optionally a family ``prefix:<placeholder>`` such as
# ``hf:<name-or-path>``, which serves every name that starts with ``prefix:``.
SLUG = re.compile(r"[a-z0-9][a-z0-9_.-]*(:<[a-z-]+>)?")
# Plugin names become file names and page text: lower-case ASCII Python identifiers, at most 48 characters.
PLUGIN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def _describe(obj: object) -> str:
    if hasattr(obj, "__qualname__"):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__} from {type(obj).__module__}"


class Registry(Generic[T]):
    """Name -> object. Registration is a decorator; duplicates and unknown names fail loudly.

    ``entry_point_group`` makes it a plugin registry: names must be lower-case Python identifiers, registered
    classes get their ``name`` attribute set, and entry points and dotted paths are ways in.
    ``also`` is appended to the list of valid names in the unknown-name error (e.g. "or a .toml file").
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, also: str = "") -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.also = also
        self._entries: dict[str, T] = {}
        self._families: dict[str, str] = {}  # "hf" -> "hf:<name-or-path>"
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register the object under ``name`` (default: its ``name`` attribute)."""
        return lambda obj: self.add(obj, name)

    def add(self, obj: T, name: str | None = None) -> T:
        """Register ``obj`` under ``name`` (default: its ``name`` attribute) and return it."""
        key = name or getattr(obj, "name", None)
        if self.entry_point_group is not None:
            if not isinstance(key, str) or not PLUGIN_NAME.fullmatch(key):
                raise UEBenchError(f"{self.kind} {getattr(obj, '__qualname__', obj)}: name {key!r} must be a "
                                   f"Python identifier of lower-case ASCII letters, digits and '_', at most 48 "
                                   f"characters")
        elif not isinstance(key, str) or not SLUG.fullmatch(key):
            raise UEBenchError(f"{self.kind} {_describe(obj)}: name {key!r} must be lower-case letters, digits, "
                               f"'_', '-' or '.' (a family: 'prefix:<placeholder>')")
        existing = self._entries.get(key)
        if existing is not None and existing is not obj:
            raise UEBenchError(f"{self.kind} name {key!r} is already registered by {_describe(existing)}; "
                               f"choose another name")
        if self.entry_point_group is not None and isinstance(obj, type):
            obj.name = key
        self._entries[key] = obj
        if ":" in key:
            self._families[key.split(":", 1)[0]] = key
        return obj

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        if ":" in name:
            self._families.pop(name.split(":", 1)[0], None)

    def get(self, name: str) -> T:
        if self.entry_point_group is not None and ":" in name and "." in name.split(":", 1)[0]:
            return self.load_dotted(name)
        self.load_entry_points()
        if name in self._entries:
            return self._entries[name]
        family = self._families.get(name.split(":", 1)[0]) if ":" in name else None
        if family is not None:
            return self._entries[family]
        raise UEBenchError(f"unknown {self.kind} {name!r}; valid names: "
                           f"{', '.join(self.names()) or '(none)'}{', ' + self.also if self.also else ''}")

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.names()]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: str) -> bool:
        self.load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

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
            if isinstance(obj, type) and obj not in self._entries.values():
                self.register(ep.name)(obj)

    def load_dotted(self, path: str) -> T:
        """Import ``package.module:ClassName`` and register the class (under its own name)."""
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a module that fails to import is the user's error, named in one line
            raise UEBenchError(f"cannot import {self.kind} module {module_name!r}: {type(exc).__name__}: "
                               f"{exc}") from exc
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise UEBenchError(f"{module_name!r} has no class {attr!r}")
        if not dataclasses.is_dataclass(cls):  # nothing else is registered (or renamed) by a dotted path
            raise UEBenchError(f"{self.kind} {path!r}: {attr} is not a plugin (a dataclass)")
        if cls not in self._entries.values():
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
    before = {("defense", n) for n in DEFENSES._entries} | {("attack", n) for n in ATTACKS._entries}
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
    after = {("defense", n) for n in DEFENSES._entries} | {("attack", n) for n in ATTACKS._entries}
    added = sorted(f"{kind}:{name}" for kind, name in after - before)
    log.info("plugin file %s registered %s", path, ", ".join(added) or "nothing")
    return added
