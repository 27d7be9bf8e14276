"""Validated run configuration: a tree of frozen dataclasses (:mod:`stbp.validation`).

Every leaf field name is unique across the tree, so a field can be addressed flat (``v_th``), dotted
(``model.v_th``) or nested by section. :func:`build_config` layers, lowest first, ``defaults < preset < YAML file <
overrides mapping < CLI list`` and validates each layer as it applies it, so an error names where it came from.
Wherever a config is made, every value is checked for type and range and refused with a :class:`ConfigError` that
names the field, the bad value and what is allowed; :mod:`stbp.schema` publishes the same rules as a JSON Schema.
Imports only the standard library, pydantic and PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from .datasets import DATASETS, dataset_defaults
from .validation import ConfigError, Note, Rule, describe, load_yaml, section, type_word, unwrap

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "TrackingConfig",
    "Config",
    "PRESETS",
    "preset_names",
    "field_names",
    "build_config",
    "apply_overrides",
    "parse_cli",
    "config_to_dict",
    "config_from_dict",
    "flatten_config",
    "flatten_mapping",
    "save_yaml",
    "load_yaml",
    "check_global_batch",
]

Positive = Annotated[float, Field(gt=0)]
NonEmpty = Annotated[str, Field(pattern=r"\S")]


@section
class ModelConfig:
    """Spiking ResNet (STBP + tdBN) architecture and neuron parameters."""

    in_channels: Annotated[int, Field(ge=1)] = 1
    """Input image channels."""
    num_classes: Annotated[int, Field(ge=2)] = 10
    """Number of output classes."""
    timesteps: Annotated[int, Field(ge=1)] = 2
    """Simulation timesteps T per input."""
    v_th: Positive = 0.4
    """LIF firing threshold."""
    aa: Positive = 0.5
    """Surrogate-gradient half-width (rectangular window around v_th)."""
    tau: Annotated[float, Field(gt=0, le=1)] = 0.25
    """Membrane decay factor in (0, 1]."""
    width: Positive = 1.0
    """Channel-width multiplier."""
    readout: Literal["mean", "spikes"] = "mean"
    """Output readout: 'mean' (mean membrane/logit over T) or 'spikes' (spike counts)."""
    sync_bn: bool = False
    """Synchronise tdBN statistics across DDP ranks."""
    fast_lif: bool = True
    """Use the fused/fast LIF implementation."""


@section
class DataConfig:
    """Data set, location, split sizes and augmentation."""

    dataset: Literal[tuple(DATASETS)] = "mnist"  # type: ignore[valid-type]
    """The data set (stbp/datasets.py); setting it also sets in_channels, num_classes and hflip unless given too."""
    data_dir: NonEmpty | None = None
    """Dataset root; None means $STBP_DATA_DIR if set, else ./data (resolved by the data module)."""
    train_size: Annotated[int, Field(ge=0), Note("0 = all")] = 0
    """0 = the whole training split (54,000 images); otherwise its first N images."""
    val_size: int = 6000
    """Images held out of the official training images for validation (early stopping needs some)."""
    test_size: Annotated[int, Field(ge=0, le=10_000), Note("0 = all")] = 0
    """0 = the whole official test set (10,000 images); otherwise its first N (quick runs and tests only)."""
    crop_padding: Annotated[int, Field(ge=0), Note("0 = off")] = 4
    """Zero-padding for the random crop; 0 disables random cropping."""
    hflip: bool = False
    """Random horizontal flips."""
    download: bool = True
    """Download the dataset if it is missing."""


Beta = Annotated[float, Field(ge=0, lt=1)]


@section
class OptimConfig:
    """Optimizer, loss, learning-rate schedule and gradient clipping."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """One of 'adam', 'adamw', 'sgd'."""
    lr: Positive = 1e-3
    """Peak learning rate."""
    betas: Annotated[tuple[Beta, Beta], Field(strict=False)] = (0.9, 0.999)
    """Adam/AdamW betas."""
    eps: Positive = 1e-8
    """Adam/AdamW epsilon."""
    momentum: Annotated[float, Field(ge=0)] = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Weight decay (decoupled for adamw, L2 for adam/sgd)."""
    schedule: Literal["step", "cosine", "none"] = "step"
    """LR schedule: 'step', 'cosine' or 'none'."""
    lr_step_epochs: Annotated[int, Field(ge=1)] = 10
    """Step schedule: multiply the LR by lr_gamma every this many epochs."""
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Step schedule decay factor in (0, 1]."""
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    """Linear warm-up epochs before the schedule (may be fractional: 0.3 = the first 30% of epoch 1)."""
    grad_clip: Annotated[float | None, Field(gt=0), Note("None = off")] = None
    """Max global gradient norm; None = no clipping."""
    loss: Literal["ce", "tet"] = "ce"
    """'ce': cross-entropy of the time-mean output; 'tet': TET (Deng et al. 2022), cross-entropy at every step."""
    tet_lambda: Annotated[float, Field(ge=0, lt=1)] = 1e-3
    """TET: weight of the regulariser that pulls every step's output towards tet_phi (0 = none)."""
    tet_phi: float = 1.0
    """TET: the regulariser's target value."""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing of the training cross-entropy (0 = off); validation and test losses stay plain."""
    ema_decay: Annotated[float, Field(ge=0, lt=1), Note("0 = off")] = 0.0
    """Decay of an EMA of the weights that validation, test and best.pt use (0 = off; e.g. 0.999)."""


@section
class RunConfig:
    """Training loop, precision, device, output and checkpoint resumption."""

    epochs: Annotated[int, Field(ge=1)] = 11
    """Training epochs."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """GLOBAL training batch size, split evenly across DDP ranks."""
    eval_batch_size: Annotated[int, Field(ge=1)] = 1000
    """Global evaluation batch size."""
    patience: Annotated[int, Field(ge=0), Note("0 = off")] = 5
    """Early stopping: epochs without validation-loss improvement; 0 disables."""
    seed: int = 0
    """Random seed."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision: 'auto' (bf16 autocast on CUDA and on CPUs with native bf16), 'bf16' or 'off'."""
    compile: bool = False
    """torch.compile the model (for CUDA: on an AVX2 CPU it made training 5-6x slower; BENCHMARKS.md)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    output_dir: NonEmpty = "runs/default"
    """Directory for checkpoints, metrics and artifacts."""
    resume: Annotated[str, Field(pattern=r"\S"), Rule("must be 'auto', 'never' or a checkpoint path")] = "auto"
    """'auto': continue from output_dir/checkpoints/last.pt if present; 'never': start afresh; else a checkpoint."""
    log_interval: Annotated[int, Field(ge=1)] = 50
    """Log training metrics every this many steps."""
    firing_rates: bool = True
    """Record per-layer firing rates."""


@section
class TrackingConfig:
    """MLflow experiment tracking."""

    tracking_uri: NonEmpty | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db."""
    experiment: NonEmpty = "stbp"
    """MLflow experiment name."""
    run_name: NonEmpty | None = None
    """MLflow run name; None = generated."""
    mlflow: bool = True
    """Log to MLflow when it is installed."""
    run_id: NonEmpty | None = None
    """Attach to this existing MLflow run (used by sweeps)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow run tags."""
    register_model: NonEmpty | None = None
    """At the end, log the best checkpoint as an MLflow PyTorch model and register it under this name (None: off)."""

    def __post_init__(self) -> None:
        if any(not key.strip() for key in self.tags):
            raise ValueError(f"tags keys must be non-empty strings, got {list(self.tags)!r}")


