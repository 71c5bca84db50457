"""Command-line flags generated from a settings dataclass (twinlm.eval.settings), so that a default lives once.

`add_settings_flags(parser, cls)` adds one flag per field: `--<name>` with underscores as dashes, plus the
field's `flags` metadata (other spellings); its help is the field's `help` metadata with the dataclass default;
a scalar string field with `choices` offers them. A `bool` field is `--name` / `--no-name`. Every other value
is read as text:
- a field that may hold a list takes a comma list (`--seeds 0,1,2`, `--tasks sst2,rte`; a single value is a
  one-item list, so `--seeds 3` is the seed 3, not three seeds);
- a number field that may be None takes `none`, `all` or `0` for None (`--max-train all`);
- anything else is the text;
and `settings_from_flags(cls, args)` coerces it to the field's type as twinlm.configs reads every setting
(counts like `4K`), so an error names the flag. Flags not given keep the dataclass default. This module imports
nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from twinlm.configs import coerce

_DEST = "setting__"  # prefix of the namespace attributes these flags fill (apart from hand-written flags)
_NONE_WORDS = ("none", "all", "0")


def add_settings_flags(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """One flag per field of the dataclass `cls` (module docstring), in a group called `title`."""
    group = parser.add_argument_group(title or f"settings ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        names = [flag_name(f.name), *f.metadata.get("flags", ())]
        # argparse formats help with %: a literal one is doubled
        text = f"{f.metadata.get('help', '')} (default: {_shown(_default(f))})".strip().replace("%", "%%")
        dest = _DEST + f.name
        if hints[f.name] in (bool, bool | None):  # --name / --no-name (a bool | None setting: None unless given)
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=text)
            continue
        choices = f.metadata.get("choices")
        scalar_choices = [c for c in choices if c is not None] if choices and not _admits_list(hints[f.name]) else None
        group.add_argument(*names, dest=dest, default=argparse.SUPPRESS, choices=scalar_choices,
                           metavar=_metavar(f.name, hints[f.name]) if not scalar_choices else None, help=text)


def settings_from_flags(cls: type, args: argparse.Namespace, given: dict[str, Any] | None = None) -> Any:
    """A `cls` built from the flags of `add_settings_flags` that `args` holds; `given` adds plain values for
    fields whose flag was not given. Type errors (ConfigError) name the flag; the dataclass's own checks run."""
    hints = typing.get_type_hints(cls)
    values = dict(given or {})
    for field, raw in flags_given(args).items():
        values[field] = raw if isinstance(raw, bool) else _plain(hints[field], raw)
    return cls(**{k: coerce(hints[k], v, flag_name(k)) for k, v in values.items()})


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """{field: the flag's text (a bool flag: its value)} of the settings flags the command line gave."""
    return {name[len(_DEST):]: raw for name, raw in vars(args).items() if name.startswith(_DEST)}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _plain(tp: Any, text: str) -> Any:
    """The plain value of a flag's text for a field of type `tp` (module docstring)."""
    if _admits_list(tp):
        return [part.strip() for part in text.split(",") if part.strip()]
    members = _members(tp)
    if type(None) in members and any(m in (int, float) for m in members) and text.strip().lower() in _NONE_WORDS:
        return None
    return text


def _members(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin is typing.Union or origin is types.UnionType else (tp,)


def _admits_list(tp: Any) -> bool:
    return any(typing.get_origin(m) is list for m in _members(tp))


def _metavar(name: str, tp: Any) -> str:
    if _admits_list(tp):
        return "A,B,…"
    members = [m for m in _members(tp) if m is not type(None)]
    return {int: "N", float: "X"}.get(members[0], name.upper()) if len(members) == 1 else "VALUE"


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip() != value or value == "":
        return repr(value)
    return str(value)


__all__ = ["add_settings_flags", "settings_from_flags", "flags_given", "flag_name"]
