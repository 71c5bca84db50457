"""Typed settings from plain data: the one way recipes, suite scales and evaluation settings read user values.

Every settings object in twinlm is a dataclass with type hints. `build(cls, data)` turns a plain mapping
(from YAML, JSON or `dataclasses.asdict`) into one, recursively, coercing each value to its field's type:

- `int`: a number or a count with a suffix, `1234`, `1.7e12`, `"1.7T"`, `"8.5B"`, `"250M"`, `"4K"`, `"1_000"`
  (powers of 1000, rounded to the nearest integer); `float`: a number, also from a string (`"3e-3"`, which
  YAML reads as a string); `bool`: `true/false`, `yes/no`, `on/off`, `1/0`; `str`: any scalar.
- `X | None`: `None` stays `None`; a union tries its members in order (`int | list[int]`: `5` or `[0, 3]`).
- `list[X]`, `tuple[X, Y]`, `dict[...]` (copied as is) and nested dataclasses, element by element.
- `hooks` map a type (`list[ShardSource]`) to a function `(value, where) -> object` for shorthands that the
  rules above do not cover.

Errors are `ConfigError` naming the dotted key, the value and what was expected; unknown keys are errors
that list the known ones. A dataclass's own `__post_init__` checks may raise `ConfigError` with a message
that starts with the field name; `build` puts the dotted path of the object in front.

`apply_overrides(raw, ["key.sub=value", ...])` sets dotted keys in a plain mapping before it is built, the
value parsed as YAML (`optim.lr=1e-3`, `sources=[a,b]`, `classification.seeds=5`); `deep_merge` merges mappings key
by key (lists and scalars replace).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

import yaml

from twinlm.errors import ConfigError

Hooks = Mapping[Any, Callable[[Any, str], Any]]

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(value: Any) -> int:
    """An integer count from 1234, 1.7e12, "1.7T", "8.5B", "250M", "4K", "1_000"."""
    if isinstance(value, bool):
        raise ConfigError(f"not a count: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(round(value))
    text = str(value).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9.eE+-]+)\s*([KMBGT]?)", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"not a count: {value!r} (use e.g. 1000, 1.7T, 8.5B, 250M, 4K)")
    try:
        number = float(m.group(1))
    except ValueError:
        raise ConfigError(f"not a count: {value!r} (use e.g. 1000, 1.7T, 8.5B, 250M, 4K)") from None
    return int(round(number * _SUFFIX.get(m.group(2).upper(), 1)))


def parse_value(text: str) -> Any:
    """The value of a `KEY=VALUE` override: YAML (`[a,b]`, `null`, `true`, `3`), an empty text is None."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {text!r} as a value: {e}") from None


# --- plain mappings ------------------------------------------------------------------------------------
def deep_merge(base: dict, top: dict) -> dict:
    """`top` merged over `base`: mappings key by key, anything else replaced (a deep copy of `top`'s)."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(raw: dict, overrides: list[str] | None, *, path_lists: Collection[str] = ()) -> dict:
    """A copy of `raw` with each `key.sub=value` set (list items by index: `data.0.weight=2`).

    Missing intermediate mappings are created (an unknown key then fails in `build`). `path_lists` names
    keys whose plain-string value is shorthand for a one-item list `[{path: value}]` (a recipe's `data`):
    an override that walks into one expands it first."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, text = item.split("=", 1)
        value = parse_value(text)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_index(part, key)]
                continue
            if node.get(part) is None:
                node[part] = {}
            elif isinstance(node[part], str) and part in path_lists:
                node[part] = [{"path": node[part]}]
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {part} is a value, not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, key)] = value
        else:
            node[last] = value
    return raw


def _index(part: str, key: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ConfigError(f"override key {key!r}: {part!r} should be a list index") from None


# --- typed building ------------------------------------------------------------------------------------
def build(cls: type, data: Any, where: str = "", *, noun: str = "key", hooks: Hooks | None = None):
    """A `cls` dataclass from a mapping (an instance passes as is; None is all defaults).

    `where` is the dotted path of `data` (for messages); `noun` is what a key is called in messages
    ("key", "suite setting")."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else str(k) for k in unknown)
        raise ConfigError(f"unknown {noun}{'s' if len(unknown) > 1 else ''} {names}; "
                          f"known{' under ' + where if where else ''}: {', '.join(fields)}")
    kwargs = {name: coerce(hints[name], value, f"{where}.{name}" if where else name, noun=noun, hooks=hooks)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if not where:
            raise
        raise ConfigError(f"{where}.{e}") from None


def coerce(tp: Any, value: Any, where: str, *, noun: str = "key", hooks: Hooks | None = None) -> Any:
    """`value` as type `tp` (see the module docstring); `where` names it in errors."""
    if hooks and tp in hooks:
        return hooks[tp](value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members[:-1]:
            try:
                return coerce(member, value, where, noun=noun, hooks=hooks)
            except ConfigError:
                continue
        return coerce(members[-1], value, where, noun=noun, hooks=hooks)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, where, noun=noun, hooks=hooks)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = args
        return [coerce(item, v, f"{where}.{i}", noun=noun, hooks=hooks) for i, v in enumerate(value)]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * (len(value) if isinstance(value, (list, tuple)) else 1)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(a, v, f"{where}.{i}", noun=noun, hooks=hooks) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        read, expected = _SCALARS[tp]
        try:
            return read(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: cannot read {value!r} as {tp.__name__}: expects {expected}") from None
    return value


def _read_int(value: Any) -> int:
    return parse_count(value)


def _read_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _read_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "yes", "1", "on"):
        return True
    if str(value).lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError


def _read_str(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError
    return str(value)


_SCALARS: dict[type, tuple[Callable[[Any], Any], str]] = {
    int: (_read_int, "a number or a count like 8.5B, 250M, 4K"),
    float: (_read_float, "a number like 3e-3"),
    bool: (_read_bool, "true or false"),
    str: (_read_str, "a string"),
}


def field_names(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of a dataclass, nested dataclass fields dotted (`classification.seeds`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_names(hints[f.name], f"{name}.")
        else:
            out.append(name)
    return out
