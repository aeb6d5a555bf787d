"""Plugin specs on the command line and in presets: ``name`` or ``name:field=value,field=value``.

Values are converted to the dataclass field's type (``8/255`` is accepted for floats); values that
arrive typed (from a TOML preset) are checked against it: an int passes for a float, a bool is no
number, and floats must be finite. Anything else fails as a one-line ``UEBenchError``. A configured
plugin's *label* is its name plus the fields that differ from the protocol defaults (the dataclass
defaults with the preset's overrides applied), e.g. ``random_noise(mode=class)``. A plugin that modifies
another (a countermeasure and its ``base`` paradigm, ``Attack.composes``) starts from the base's defaults
and protocol, and its label always names a base other than the default: ``iss_jpeg(base=full_finetune)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any

from benchmark.errors import UEBenchError
from benchmark.registry import Registry


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``'em:steps=10,mode=class'`` -> ``('em', {'steps': '10', 'mode': 'class'})``."""
    if not isinstance(spec, str):
        raise UEBenchError(f"a plugin spec must be a string like 'name' or 'name:field=value', got "
                           f"{type(spec).__name__} {spec!r}")
    spec = spec.strip()
    # a dotted path 'pkg.mod:Class' may itself be followed by ':k=v'
    head, sep, rest = spec.partition(":")
    if sep and "." in head and rest and "=" not in rest.split(":", 1)[0]:
        cls, sep2, rest = rest.partition(":")
        head, sep = f"{head}:{cls}", sep2
    if not head:
        raise UEBenchError(f"empty plugin name in {spec!r}")
    fields: dict[str, str] = {}
    if sep and rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise UEBenchError(f"bad override {item!r} in {spec!r}; expected field=value")
            if key in fields:
                raise UEBenchError(f"field {key!r} is given twice in {spec!r}")
            fields[key] = value.strip()
    return head, fields


