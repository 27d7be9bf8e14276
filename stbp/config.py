"""Validated run configuration: a tree of frozen dataclasses.

Every leaf field name is unique across the tree, so a field can be addressed flat (``v_th``) or dotted
(``model.v_th``). A :class:`Config` is built with :func:`build_config`, which layers, lowest first::

    defaults < preset < YAML file < overrides mapping < CLI list

Every constructor path (direct construction, :func:`build_config`, :func:`apply_overrides`,
:func:`config_from_dict`) type-checks and range-checks all values and raises :class:`ConfigError`
with a message naming the field, the bad value and what is allowed.

This module imports only the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    "save_yaml",
    "load_yaml",
]


class ConfigError(ValueError):
    """An invalid, ill-typed or unknown configuration value."""


# Choices of the string-valued fields (tuples: immutable).
READOUT_CHOICES = ("mean", "spikes")
OPTIMIZER_CHOICES = ("adam", "adamw", "sgd")
SCHEDULE_CHOICES = ("step", "cosine", "none")
AMP_CHOICES = ("auto", "bf16", "off")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
RESUME_KEYWORDS = ("auto", "never")

#: Size of the full MNIST-style training split that ``val_size`` is carved out of.
FULL_TRAIN_SPLIT = 60000


# ----------------------------------------------------------------------------------------------------------
# Type checking / coercion (shared by the dataclasses, YAML, override mappings and the CLI)
# ----------------------------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an int", float: "a float", bool: "a bool", str: "a string"}


def _type_word(hint: Any) -> str:
    """Human description of a field type, e.g. 'an int', 'a float or None'."""
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_type_word(inner)} or None"
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "a pair of floats"
    if origin is dict:
        return "a mapping of strings to strings"
    return str(hint)


def _optional_inner(hint: Any) -> Any:
    """``X`` for ``X | None``, else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _type_error(name: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"{name} expects {_type_word(hint)}, got {value!r} ({type(value).__name__})")


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the field type; return it normalised (int -> float, list -> tuple).

    Strict: bool is never an int/float, strings are never numbers (CLI strings go through ``_parse_str``).
    """
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _coerce_or_optional_error(name, hint, inner, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(name, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise _type_error(name, hint, value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value!r}")
            return value
        raise _type_error(name, hint, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(name, hint, value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(name, hint, value)
        return tuple(_coerce(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(name, hint, value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ConfigError(
                    f"{name} expects {_type_word(hint)}, got entry {k!r}: {v!r} "
                    f"({type(k).__name__}: {type(v).__name__})"
                )
            out[k] = v
        return out
    raise TypeError(f"unsupported config field type {hint!r} for {name}")  # pragma: no cover


def _coerce_or_optional_error(name: str, hint: Any, inner: Any, value: Any) -> Any:
    try:
        return _coerce(name, inner, value)
    except ConfigError as exc:
        if str(exc).startswith(f"{name} expects "):
            raise _type_error(name, hint, value) from None
        raise


_TRUE_WORDS = ("true", "1", "yes", "on", "y", "t")
_FALSE_WORDS = ("false", "0", "no", "off", "n", "f")
_NONE_WORDS = ("none", "null", "~")


def _parse_bool_word(text: str) -> bool | None:
    low = text.strip().lower()
    if low in _TRUE_WORDS:
        return True
    if low in _FALSE_WORDS:
        return False
    return None


def _parse_str(name: str, hint: Any, text: str) -> Any:
    """Parse a command-line string into a value of the field's type (then ``_coerce`` checks it)."""
    inner = _optional_inner(hint)
    if inner is not None:
        if text.strip().lower() in _NONE_WORDS:
            return None
        try:
            return _parse_str(name, inner, text)
        except ConfigError as exc:
            if str(exc).startswith(f"{name} expects "):
                raise ConfigError(f"{name} expects {_type_word(hint)}, got {text!r}") from None
            raise
    if hint is bool:
        parsed = _parse_bool_word(text)
        if parsed is None:
            raise ConfigError(f"{name} expects a bool (true/false/1/0/yes/no), got {text!r}")
        return parsed
    if hint is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{name} expects an int, got {text!r}") from None
    if hint is float:
        try:
            number = float(text.strip())
        except ValueError:
            raise ConfigError(f"{name} expects a float, got {text!r}") from None
        return _coerce(name, float, number)
    if hint is str:
        return text
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        stripped = text.strip().strip("()[]")
        parts = [p.strip() for p in stripped.split(",")] if stripped else []
        if len(parts) != len(args):
            raise ConfigError(
                f"{name} expects {len(args)} comma-separated floats (e.g. '0.9,0.999'), got {text!r}"
            )
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{name} expects {_type_word(hint)} (e.g. '0.9,0.999'), got {text!r}") from None
        return tuple(
            _coerce(f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, numbers, strict=True))
        )
    if origin is dict:
        out: dict[str, str] = {}
        stripped = text.strip()
        if stripped in ("", "{}"):
            return out
        for item in stripped.split(","):
            key, sep, val = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(
                    f"{name} expects comma-separated key=value pairs (e.g. 'a=1,b=2'), got {text!r}"
                )
            out[key] = val.strip()
        return out
    raise TypeError(f"unsupported config field type {hint!r} for {name}")  # pragma: no cover


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _check_nonempty(name: str, value: str | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(bool(value and value.strip()), f"{name} must be a non-empty string, got {value!r}")


class _Section:
    """Mixin: type-check and normalise every field, then run the section's range checks."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(_Section):
    """Spiking ResNet (STBP + tdBN) architecture and neuron parameters."""

    in_channels: int = 1
    """Input image channels."""
    num_classes: int = 10
    """Number of output classes."""
    timesteps: int = 2
    """Simulation timesteps T per input."""
    v_th: float = 0.4
    """LIF firing threshold."""
    aa: float = 0.5
    """Surrogate-gradient half-width (rectangular window around v_th)."""
    tau: float = 0.25
    """Membrane decay factor in (0, 1]."""
    width: float = 1.0
    """Channel-width multiplier."""
    readout: str = "mean"
    """Output readout: 'mean' (mean membrane/logit over T) or 'spikes' (spike counts)."""
    sync_bn: bool = False
    """Synchronise tdBN statistics across DDP ranks."""
    fast_lif: bool = True
    """Use the fused/fast LIF implementation."""

    def _validate(self) -> None:
        _check(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        _check(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        _check(self.timesteps >= 1, f"timesteps must be >= 1, got {self.timesteps}")
        _check(self.v_th > 0, f"v_th must be > 0, got {self.v_th}")
        _check(self.aa > 0, f"aa must be > 0, got {self.aa}")
        _check(0 < self.tau <= 1, f"tau must be in (0, 1], got {self.tau}")
        _check(self.width > 0, f"width must be > 0, got {self.width}")
        _check_choice("readout", self.readout, READOUT_CHOICES)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Dataset location, split sizes and augmentation."""

    data_dir: str | None = None
    """Dataset root; None means $STBP_DATA_DIR if set, else ./data (resolved by the data module)."""
    train_size: int = 0
    """0 = the whole training split (54,000 images); otherwise its first N images."""
    val_size: int = 6000
    """Images held out of the 60,000 official training images for validation."""
    test_size: int = 0
    """0 = the whole official test set (10,000 images); otherwise its first N (quick runs and tests only)."""
    crop_padding: int = 4
    """Zero-padding for the random crop; 0 disables random cropping."""
    hflip: bool = False
    """Random horizontal flips."""
    download: bool = True
    """Download the dataset if it is missing."""

    def _validate(self) -> None:
        _check_nonempty("data_dir", self.data_dir, optional=True)
        _check(self.train_size >= 0, f"train_size must be >= 0 (0 = all), got {self.train_size}")
        _check(
            1 <= self.val_size < FULL_TRAIN_SPLIT,
            f"val_size must be in [1, {FULL_TRAIN_SPLIT}) (early stopping needs a validation set), "
            f"got {self.val_size}",
        )
        _check(0 <= self.test_size <= 10_000, f"test_size must be in [0, 10000] (0 = all), got {self.test_size}")
        _check(self.crop_padding >= 0, f"crop_padding must be >= 0 (0 = off), got {self.crop_padding}")


@dataclass(frozen=True)
class OptimConfig(_Section):
    """Optimizer, learning-rate schedule and gradient clipping."""

    optimizer: str = "adam"
    """One of 'adam', 'adamw', 'sgd'."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""
    eps: float = 1e-8
    """Adam/AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw, L2 for adam/sgd)."""
    schedule: str = "step"
    """LR schedule: 'step', 'cosine' or 'none'."""
    lr_step_epochs: int = 10
    """Step schedule: multiply the LR by lr_gamma every this many epochs."""
    lr_gamma: float = 0.1
    """Step schedule decay factor in (0, 1]."""
    warmup_epochs: int = 0
    """Linear warm-up epochs before the schedule."""
    grad_clip: float | None = None
    """Max global gradient norm; None = no clipping."""

    def _validate(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZER_CHOICES)
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        for i, beta in enumerate(self.betas):
            _check(0 <= beta < 1, f"betas[{i}] must be in [0, 1), got {beta} (betas={self.betas})")
        _check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        _check(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check_choice("schedule", self.schedule, SCHEDULE_CHOICES)
        _check(self.lr_step_epochs >= 1, f"lr_step_epochs must be >= 1, got {self.lr_step_epochs}")
        _check(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be None (off) or > 0, got {self.grad_clip}",
        )


@dataclass(frozen=True)
class RunConfig(_Section):
    """Training loop, precision, device, output and checkpoint resumption."""

    epochs: int = 11
    """Training epochs."""
    batch_size: int = 64
    """GLOBAL training batch size, split evenly across DDP ranks."""
    eval_batch_size: int = 1000
    """Global evaluation batch size."""
    patience: int = 5
    """Early stopping: epochs without validation-loss improvement; 0 disables."""
    seed: int = 0
    """Random seed."""
    amp: str = "auto"
    """Mixed precision: 'auto' (bf16 autocast on CUDA and on CPUs with native bf16), 'bf16' or 'off'."""
    compile: bool = False
    """torch.compile the model (for CUDA: on an AVX2 CPU it made training 5-6x slower; BENCHMARKS.md)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    output_dir: str = "runs/default"
    """Directory for checkpoints, metrics and artifacts."""
    resume: str = "auto"
    """'auto' = continue from output_dir/checkpoints/last.pt if present; 'never' = start fresh and
    overwrite; anything else = path to a checkpoint file to resume from."""
    log_interval: int = 50
    """Log training metrics every this many steps."""
    firing_rates: bool = True
    """Record per-layer firing rates."""

    def _validate(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.patience >= 0, f"patience must be >= 0 (0 = off), got {self.patience}")
        _check_choice("amp", self.amp, AMP_CHOICES)
        _check_choice("device", self.device, DEVICE_CHOICES)
        _check_nonempty("output_dir", self.output_dir)
        _check(
            bool(self.resume.strip()),
            f"resume must be 'auto', 'never' or a checkpoint path, got {self.resume!r}",
        )
        _check(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")

    @property
    def resume_path(self) -> str | None:
        """The checkpoint path when ``resume`` is neither 'auto' nor 'never', else None."""
        return None if self.resume in RESUME_KEYWORDS else self.resume


@dataclass(frozen=True)
class TrackingConfig(_Section):
    """MLflow experiment tracking."""

    tracking_uri: str | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db."""
    experiment: str = "stbp"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; None = generated."""
    mlflow: bool = True
    """Log to MLflow when it is installed."""
    run_id: str | None = None
    """Attach to this existing MLflow run (used by sweeps)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow run tags."""

    def _validate(self) -> None:
        _check_nonempty("tracking_uri", self.tracking_uri, optional=True)
        _check_nonempty("experiment", self.experiment)
        _check_nonempty("run_name", self.run_name, optional=True)
        _check_nonempty("run_id", self.run_id, optional=True)
        for key in self.tags:
            _check(bool(key.strip()), f"tags keys must be non-empty strings, got {key!r}")


@dataclass(frozen=True)
class Config:
    """The whole configuration. Treat as immutable: use :func:`apply_overrides` to derive a new one."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preset: str | None = None
    """Name of the preset this config was built from (recorded only)."""

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"Config.{name} must be a {cls.__name__}, got {type(value).__name__}")
        _coerce("preset", str | None, self.preset)
        _check_nonempty("preset", self.preset, optional=True)


_SECTIONS: Mapping[str, type] = types.MappingProxyType(
    {
        "model": ModelConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "run": RunConfig,
        "tracking": TrackingConfig,
    }
)


def _build_field_index() -> tuple[Mapping[str, str], Mapping[str, Any]]:
    section_of: dict[str, str] = {}
    hint_of: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in section_of or f.name in _SECTIONS or f.name == "preset":
                raise RuntimeError(f"config field name {f.name!r} is not unique")  # pragma: no cover
            section_of[f.name] = section
            hint_of[f.name] = hints[f.name]
    return types.MappingProxyType(section_of), types.MappingProxyType(hint_of)


#: Leaf field name -> section name, and leaf field name -> type hint (read-only).
_SECTION_OF, _HINT_OF = _build_field_index()


def field_names() -> list[str]:
    """All flat leaf field names, sorted (``preset`` is not a leaf field)."""
    return sorted(_SECTION_OF)


# ----------------------------------------------------------------------------------------------------------
# Presets (flat overrides). Tune the numbers here.
# ----------------------------------------------------------------------------------------------------------

PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {
        # The reference implementation's exact hyperparameters. Readout stays at the default "mean".
        "seed": types.MappingProxyType(
            {
                "timesteps": 2,
                "v_th": 0.4,
                "aa": 0.5,
                "tau": 0.25,
                "width": 1.0,
                "optimizer": "adam",
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "batch_size": 64,
                "schedule": "step",
                "lr_step_epochs": 10,
                "lr_gamma": 0.1,
                "warmup_epochs": 0,
                "epochs": 11,
                "patience": 5,
                "crop_padding": 0,  # the reference applied no augmentation
                "hflip": False,
                "output_dir": "runs/seed",
            }
        ),
        # A narrow network that trains in minutes on a laptop CPU.
        "cpu": types.MappingProxyType(
            {
                "width": 0.125,
                "epochs": 3,
                "batch_size": 128,
                "eval_batch_size": 128,  # on a CPU, small batches evaluate 2x faster than 2000 (cache)
                "lr": 3e-3,
                "schedule": "cosine",
                "output_dir": "runs/cpu",
            }
        ),
        # Full-width network on one or more GPUs.
        "gpu": types.MappingProxyType(
            {
                "width": 1.0,
                "epochs": 11,
                "batch_size": 128,
                "lr": 1e-3,
                "schedule": "cosine",
                "warmup_epochs": 1,
                "output_dir": "runs/gpu",
            }
        ),
        # Seconds-long runs for tests.
        "tiny": types.MappingProxyType(
            {
                "width": 0.0625,
                "timesteps": 2,
                "epochs": 1,
                "batch_size": 32,
                "train_size": 512,
                "val_size": 256,
                "test_size": 512,
                "eval_batch_size": 256,
                "log_interval": 5,
                "output_dir": "runs/tiny",
            }
        ),
    }
)


def preset_names() -> list[str]:
    """Names of the available presets, sorted."""
    return sorted(PRESETS)


def _preset_overrides(name: str) -> dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())}")
    return dict(PRESETS[name])


# ----------------------------------------------------------------------------------------------------------
# Key normalisation (flat / dotted / nested) with helpful errors
# ----------------------------------------------------------------------------------------------------------


def _unknown_field(key: str, where: str = "") -> ConfigError:
    names = field_names()
    leaf = key.rsplit(".", 1)[-1].replace("-", "_")
    candidates = names + list(_SECTIONS)
    close = difflib.get_close_matches(leaf, candidates, n=1) or difflib.get_close_matches(
        leaf.replace("_", ""), [c.replace("_", "") for c in candidates], n=1
    )
    if close and close[0] not in candidates:  # matched on the underscore-free form: map back
        close = [c for c in candidates if c.replace("_", "") == close[0]][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config field {key!r}{hint}{where}; valid fields: {', '.join(names)}")


def _resolve_key(key: Any, where: str = "") -> str:
    """Map a flat or dotted key to its flat leaf name; ConfigError for anything unknown."""
    if not isinstance(key, str):
        raise ConfigError(f"config keys must be strings, got {key!r} ({type(key).__name__}){where}")
    if key in _SECTION_OF:
        return key
    if "." in key:
        section, _, leaf = key.partition(".")
        if section in _SECTIONS and leaf in _SECTION_OF:
            if _SECTION_OF[leaf] != section:
                raise ConfigError(
                    f"config field {leaf!r} belongs to section {_SECTION_OF[leaf]!r}, not {section!r}{where}"
                )
            return leaf
    raise _unknown_field(key, where)


def _flatten_mapping(data: Mapping[str, Any], where: str = "", allow_preset: bool = False) -> dict[str, Any]:
    """Flatten a mapping whose keys are flat, dotted or nested by section; values are not checked yet.

    ``preset`` (when allowed) is returned under the key "preset".
    """
    out: dict[str, Any] = {}

    def put(name: str, value: Any, shown: str) -> None:
        if name in out:
            raise ConfigError(f"config field {name!r} is given more than once (again as {shown!r}){where}")
        out[name] = value

    for key, value in data.items():
        if key == "preset":
            if not allow_preset:
                raise ConfigError(f"'preset' cannot be set here{where}; pass preset=... to build_config")
            put("preset", value, key)
        elif isinstance(key, str) and key in _SECTIONS:
            if value is None:
                continue  # an empty section in YAML (`model:`)
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"section {key!r} must be a mapping of fields, "
                    f"got {value!r} ({type(value).__name__}){where}"
                )
            for sub, subvalue in value.items():
                if not isinstance(sub, str) or sub not in _SECTION_OF:
                    raise _unknown_field(f"{key}.{sub}", where)
                if _SECTION_OF[sub] != key:
                    raise ConfigError(
                        f"config field {sub!r} belongs to section {_SECTION_OF[sub]!r}, not {key!r}{where}"
                    )
                put(sub, subvalue, f"{key}.{sub}")
        else:
            put(_resolve_key(key, where), value, key)
    return out


def _typed(flat: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Type-check every value of a flat mapping (prefixing errors with their source)."""
    out = {}
    for name, value in flat.items():
        hint = str | None if name == "preset" else _HINT_OF[name]
        try:
            out[name] = _coerce(name, hint, value)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
    return out


def _with_values(cfg: Config, flat: Mapping[str, Any]) -> Config:
    """New Config with the given (flat) leaf values replaced; every changed section is re-validated."""
    changes: dict[str, Any] = {}
    if "preset" in flat:
        changes["preset"] = flat["preset"]
    for section in _SECTIONS:
        fields = {k: v for k, v in flat.items() if _SECTION_OF.get(k) == section}
        if fields:
            changes[section] = dataclasses.replace(getattr(cfg, section), **fields)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Return a NEW validated Config with ``overrides`` (flat, dotted or nested keys) applied.

    A ``preset`` key only changes the recorded preset name; it does not apply the preset's values.
    """
    if not isinstance(cfg, Config):
        raise ConfigError(f"apply_overrides expects a Config, got {type(cfg).__name__}")
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping, got {type(overrides).__name__}")
    return _with_values(cfg, _typed(_flatten_mapping(overrides, allow_preset=True)))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def parse_cli(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``--field value`` style arguments into a typed flat dict ``{leaf_name: value}``.

    Accepts ``--batch-size 32``, ``--batch_size=32``, ``--run.batch_size 32``; bools as ``--hflip``,
    ``--hflip false`` (true/false/1/0/yes/no/on/off) or ``--no-hflip``; ``none``/``null`` for optional
    fields; ``--betas 0.9,0.999``; ``--tags k=v,k2=v2``. Later occurrences win. ``--config`` and
    ``--preset`` belong to the entry script and are rejected here, as are positional arguments.
    """
    if isinstance(argv, str):
        raise ConfigError("parse_cli expects a list of arguments, not a single string")
    args = list(argv)
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not isinstance(token, str):
            raise ConfigError(f"command-line arguments must be strings, got {token!r}")
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected positional argument {token!r}; options look like --field value")
        body, has_eq, inline = token[2:].partition("=")
        key = body.replace("-", "_")
        if key in ("config", "preset"):
            raise ConfigError(f"--{body} must be handled by the entry script before parse_cli")
        if key not in _SECTION_OF and key.startswith("no_") and "." not in key:
            target = key[3:]
            if target in _SECTION_OF:
                if _HINT_OF[target] is not bool:
                    raise ConfigError(f"--{body} only applies to bool fields; {target} is not a bool")
                if has_eq:
                    raise ConfigError(f"--{body} takes no value, got {token!r}")
                out[target] = False
                continue
        try:
            name = _resolve_key(key, " (from the command line)")
        except ConfigError:
            raise _unknown_field(body, " (from the command line)") from None
        hint = _HINT_OF[name]
        if has_eq:
            text = inline
        elif hint is bool:
            nxt = args[i] if i < len(args) else None
            if isinstance(nxt, str) and not nxt.startswith("--") and _parse_bool_word(nxt) is not None:
                text = nxt
                i += 1
            else:
                text = "true"
        else:
            if i >= len(args) or (isinstance(args[i], str) and args[i].startswith("--")):
                raise ConfigError(f"--{body} expects a value ({_type_word(hint)})")
            text = args[i]
            i += 1
        out[name] = _coerce(name, hint, _parse_str(name, hint, text))
    return out


# ----------------------------------------------------------------------------------------------------------
# YAML / dict conversion
# ----------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot, unsigned exponent) as a float, per YAML 1.2."""


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


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a (raw, unvalidated) top-level mapping; ConfigError if unusable."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {str(p)!r}")
    if not p.is_file():
        raise ConfigError(f"config path is not a file: {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {str(p)!r} must contain a mapping of fields at the top level, "
            f"got {type(data).__name__}"
        )
    return dict(data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict (tuples -> lists): safe for YAML, JSON and ``torch.load(weights_only=True)``."""
    out: dict[str, Any] = {"preset": cfg.preset}
    for section in _SECTIONS:
        sec = getattr(cfg, section)
        values = {}
        for f in dataclasses.fields(sec):
            v = getattr(sec, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = dict(v)
            values[f.name] = v
        out[section] = values
    return out


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (also accepts flat or dotted keys); missing fields take defaults.

    A ``preset`` key is recorded only: the preset's values are not applied.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"config_from_dict expects a mapping, got {type(d).__name__}")
    return _with_values(Config(), _typed(_flatten_mapping(d, allow_preset=True)))


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Flat ``{leaf_name: value}`` for every field (plus ``preset``), e.g. to log as run parameters."""
    out: dict[str, Any] = {}
    for section in _SECTIONS:
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            v = getattr(sec, f.name)
            out[f.name] = dict(v) if isinstance(v, dict) else v
    out["preset"] = cfg.preset
    return out


def save_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as nested YAML that ``build_config(yaml_path=path)`` reads back to an equal Config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), encoding="utf-8"
    )


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------


