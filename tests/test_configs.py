"""twinlm.configs: the one reader of user settings (recipes, suite scales, evaluation settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from twinlm.configs import apply_overrides, build, deep_merge, field_names, parse_count
from twinlm.errors import ConfigError, UnknownName


def test_parse_count():
    assert parse_count("1.7T") == 1_700_000_000_000
    assert parse_count("8.5B") == 8_500_000_000
    assert parse_count("250M") == 250_000_000 and parse_count("4K") == 4000 and parse_count(12) == 12
    assert parse_count("1e3") == 1000
    with pytest.raises(ValueError):
        parse_count("lots")


@dataclass
class Inner:
    seeds: int | list[int] = 3
    rate: float = 1e-3
    name: str | None = None

    def __post_init__(self):
        if self.rate < 0:
            raise ConfigError(f"rate: {self.rate} must not be negative")


@dataclass
class Outer:
    tokens: int = 0
    flag: bool = False
    pair: tuple[float, float] = (0.9, 0.98)
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_build_coerces_nested_values_and_names_the_key():
    o = build(Outer, {"tokens": "8.5B", "flag": "yes", "pair": [1, "2"], "names": ["a", 3],
                      "inner": {"seeds": "5", "rate": "3e-3"}})
    assert o == Outer(8_500_000_000, True, (1.0, 2.0), ["a", "3"], Inner(5, 0.003))
    assert build(Outer, {"inner": {"seeds": [0, 4]}}).inner.seeds == [0, 4]   # a union tries its members
    with pytest.raises(ConfigError, match=r"inner.rate: cannot read 'fast' as float: expects a number"):
        build(Outer, {"inner": {"rate": "fast"}})
    with pytest.raises(ConfigError, match=r"unknown key inner.sedes; known under inner: seeds, rate, name"):
        build(Outer, {"inner": {"sedes": 1}})
    with pytest.raises(ConfigError, match=r"unknown suite settings tokenz, x; known: tokens"):
        build(Outer, {"tokenz": 1, "x": 2}, noun="suite setting")
    with pytest.raises(ConfigError, match=r"^inner.rate: -1.0 must not be negative"):   # __post_init__, located
        build(Outer, {"inner": {"rate": -1}})
    assert isinstance(ConfigError("x"), ValueError)


def test_overrides_set_dotted_keys_on_plain_data():
    raw = {"a": {"b": 1}, "data": "/x", "items": [{"w": 1}]}
    out = apply_overrides(raw, ["a.b=3e-3", "a.c=[x, y]", "new.key=null", "data.0.weight=2", "items.0.w=5"],
                          path_lists=("data",))
    assert out == {"a": {"b": "3e-3", "c": ["x", "y"]}, "new": {"key": None},
                   "data": [{"path": "/x", "weight": 2}], "items": [{"w": 5}]}
    assert raw["a"] == {"b": 1}   # a copy
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        apply_overrides(raw, ["a.b"])
    assert deep_merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": 3}, "l": [2]}) == {"a": {"b": 3, "c": 2}, "l": [2]}


def test_field_names_are_dotted_and_unknown_names_are_key_errors():
    assert field_names(Outer) == ["tokens", "flag", "pair", "names", "inner.seeds", "inner.rate", "inner.name"]
    err = UnknownName("unknown thing 'x'")
    assert isinstance(err, KeyError) and isinstance(err, ConfigError) and str(err) == "unknown thing 'x'"
