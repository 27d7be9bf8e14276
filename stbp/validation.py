"""One validation mechanism for the training config and the sweep file.

Both are trees of frozen pydantic dataclasses made with :func:`section`. Pydantic checks every value strictly (a
bool is never a number, ``"32"`` is never an int, an int is a float, nothing is NaN or infinite) against its
field's type and the constraints written on it (``Field(gt=0)``); a field's docstring is its documentation, for
``--help`` and the JSON Schema alike. This module turns pydantic's errors into one message that names the key
(its dotted path), the bad value and what is allowed, raised as the section's error class::

    v_th must be > 0, got -0.1
    search.num_samples expects an int, got 'many' (str)
    unknown sweep key search.num_sample (did you mean 'num_samples'?); valid keys: searcher, sampler, ...

Imports only the standard library, pydantic and PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo

__all__ = ["ConfigError", "Note", "Rule", "Word", "section", "build", "did_you_mean", "unknown_key", "load_yaml"]


class ConfigError(ValueError):
    """An invalid, ill-typed or unknown configuration value."""

    key_noun = "config field"


# Markers a field's Annotated[...] may carry for its messages (pydantic ignores them):
Note = dataclasses.make_dataclass("Note", ["text"], frozen=True)  # appended to a range message: Note("0 = all")
Rule = dataclasses.make_dataclass("Rule", ["text"], frozen=True)  # replaces the range message derived from bounds
Word = dataclasses.make_dataclass("Word", ["text"], frozen=True)  # names the type: Word("a number")

_PYDANTIC = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def section(cls: type | None = None, *, error: type[ConfigError] = ConfigError):
    """Decorator: ``cls`` as a frozen, strictly validated pydantic dataclass whose constructor (and so
    ``dataclasses.replace``) raises ``error`` with a readable message instead of pydantic's ValidationError."""

    def wrap(cls: type) -> type:
        cls = pydantic_dataclass(frozen=True, config=_PYDANTIC)(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                # A misspelt key is why another is missing: say so first.
                first = min(exc.errors(), key=lambda e: e["type"] != "unexpected_keyword_argument")
                failure = error(describe(cls, first, error))
                failure.detail = (cls, first)  # build() re-describes it under its key
                raise failure from None

        cls.__init__ = __init__
        cls.__error__ = error
        return cls

    return wrap if cls is None else wrap(cls)


def build(cls: type, values: Mapping[str, Any] | None, where: str = "") -> Any:
    """``cls(**values)`` for a :func:`section` class read under the dotted key ``where`` of a file (its errors then
    name ``where.field``); ``None`` gives the defaults."""
    error = cls.__error__
    if values is not None and not isinstance(values, Mapping):
        raise error(
            f"{where} must be a mapping with keys {', '.join(init_fields(cls))}, got {values!r} "
            f"({type(values).__name__})"
        )
    try:
        return cls(**(values or {}))
    except ConfigError as exc:
        if not hasattr(exc, "detail") or not where:
            raise
        raise error(describe(*exc.detail, error, where)) from None


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def did_you_mean(key: Any, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(where: str, key: Any, valid: Sequence[str], error: type[ConfigError] = ConfigError) -> ConfigError:
    place = f"{where}." if where else ""
    return error(f"unknown {error.key_noun} {place}{key}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")


# ----------------------------------------------------------------------------------------------------------
# Pydantic's error -> one message
# ----------------------------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an int", float: "a float", bool: "a bool", str: "a string"}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_pattern_mismatch")


def unwrap(hint: Any) -> tuple[Any, list, bool]:
    """``(type, constraints, optional)`` of a type hint, its ``Annotated[...]`` and ``| None`` taken off."""
    meta, optional = [], False
    while True:
        args = typing.get_args(hint)
        if typing.get_origin(hint) is Annotated:
            hint = args[0]
            meta += [m for item in args[1:] for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
            hint, optional = next(a for a in args if a is not type(None)), True
        else:
            return hint, meta, optional


def _at(cls: type, loc: tuple) -> tuple[str, Any, list, bool, tuple]:
    """Follow ``loc`` from ``cls``: the path shown, the type there (with its constraints and whether it may be
    None), and the part of ``loc`` below a mapping field (its entry's key)."""
    hint, meta, optional, path = cls, [], False, ""
    for i, part in enumerate(loc):
        if dataclasses.is_dataclass(hint) and part in hint.__pydantic_fields__:
            info = hint.__pydantic_fields__[part]
            hint, meta, optional = unwrap(info.annotation)
            meta, path = [*info.metadata, *meta], f"{path}.{part}".lstrip(".")
        elif isinstance(part, int) and typing.get_origin(hint) in (tuple, list):
            args = typing.get_args(hint)
            hint, meta, optional = unwrap(args[0] if args[-1] is Ellipsis else args[part])
            path = f"{path}[{part}]"
        elif dataclasses.is_dataclass(hint):  # a key it does not have
            return f"{path}.{part}".lstrip("."), None, [], False, ()
        else:  # an entry of a mapping
            return path, hint, meta, optional, loc[i:]
    return path, hint, meta, optional, ()


def type_word(hint: Any, meta: Sequence = (), optional: bool = False) -> str:
    """How a message names a type: 'an int', 'a float or None', 'a pair of floats'..."""
    hint, more, maybe_none = unwrap(hint)
    meta, origin, args = [*meta, *more], typing.get_origin(hint), typing.get_args(hint)
    word = next((m.text for m in meta if isinstance(m, Word)), None)
    if word is None:
        word = (
            "a string"
            if origin is Literal
            else "a list"
            if Ellipsis in args
            else "a pair of floats"
            if origin is tuple
            else "a mapping of strings to strings"
            if origin in (dict, Mapping)
            else _TYPE_WORDS.get(hint, str(hint))
        )
    return word + (" or None" if optional or maybe_none else "")


def _range_phrase(meta: Sequence, optional: bool) -> str:
    """'must be > 0', 'must be in (0, 1]', 'must be None or > 0', 'must be a non-empty string'..."""
    note = next((f" ({m.text})" for m in meta if isinstance(m, Note)), "")
    bounds = {k: getattr(m, k) for m in meta for k in _BOUNDS if getattr(m, k, None) is not None}
    low = next(((k, bounds[k]) for k in ("gt", "ge") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("lt", "le") if k in bounds), None)
    if any(isinstance(m, Rule) for m in meta):
        rule = next(m.text for m in meta if isinstance(m, Rule))
    elif any(getattr(m, "pattern", None) for m in meta):
        rule = "must be a non-empty string"
    elif low and high:
        rule = f"must be in {'(' if low[0] == 'gt' else '['}{low[1]}, {high[1]}{')' if high[0] == 'lt' else ']'}"
    elif low or high:
        rule = f"must be {_BOUNDS[(low or high)[0]]} {(low or high)[1]}"
    else:
        rule = "must be a non-empty list"
    return (rule.replace("must be ", "must be None or ", 1) if optional and (low or high) else rule) + note


def describe(cls: type, err: dict, error: type[ConfigError] = ConfigError, where: str = "") -> str:
    """One pydantic error (``err``) of constructing ``cls`` (read under the dotted key ``where``) as a message."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    path, hint, meta, optional, entry = _at(cls, loc)
    name = ".".join(p for p in (where, path) if p)
    parent = _at(cls, loc[:-1])[1] if len(loc) > 1 else cls
    if kind == "unexpected_keyword_argument":
        return str(unknown_key(name.rpartition(".")[0], loc[-1], init_fields(parent), error))
    if kind in ("missing", "missing_argument"):
        return f"missing required key {loc[-1]!r}; valid keys: {', '.join(init_fields(parent))}"
    if kind in ("value_error", "assertion_error"):
        message = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{where}: {message}" if where else message
    if kind == "dataclass_exact_type":
        return f"{parent.__name__}.{loc[-1]} must be a {hint.__name__}, got {type(value).__name__}"
    if kind == "finite_number":
        return f"{name} must be finite, got {value!r}"
    if kind in _RANGE_ERRORS or (kind == "too_short" and Ellipsis in typing.get_args(hint)):  # not a fixed tuple
        return f"{name} {_range_phrase(meta, optional)}, got {value!r}"
    if kind == "literal_error" and isinstance(value, str):
        return f"{name} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}"
    if entry:  # an entry of a mapping
        return (
            f"{name} expects {type_word(hint, meta, optional)}, got entry {entry[0]!r}: {value!r} "
            f"({type(entry[0]).__name__}: {type(value).__name__})"
        )
    return f"{name} expects {type_word(hint, meta, optional)}, got {value!r} ({type(value).__name__})"


# ----------------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot, unsigned exponent) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping (unvalidated); ConfigError names ``what`` is wrong."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} not found: {str(p)!r}")
    if not p.is_file():
        raise ConfigError(f"{what} path is not a file: {str(p)!r}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {str(p)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{what} {str(p)!r} is empty")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{what} {str(p)!r} must contain a mapping of fields at the top level, got {type(data).__name__}"
        )
    return dict(data)