@section
class Config:
    """The whole configuration. Immutable: :func:`apply_overrides` derives a new one."""

    preset: NonEmpty | None = None
    """Name of the preset this config was built from (recorded only)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        split = DATASETS[self.data.dataset].train_size
        if not 1 <= self.data.val_size < split:
            raise ValueError(
                f"val_size must be in [1, {split}) (early stopping needs a validation set; "
                f"{self.data.dataset} has {split:,} training images), got {self.data.val_size}"
            )


SECTIONS = types.MappingProxyType({f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "preset"})
#: Leaf field name -> its section name; leaf field name -> pydantic's field info (type, doc, default).
SECTION_OF = types.MappingProxyType({name: sec for sec, cls in SECTIONS.items() for name in cls.__pydantic_fields__})
FIELDS = types.MappingProxyType({n: SECTIONS[s].__pydantic_fields__[n] for n, s in SECTION_OF.items()})
assert len(SECTION_OF) == sum(len(c.__pydantic_fields__) for c in SECTIONS.values()), "leaf names must be unique"


def field_names() -> list[str]:
    """All flat leaf field names, sorted (``preset`` is not one)."""
    return sorted(SECTION_OF)


def check_global_batch(batch_size: int, parts: int, what: str = "the number of ranks") -> None:
    """A global batch is split evenly: refuse one that ``parts`` (ranks, Ray Train workers) do not divide."""
    if parts < 1 or batch_size % parts:
        raise ConfigError(f"batch_size ({batch_size}, global) must be divisible by {what} ({parts})")


# Keys: flat, dotted or nested by section


def _unknown_field(key: str, where: str = "") -> ConfigError:
    names = field_names()
    leaf = key.rsplit(".", 1)[-1].replace("-", "_")
    candidates = names + list(SECTIONS)
    squashed = {c.replace("_", ""): c for c in candidates}  # 'batchsize' finds 'batch_size'
    close = difflib.get_close_matches(leaf, candidates, n=1) or [
        squashed[c] for c in difflib.get_close_matches(leaf.replace("_", ""), list(squashed), n=1)
    ]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config field {key!r}{hint}{where}; valid fields: {', '.join(names)}")


def _leaf(key: Any, where: str = "", section: str | None = None) -> str:
    """The flat leaf name of a flat or dotted key (or of a key inside ``section``)."""
    if not isinstance(key, str):
        raise ConfigError(f"config keys must be strings, got {key!r} ({type(key).__name__}){where}")
    shown = f"{section}.{key}" if section else key
    if section is None and "." in key:
        section, _, key = key.partition(".")
        if section not in SECTIONS:
            raise _unknown_field(shown, where)
    if key not in SECTION_OF:
        raise _unknown_field(shown, where)
    if section is not None and SECTION_OF[key] != section:
        raise ConfigError(f"config field {key!r} belongs to section {SECTION_OF[key]!r}, not {section!r}{where}")
    return key


def flatten_mapping(data: Mapping[str, Any], where: str = "", allow_preset: bool = False) -> dict[str, Any]:
    """``{leaf: value}`` (and ``preset`` where allowed) of a mapping whose keys are flat, dotted or nested by
    section; the values are not checked yet."""
    pairs: list[tuple[str, Any, str]] = []
    for key, value in data.items():
        if key == "preset":
            if not allow_preset:
                raise ConfigError(f"'preset' cannot be set here{where}; pass preset=... to build_config")
            pairs.append(("preset", value, key))
        elif key in SECTIONS:
            if value is None:
                continue  # an empty section in YAML (`model:`)
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"section {key!r} must be a mapping of fields, got {value!r} ({type(value).__name__}){where}"
                )
            pairs += [(_leaf(sub, where, key), v, f"{key}.{sub}") for sub, v in value.items()]
        else:
            pairs.append((_leaf(key, where), value, key))
    out: dict[str, Any] = {}
    for name, value, shown in pairs:
        if name in out:
            raise ConfigError(f"config field {name!r} is given more than once (again as {shown!r}){where}")
        out[name] = value
    return out


def _with_values(cfg: Config, flat: Mapping[str, Any], where: str = "") -> Config:
    """A new Config with the given flat leaf values (and ``preset``) replaced, validated."""
    changes: dict[str, Any] = {}
    if flat.get("dataset") in DATASETS:  # what the data set decides, unless given with it
        flat = {**dataset_defaults(flat["dataset"]), **flat}
    try:
        for name in SECTIONS:
            values = {k: v for k, v in flat.items() if SECTION_OF.get(k) == name}
            if values:
                changes[name] = dataclasses.replace(getattr(cfg, name), **values)
        if "preset" in flat:
            changes["preset"] = flat["preset"]
        return dataclasses.replace(cfg, **changes) if changes else cfg
    except ConfigError as exc:
        raise ConfigError(f"{exc}{where}") from None


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A NEW validated Config with ``overrides`` (flat, dotted or nested keys) applied. A ``preset`` key only
    changes the recorded preset name; it does not apply the preset's values."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"apply_overrides expects a Config, got {type(cfg).__name__}")
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping, got {type(overrides).__name__}")
    return _with_values(cfg, flatten_mapping(overrides, allow_preset=True))


_NONE_WORDS = ("none", "null", "~")
_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off", "y", "n", "t", "f")  # what pydantic reads


@functools.cache
def _lax(name: str) -> TypeAdapter:
    """The field's type read leniently from command-line text ('32' is an int there), its range unchecked."""
    return TypeAdapter(unwrap(FIELDS[name].annotation)[0], config={"allow_inf_nan": False})