def _convert(value: Any, tp: Any, where: str) -> Any:
    """A spec's string converted to the field's type; a value from a TOML preset checked against it."""
    if not isinstance(value, str):
        return _check_type(value, tp, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        return _convert(value, args[0], where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UEBenchError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            return int(value)
        if tp is float:
            num, slash, den = value.partition("/")
            number = float(num) / float(den) if slash else float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UEBenchError(f"{where}: cannot read {value!r} as {'a finite ' if tp is float else ''}"
                           f"{tp.__name__}") from None
    return value


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """``value`` unchanged if it has the field's type (an int is a float; a bool is no number), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return value if value is None or len(args) != 1 else _check_type(value, args[0], where)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise UEBenchError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(tp)
    if expected is None:
        return value
    if not isinstance(value, expected) or (tp is not bool and isinstance(value, bool)):
        raise UEBenchError(f"{where}: {value!r} is {_a(type(value).__name__)}, not {_a(tp.__name__)}")
    if tp is float and not math.isfinite(value):
        raise UEBenchError(f"{where}: {value!r} must be a finite number")
    return value


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def convert_fields(cls: type, overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """The overrides of dataclass ``cls``, converted to (or checked against) its field types; an unknown
    field lists the valid ones."""
    if not isinstance(overrides, dict):
        raise UEBenchError(f"{where}: expected a table of fields, got {type(overrides).__name__} {overrides!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, overrides)) - fields)
    if unknown:
        raise UEBenchError(f"{where}: unknown field {unknown[0]!r}; valid fields: {', '.join(sorted(fields))}")
    return {k: _convert(v, hints[k], f"{where} field {k!r}") for k, v in overrides.items()}


def instantiate(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    """``cls(**kwargs)``; a check that fails in ``__post_init__`` (or a value it cannot handle) becomes a
    ``UEBenchError`` naming ``where``."""
    try:
        return cls(**kwargs)
    except UEBenchError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise UEBenchError(f"{where}: {exc}") from exc


def build(cls: type, overrides: dict[str, Any], where: str) -> Any:
    """Instantiate a plugin dataclass with converted overrides; unknown fields list the valid ones."""
    if not dataclasses.is_dataclass(cls):
        raise UEBenchError(f"{where}: {getattr(cls, '__qualname__', cls)!r} is not a plugin (a dataclass)")
    return instantiate(cls, convert_fields(cls, overrides, where), where)


@dataclasses.dataclass(frozen=True)
class Configured:
    """A plugin instance together with its label."""

    plugin: Any
    label: str

    @property
    def name(self) -> str:
        return type(self.plugin).name

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "version": type(self.plugin).version, **dataclasses.asdict(self.plugin)}


def configure(registry: Registry, spec: str, protocol: dict[str, dict[str, Any]] | None = None,
              backbone: str | None = None) -> Configured:
    """Resolve a spec: dataclass defaults < preset protocol (``protocol['*']``, ``protocol['*@backbone']``,
    ``protocol[name]``, then ``protocol['name@backbone']``, a per-architecture recipe) < the spec's own
    fields (keys of the ``*`` tables that a plugin does not have are ignored for it). The label shows
    the spec fields that differ from the protocol."""
    name, fields = parse_spec(spec)
    cls = registry.get(name)
    if not dataclasses.is_dataclass(cls):
        raise UEBenchError(f"{registry.kind} {name!r}: {cls.__qualname__} is not a plugin (a frozen dataclass)")
    name = cls.name
    protocol = protocol or {}
    valid = {f.name for f in dataclasses.fields(cls)}
    start, tables, shown = composed_start(registry, cls, fields, protocol, backbone)
    shared = {**protocol.get("*", {}), **(protocol.get(f"*@{backbone}", {}) if backbone else {})}
    proto: dict[str, Any] = dict(shared)
    for table in [*tables, name]:
        proto.update({**protocol.get(table, {}), **(protocol.get(f"{table}@{backbone}", {}) if backbone else {})})
    proto = {k: v for k, v in proto.items() if k in valid or k not in shared}
    base = build(cls, {**start, **proto}, f"{registry.kind} {name!r} (preset)")
    plugin = build(cls, {**start, **proto, **fields}, f"{registry.kind} {name!r}")
    changed = shown + [f.name for f in dataclasses.fields(cls)
                       if f.name not in shown and getattr(plugin, f.name) != getattr(base, f.name)]
    label = name if not changed else f"{name}({','.join(f'{k}={_show(getattr(plugin, k))}' for k in changed)})"
    return Configured(plugin, label)


def composed_start(registry: Registry, cls: type, fields: dict[str, str], protocol: dict[str, dict[str, Any]],
                   backbone: str | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """For a plugin that modifies another (its class names the field in ``composes``, e.g. a countermeasure's
    ``base`` paradigm): the base's dataclass defaults of the fields both have, the protocol tables of the base
    (applied before the plugin's own), and the composing field, always shown in the label when it is not the
    class default. ``({}, [], [])`` for any other plugin."""
    composes = getattr(cls, "composes", "")
    if not composes:
        return {}, [], []
    default = next(f.default for f in dataclasses.fields(cls) if f.name == composes)
    value = default
    for table in ("*", f"*@{backbone}" if backbone else "", cls.name,
                  f"{cls.name}@{backbone}" if backbone else ""):  # the order configure merges in
        value = protocol.get(table, {}).get(composes, value)
    value = fields.get(composes, value)
    if not isinstance(value, str):
        raise UEBenchError(f"{registry.kind} {cls.name!r}: {composes}={value!r} must be the name of a "
                           f"{registry.kind}")
    base_cls = registry.get(value)
    if base_cls is cls or not dataclasses.is_dataclass(base_cls):
        raise UEBenchError(f"{registry.kind} {cls.name!r}: {composes}={value!r} cannot be its base")
    valid = {f.name for f in dataclasses.fields(cls)}
    start = {f.name: f.default for f in dataclasses.fields(base_cls)
             if f.name in valid and f.default is not dataclasses.MISSING}
    return {**start, composes: value}, [base_cls.name], [composes] if value != default else []


def _show(value: Any) -> str:
    """A field value as a label shows it: ``8/255`` for a pixel step or radius given that way, else ``%g``."""
    if not isinstance(value, float):
        return str(value)
    k = round(value * 255)
    if 0 < value < 1 and float(f"{value:.4g}") != value and math.isclose(value, k / 255, rel_tol=1e-9):
        return f"{k}/255"
    return f"{value:g}"


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash of a JSON-able object that does not depend on key order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