def build_config(
    preset: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    cli: Sequence[str] | None = None,
) -> Config:
    """Build a validated Config: defaults < preset < YAML file < overrides mapping < CLI list.

    The YAML file may name a preset with a top-level ``preset: NAME``; it is used when ``preset`` is None.
    Its keys may be nested by section, flat or dotted.
    """
    layered: dict[str, Any] = {}
    yaml_values: dict[str, Any] = {}
    if yaml_path is not None:
        where = f" (in {str(yaml_path)!r})"
        yaml_values = _flatten_mapping(load_yaml(yaml_path), where=where, allow_preset=True)
        yaml_preset = yaml_values.pop("preset", None)
        if yaml_preset is not None and not isinstance(yaml_preset, str):
            raise ConfigError(f"preset must be a string, got {yaml_preset!r}{where}")
        if preset is None:
            preset = yaml_preset
        yaml_values = _typed(yaml_values, where)
    if preset is not None:
        layered.update(_preset_overrides(preset))
    layered.update(yaml_values)
    if overrides is not None:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a mapping, got {type(overrides).__name__}")
        layered.update(_typed(_flatten_mapping(overrides, where=" (in overrides)")))
    if cli is not None:
        layered.update(parse_cli(cli))
    return _with_values(Config(preset=preset), _typed(layered))