def _from_text(name: str, text: str) -> Any:
    """A command-line string as a value of the field's type; ConfigError if it is not one."""
    hint, _, optional = unwrap(FIELDS[name].annotation)
    kind, value = typing.get_origin(hint), text.strip()
    if optional and value.lower() in _NONE_WORDS:
        return None
    if kind is tuple:
        value = [p.strip() for p in value.strip("()[]").split(",")]
        if len(value) != 2:
            raise ConfigError(f"{name} expects 2 comma-separated floats (e.g. '0.9,0.999'), got {text!r}")
    elif kind is dict:
        items = [item.partition("=") for item in text.split(",")] if value not in ("", "{}") else []
        if any(not sep or not key.strip() for key, sep, _ in items):
            raise ConfigError(f"{name} expects comma-separated key=value pairs (e.g. 'a=1,b=2'), got {text!r}")
        value = {key.strip(): val.strip() for key, _, val in items}
    elif hint is str:
        value = text
    try:
        return _lax(name).validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        if kind is tuple and err["type"] != "finite_number":
            raise ConfigError(f"{name} expects {type_word(hint)} (e.g. '0.9,0.999'), got {text!r}") from None
        loc = (name, *(p for p in err["loc"] if isinstance(p, int)))
        raise ConfigError(describe(SECTIONS[SECTION_OF[name]], {**err, "loc": loc, "input": text})) from None


