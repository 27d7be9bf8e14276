"""One validation mechanism for the training config and the sweep file: frozen pydantic dataclasses.

Pydantic checks every value against its field's type and constraints; scalars are strict (a bool is never a
number, ``"32"`` is never an int, an int is a float, nothing is NaN or infinite); a field's docstring is its
documentation, for ``--help`` and the JSON Schemas alike. :func:`errors_message` turns pydantic's errors into
lines that name the dotted key and the bad value, with a did-you-mean for a misspelt key or choice::

    model.v_th: input should be greater than 0, got -0.1
    unknown key search.num_sample (did you mean 'num_samples'?)

Imports only the standard library, pydantic and PyYAML.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..errors import ConfigError

Int, Float, Bool, Str = (Annotated[t, Strict()] for t in (int, float, bool, str))
_KEYS: set[str] = set()  # every section's keys, for a did-you-mean
_PYDANTIC = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


def section(cls: type | None = None, *, error: type[ConfigError] = ConfigError):
    """Decorator: ``cls`` as a frozen pydantic dataclass (constructing it raises pydantic's ValidationError, a
    ValueError); :func:`validate` reads one from a mapping and raises ``error`` with a readable message."""

    def wrap(cls: type) -> type:
        cls = pydantic_dataclass(frozen=True, config=_PYDANTIC)(cls)
        cls.__error__ = error
        _KEYS.update(cls.__pydantic_fields__)
        return cls

    return wrap if cls is None else wrap(cls)


def validate(cls: type, values: Any, where: str = "") -> Any:
    """``values`` (a mapping, nested sections as mappings) as a ``cls`` instance; errors name ``where.key``."""
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as exc:
        raise cls.__error__(errors_message(exc, where)) from None


def did_you_mean(key: Any, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def errors_message(exc: ValidationError, where: str = "") -> str:
    """One line per error (an unknown key first: it is why another one is missing)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "unexpected_keyword_argument")
    return "\n".join(dict.fromkeys(_describe(e, where) for e in errors))


def _describe(err: dict, where: str) -> str:
    loc = [p for p in err["loc"] if p != "[key]"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in [where, *loc] if p != "").lstrip(".")
    kind, value = err["type"], err.get("input")
    if kind == "unexpected_keyword_argument":
        return f"unknown key {path}{did_you_mean(loc[-1], _KEYS)}"
    if kind == "value_error":
        message = str(err["ctx"]["error"])
        return f"{path}: {message}" if path else message
    if kind in ("missing", "missing_argument"):
        return f"{path}: a required key is missing"
    hint = ""
    if kind == "literal_error":
        hint = did_you_mean(value, re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{path}: {msg}, got {value!r}{hint}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot, unsigned exponent) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def load_yaml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (unvalidated); ConfigError says what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {'is not a file' if p.exists() else 'not found'}: {str(p)!r}")
    try:
        data = parse_yaml(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{what} {str(p)!r} must be a non-empty mapping of keys to values, got {data!r}")
    return dict(data)
