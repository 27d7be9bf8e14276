"""The JSON Schemas (draft 2020-12) of a training config file and of a sweep file, made from the dataclasses that
validate them, for editors: a YAML file whose first line is ``# yaml-language-server: $schema=<path>`` is checked
and completed as it is typed (VS Code's YAML extension). The committed copies are ``sweeps/train.schema.json`` and
``sweeps/sweep.schema.json``; ``python train_ddp.py --schema`` and ``python tune.py --schema`` print them.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from ..config import SECTIONS, train_schema
from .spec import TRIAL_OWNED_FIELDS, Sweep

#: Where the committed schemas live, relative to the repository root.
SCHEMA_FILES = {"train": "sweeps/train.schema.json", "sweep": "sweeps/sweep.schema.json"}


def sweep_schema() -> dict[str, Any]:
    """A sweep file (``python tune.py --sweep FILE``): its ``train`` is a training config file's schema."""
    schema = TypeAdapter(Sweep).json_schema()
    defs, props = schema.pop("$defs"), schema["properties"]
    for name in ("Config", *(cls.__name__ for cls in SECTIONS.values())):
        defs.pop(name)
    props.pop("source")
    train = train_schema(exclude=TRIAL_OWNED_FIELDS)
    defs.update(train.pop("$defs"))
    del train["$schema"], train["title"]
    props["train"] = {**train, "description": Sweep.__pydantic_fields__["train"].description}
    props["scheduler"] = {"anyOf": [props["scheduler"], {"enum": ["asha", "none"]}]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "stbp sweep file",
        **schema,
        "$defs": defs,
    }