def parse_cli(argv: Sequence[str]) -> dict[str, Any]:
    """``--field value`` arguments as a typed flat dict ``{leaf_name: value}``: ``--batch-size 32``,
    ``--batch_size=32``, ``--run.batch_size 32``; ``--hflip``, ``--hflip false`` or ``--no-hflip``; ``none`` for
    optional fields; ``--betas 0.9,0.999``; ``--tags k=v,k2=v2``. Later occurrences win. Types are checked here,
    ranges when the config is built; ``--config`` and ``--preset`` are the entry script's."""
    if isinstance(argv, str):
        raise ConfigError("parse_cli expects a list of arguments, not a single string")
    args, out, i = list(argv), {}, 0
    while i < len(args):
        token = args[i]
        i += 1
        if not isinstance(token, str) or not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected positional argument {token!r}; options look like --field value")
        body, has_eq, inline = token[2:].partition("=")
        key = body.replace("-", "_")
        if key in ("config", "preset"):
            raise ConfigError(f"--{body} must be handled by the entry script before parse_cli")
        if key not in SECTION_OF and key.startswith("no_") and key[3:] in SECTION_OF:
            if FIELDS[key[3:]].annotation is not bool:
                raise ConfigError(f"--{body} only applies to bool fields; {key[3:]} is not a bool")
            if has_eq:
                raise ConfigError(f"--{body} takes no value, got {token!r}")
            out[key[3:]] = False
            continue
        try:
            name = _leaf(key)
        except ConfigError:
            raise _unknown_field(body, " (from the command line)") from None
        if has_eq:
            text = inline
        elif FIELDS[name].annotation is bool:  # a bare flag, or one with a true/false word after it
            nxt = args[i] if i < len(args) else None
            text = nxt if isinstance(nxt, str) and nxt.strip().lower() in _BOOL_WORDS else "true"
            i += text is nxt
        elif i >= len(args) or (isinstance(args[i], str) and args[i].startswith("--")):
            raise ConfigError(f"--{body} expects a value ({type_word(FIELDS[name].annotation)})")
        else:
            text, i = args[i], i + 1
        out[name] = _from_text(name, text)
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict (tuples -> lists): safe for YAML, JSON and ``torch.load(weights_only=True)``."""
    return TypeAdapter(Config).dump_python(cfg, mode="json")


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (also accepts flat or dotted keys); missing fields take defaults. A
    ``preset`` key is recorded only: the preset's values are not applied."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config_from_dict expects a mapping, got {type(d).__name__}")
    return _with_values(Config(), flatten_mapping(d, allow_preset=True))


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Flat ``{leaf_name: value}`` for every field (plus ``preset``), e.g. to log as run parameters."""
    out = {name: getattr(getattr(cfg, section), name) for name, section in SECTION_OF.items()}
    return {**out, "tags": dict(out["tags"]), "preset": cfg.preset}


