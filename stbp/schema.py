"""The training config and the sweep file, published from the dataclasses that validate them.

- JSON Schemas (draft 2020-12) for editors: a YAML file whose first line is
  ``# yaml-language-server: $schema=<path>/sweep.schema.json`` is checked and completed as it is typed (VS Code's
  YAML extension). The committed copies are ``sweeps/train.schema.json`` and ``sweeps/sweep.schema.json``;
  ``python train_ddp.py --schema`` and ``python tune.py --schema`` print them.
- ``python train_ddp.py --help``: every field with its one-line doc and default.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from .config import SECTIONS, field_names, preset_names
from .sweep.spec import TRIAL_OWNED_FIELDS, Sweep

__all__ = ["train_schema", "sweep_schema", "fields_help", "SCHEMA_FILES"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: Where the committed schemas live, relative to the repository root.
SCHEMA_FILES = {"train": "sweeps/train.schema.json", "sweep": "sweeps/sweep.schema.json"}


def _section_schemas(exclude=()) -> dict[str, dict]:
    out = {}
    for name, cls in SECTIONS.items():
        props = TypeAdapter(cls).json_schema()["properties"]
        out[name] = {k: v for k, v in props.items() if k not in exclude}
    return out


def train_schema(exclude=()) -> dict[str, Any]:
    """A training config file: fields nested by section, flat or dotted, and ``preset``. ``exclude``: fields the
    file may not set (a sweep's ``train`` leaves out those each trial sets itself)."""
    props: dict[str, Any] = {
        "preset": {
            "description": "A preset (stbp/presets/): its values first, then this file's.",
            "enum": [*preset_names(), None],
        }
    }
    defs = {}
    for name, leaves in _section_schemas(exclude).items():
        defs.update({f"field.{k}": v for k, v in leaves.items()})
        refs = {k: {"$ref": f"#/$defs/field.{k}"} for k in leaves}
        props[name] = {
            "description": SECTIONS[name].__doc__,
            "type": ["object", "null"],
            "properties": refs,
            "additionalProperties": False,
        }
        props.update(refs)
        props.update({f"{name}.{k}": v for k, v in refs.items()})
    return {
        "$schema": DIALECT,
        "title": "stbp training config",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "$defs": defs,
    }


def sweep_schema() -> dict[str, Any]:
    """A sweep file (``python tune.py --sweep FILE``)."""
    schema = TypeAdapter(Sweep).json_schema()
    defs, props = schema.pop("$defs"), schema["properties"]
    for name in ("Config", *(cls.__name__ for cls in SECTIONS.values())):
        defs.pop(name)
    props.pop("source")
    train = train_schema(exclude=TRIAL_OWNED_FIELDS)
    defs.update(train.pop("$defs"))
    props["train"] = {k: v for k, v in train.items() if k not in ("$schema", "title")} | {
        "description": Sweep.__pydantic_fields__["train"].description
    }
    props["space"]["propertyNames"] = {"enum": [f for f in field_names() if f not in TRIAL_OWNED_FIELDS]}
    props["scheduler"] = {"anyOf": [props["scheduler"], {"enum": ["asha", "none"]}]}
    return {"$schema": DIALECT, "title": "stbp sweep file", **schema, "$defs": defs}


def fields_help() -> str:
    """Every training field as ``--field``, with its one-line doc and default, by section."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"\n{name}: {cls.__doc__}")
        for leaf, info in cls.__pydantic_fields__.items():
            default = info.get_default(call_default_factory=True)
            lines.append(f"  --{leaf:<16} {info.description} (default: {default!r})")
    return "\n".join(lines)