def save_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as nested YAML that ``build_config(yaml_path=path)`` reads back to an equal Config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), encoding="utf-8")


# Presets: training config files shipped in stbp/presets/ (tune the numbers there)
def _load_presets() -> Mapping[str, Mapping[str, Any]]:
    presets = {}
    for path in sorted((Path(__file__).parent / "presets").glob("*.yaml")):
        where = f" (in {str(path)!r})"
        values = flatten_mapping(load_yaml(path), where)
        flat = flatten_config(_with_values(Config(), values, where))  # validated, in the fields' own types
        presets[path.stem] = types.MappingProxyType({k: flat[k] for k in values})
    return types.MappingProxyType(presets)


PRESETS = _load_presets()  #: preset name -> its flat field values (read-only)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def build_config(
    preset: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    cli: Sequence[str] | None = None,
) -> Config:
    """A validated Config: defaults < preset < YAML file < overrides mapping < CLI list. The YAML file (keys
    nested by section, flat or dotted) may name a preset, ``preset: NAME``, used when ``preset`` is None."""
    yaml_values: dict[str, Any] = {}
    where = f" (in {str(yaml_path)!r})"
    if yaml_path is not None:
        yaml_values = flatten_mapping(load_yaml(yaml_path), where=where, allow_preset=True)
        yaml_preset = yaml_values.pop("preset", None)
        if yaml_preset is not None and not isinstance(yaml_preset, str):
            raise ConfigError(f"preset must be a string, got {yaml_preset!r}{where}")
        preset = yaml_preset if preset is None else preset
    cfg = Config()
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(preset_names())}")
        cfg = _with_values(cfg, {**PRESETS[preset], "preset": preset})
    cfg = _with_values(cfg, yaml_values, where)
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a mapping, got {type(overrides).__name__}")
        cfg = _with_values(cfg, flatten_mapping(overrides, where=" (in overrides)"), " (in overrides)")
    return _with_values(cfg, parse_cli(cli or []))
