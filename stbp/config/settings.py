"""Validated run configuration: a tree of frozen dataclasses (:mod:`stbp.config.validation`), one section per concern.

Every field name is unique across the tree, so a mapping (a YAML file, an overrides dict) may give a field flat
(``v_th: 0.3``) or nested by section (``model: {v_th: 0.3}``); on the command line it is ``--v_th 0.3`` or
``--model.v_th 0.3``. :func:`build_config` layers, lowest first, ``defaults < preset < YAML file < overrides <
command line`` and validates the result; an error names the dotted key, the value and the layer it came from.
Imports only the standard library, pydantic and PyYAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter

from ..core.spec import REFERENCE, AaMode, Granularity, NeuronSpec
from ..data.catalog import DATASETS, dataset_defaults
from .validation import Bool, ConfigError, Float, Int, Str, did_you_mean, load_yaml, parse_yaml, section, validate

Positive = Annotated[Float, Field(gt=0)]
NonEmpty = Annotated[Str, Field(pattern=r"\S")]
AtLeast1 = Annotated[Int, Field(ge=1)]


@section
class ModelConfig:
    """Spiking ResNet (STBP + tdBN) architecture and neuron parameters."""

    arch: Literal["resnet19", "resnet18", "resnet34"] = "resnet19"
    """The network: 'resnet19' (the tdBN paper's CIFAR net, 3x3 stem), or 'resnet18' / 'resnet34' (its ImageNet nets:
    7x7 stride-2 stem and max pool, stages [2,2,2,2] / [3,4,6,3])."""
    in_channels: AtLeast1 = 1
    """Input image channels."""
    num_classes: Annotated[Int, Field(ge=2)] = 10
    """Number of output classes."""
    timesteps: AtLeast1 = 2
    """Simulation timesteps T per input."""
    v_th: Positive = REFERENCE.v_th
    """LIF firing threshold."""
    aa: Positive = REFERENCE.aa
    """Surrogate-gradient half-width (rectangular window around v_th)."""
    tau: Annotated[Float, Field(gt=0, le=1)] = REFERENCE.tau
    """Membrane decay factor in (0, 1]."""
    width: Positive = 1.0
    """Channel-width multiplier."""
    readout: Literal["mean", "spikes"] = "mean"
    """Output readout: 'mean' (mean membrane/logit over T) or 'spikes' (spike counts)."""
    sync_bn: Bool = False
    """Synchronise tdBN statistics across DDP ranks."""
    fast_lif: Bool = REFERENCE.fast
    """Use the fused/fast LIF implementation."""
    learn_tau: Bool = REFERENCE.learn_tau
    """Learn each spiking layer's tau (PLIF: tau = sigmoid(w), starting at tau; needs tau < 1)."""
    learn_v_th: Bool = REFERENCE.learn_v_th
    """Learn the thresholds (v_th = exp(q), starting at v_th); tdBN's target alpha*v_th follows them."""
    v_th_granularity: Granularity = REFERENCE.v_th_granularity
    """learn_v_th: one threshold per spiking layer, or one per channel."""
    aa_mode: AaMode = REFERENCE.aa_mode
    """learn_v_th: 'fixed' keeps the surrogate half-width aa; 'relative' scales it with the learned threshold."""

    @property
    def neuron(self) -> NeuronSpec:
        """The neuron fields as the network takes them (:class:`stbp.core.spec.NeuronSpec`; ``fast_lif`` is its
        ``fast``)."""
        return NeuronSpec(
            v_th=self.v_th,
            aa=self.aa,
            tau=self.tau,
            fast=self.fast_lif,
            learn_tau=self.learn_tau,
            learn_v_th=self.learn_v_th,
            v_th_granularity=self.v_th_granularity,
            aa_mode=self.aa_mode,
        )


@section
class DataConfig:
    """Data set, location, split sizes and augmentation."""

    dataset: Literal[tuple(DATASETS)] = "mnist"  # type: ignore[valid-type]
    """The data set (stbp/data/catalog.py); setting it also sets in_channels, num_classes and hflip unless given too."""
    data_dir: NonEmpty | None = None
    """Dataset root; None means $STBP_DATA_DIR if set, else ./data (resolved by the data module)."""
    train_size: Annotated[Int, Field(ge=0)] = 0
    """0 = the whole training split (54,000 images); otherwise its first N images."""
    val_size: Int = 6000
    """Images held out of the official training images for validation (early stopping needs some)."""
    test_size: Annotated[Int, Field(ge=0)] = 0
    """0 = the whole official test set; otherwise at most its first N (image folders: N spread over it)."""
    crop_padding: Annotated[Int, Field(ge=0)] = 4
    """Zero-padding for the random crop; 0 disables random cropping."""
    hflip: Bool = False
    """Random horizontal flips."""
    frame_split: Literal["count", "time"] = "count"
    """Event data: each sample cut into timesteps frames of equal event counts ('count') or time spans ('time')."""
    frame_size: AtLeast1 | None = None
    """Event data: frames downscaled to this many pixels a side (e.g. 64 for the 128x128 sets); None = the sensor's."""
    dvs_test_split: Literal["last100", "first100"] = "last100"
    """CIFAR10-DVS: its test set is each class's last 100 recordings ('last100') or first 100 ('first100')."""
    download: Bool = True
    """Download the dataset if it is missing."""
    image_size: Annotated[Int, Field(ge=8)] | None = None
    """Image folders and ImageNet: crops are this many pixels a side (random resized crops for training, a centre
    crop of the image resized to image_size/0.875 for evaluation); None = the data set's (224)."""
    classes: Annotated[Int, Field(ge=0)] = 0
    """Image folders and ImageNet: train and test on the first N classes only (in sorted order; 0 = all)."""
    workers: Annotated[Int, Field(ge=0)] | None = None
    """Image folders and ImageNet: decoding processes per rank (0 = in the training process; None = one per CPU
    this process may use, at most 8)."""
    file_index: NonEmpty | None = None
    """Image folders and ImageNet: a listing of data_dir written by a sweep (read instead of listing it again)."""


Beta = Annotated[Float, Field(ge=0, lt=1)]


@section
class OptimConfig:
    """Optimizer, loss, learning-rate schedule and gradient clipping."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """One of 'adam', 'adamw', 'sgd'."""
    lr: Positive = 1e-3
    """Peak learning rate."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """Adam/AdamW betas."""
    eps: Positive = 1e-8
    """Adam/AdamW epsilon."""
    momentum: Annotated[Float, Field(ge=0)] = 0.9
    """SGD momentum (sgd only)."""
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    """Weight decay (decoupled for adamw, L2 for adam/sgd)."""
    schedule: Literal["step", "cosine", "none"] = "step"
    """LR schedule: 'step', 'cosine' or 'none'."""
    lr_step_epochs: AtLeast1 = 10
    """Step schedule: multiply the LR by lr_gamma every this many epochs."""
    lr_gamma: Annotated[Float, Field(gt=0, le=1)] = 0.1
    """Step schedule decay factor in (0, 1]."""
    warmup_epochs: Annotated[Float, Field(ge=0)] = 0.0
    """Linear warm-up epochs before the schedule (may be fractional: 0.3 = the first 30% of epoch 1)."""
    grad_clip: Positive | None = None
    """Max global gradient norm; None = no clipping."""
    loss: Literal["ce", "tet"] = "ce"
    """'ce': cross-entropy of the time-mean output; 'tet': TET (Deng et al. 2022), cross-entropy at every step."""
    tet_lambda: Annotated[Float, Field(ge=0, lt=1)] = 1e-3
    """TET: weight of the regulariser that pulls every step's output towards tet_phi (0 = none)."""
    tet_phi: Float = 1.0
    """TET: the regulariser's target value."""
    label_smoothing: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing of the training cross-entropy (0 = off); validation and test losses stay plain."""
    ema_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    """Decay of an EMA of the weights that validation, test and best.pt use (0 = off; e.g. 0.999)."""
    rate_weight: Annotated[Float, Field(ge=0)] = 0.0
    """Firing-rate penalty: rate_weight * sum over spiking layers of (mean rate - rate_target)^2 (0 = off)."""
    rate_target: Annotated[Float, Field(ge=0, le=1)] = 0.1
    """Firing-rate penalty: the target mean rate (spikes per neuron per step)."""


@section
class RunConfig:
    """Training loop, precision, device, output and checkpoint resumption."""

    epochs: AtLeast1 = 11
    """Training epochs."""
    batch_size: AtLeast1 = 64
    """GLOBAL training batch size, split evenly across DDP ranks."""
    eval_batch_size: AtLeast1 = 1000
    """Global evaluation batch size."""
    patience: Annotated[Int, Field(ge=0)] = 5
    """Early stopping: epochs without validation-loss improvement; 0 disables."""
    seed: Int = 0
    """Random seed."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision: 'auto' (bf16 autocast on CUDA and on CPUs with native bf16), 'bf16' or 'off'."""
    compile: Bool = False
    """torch.compile the model (for CUDA: on a CPU it makes training slower; BENCHMARKS.md, 'Current figures')."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    output_dir: NonEmpty = "runs/default"
    """Directory for checkpoints, metrics and artifacts."""
    resume: NonEmpty = "auto"
    """'auto': continue from output_dir/checkpoints/last.pt if present; 'never': start afresh; else a checkpoint."""
    stop_file: NonEmpty | None = None
    """A file whose appearance makes the run save last.pt at the next log interval and stop (exit status 3); the
    same command resumes it there. The SLURM scripts create it on their warning signal."""
    log_interval: AtLeast1 = 50
    """Log training metrics every this many steps."""
    firing_rates: Bool = True
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
    mlflow: Bool = True
    """Log to MLflow when it is installed."""
    run_id: NonEmpty | None = None
    """Attach to this existing MLflow run (used by sweeps)."""
    tags: dict[NonEmpty, Str] = field(default_factory=dict)
    """Extra MLflow run tags."""
    register_model: NonEmpty | None = None
    """At the end, log the best checkpoint as an MLflow PyTorch model and register it under this name (None: off)."""


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
        data, spec = self.data, DATASETS[self.data.dataset]
        if spec.train_size and not 1 <= data.val_size < spec.train_size:
            raise ValueError(f"data.val_size must be in [1, {spec.train_size}) for {spec.name}, got {data.val_size}")
        folder_only = {k: getattr(data, k) for k in ("image_size", "file_index") if getattr(data, k) is not None}
        folder_only.update({k: getattr(data, k) for k in ("classes", "workers") if getattr(data, k)})
        if folder_only and not spec.streamed:
            key, value = next(iter(folder_only.items()))
            raise ValueError(f"data.{key} ({value}) is for image folders and imagenet, not {spec.name}")
        if spec.name == "imagefolder" and data.data_dir is None:
            raise ValueError("data.data_dir is None: imagefolder needs --data_dir DIR holding train/<class>/ and val/")
        if spec.streamed and not 1 <= data.val_size:
            raise ValueError(f"data.val_size must be >= 1 for {spec.name}, got {data.val_size}")
        if self.model.learn_tau and not self.model.tau < 1:
            raise ValueError(f"model.tau must be < 1 with learn_tau (tau = sigmoid(w)), got {self.model.tau}")


SECTIONS = types.MappingProxyType({f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "preset"})
#: Field name -> its section's name; field name -> pydantic's field info (type, doc, default).
SECTION_OF = types.MappingProxyType({name: sec for sec, cls in SECTIONS.items() for name in cls.__pydantic_fields__})
FIELDS = types.MappingProxyType({n: SECTIONS[s].__pydantic_fields__[n] for n, s in SECTION_OF.items()})
assert len(SECTION_OF) == sum(len(c.__pydantic_fields__) for c in SECTIONS.values()), "field names must be unique"
#: Fields that say where a run's records go, not what it trains: MLflow tags rather than parameters, so that
#: comparing runs compares what defines them (a sweep's trials set most of them themselves).
BOOKKEEPING_FIELDS = tuple(
    "output_dir data_dir resume stop_file run_id run_name tracking_uri experiment mlflow register_model tags "
    "workers file_index".split()
)


def flatten(data: Any, where: str = "") -> dict[str, Any]:
    """``{field: value}`` (and ``preset``) of a mapping whose keys are fields, or sections of fields."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config{where} must be a mapping of fields, got {data!r}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and not isinstance(value, Mapping | None):
            raise ConfigError(f"{key}{where}: a section must be a mapping of its fields, got {value!r}")
        for name, v in (value or {}).items() if key in SECTIONS else [(key, value)]:
            if name not in FIELDS and name != "preset":
                shown = f"{key}.{name}" if key in SECTIONS else name
                raise ConfigError(f"unknown key {shown!r}{where}{did_you_mean(name, [*FIELDS, *SECTIONS])}")
            if name in out:
                raise ConfigError(f"{SECTION_OF[name]}.{name}{where} is given twice")
            out[name] = v
    return out


def _build(layers: Sequence[tuple[str, Any]], base: Mapping[str, Any] | None = None) -> Config:
    """A Config of ``base`` (flat, e.g. :func:`flatten_config`) with the ``(where, mapping)`` layers on top."""
    values, origin = dict(base or {}), {}
    for where, layer in layers:
        flat = flatten(layer, f" ({where})" if where else "")
        if flat.get("dataset") in DATASETS:  # what the data set decides, unless given with it
            flat = {**dataset_defaults(flat["dataset"]), **flat}
        values.update(flat)
        origin.update({f"{SECTION_OF.get(k)}.{k}": where for k in flat})
    nested = {sec: {k: v for k, v in values.items() if SECTION_OF.get(k) == sec} for sec in SECTIONS}
    try:
        return validate(Config, {**nested, "preset": values.get("preset")})
    except ConfigError as exc:
        sources = sorted({src for key, src in origin.items() if src and key in str(exc)})
        raise ConfigError(f"{exc} ({', '.join(sources)})" if sources else str(exc)) from None


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A NEW validated Config with ``overrides`` (flat or nested keys) applied. A ``preset`` key only changes
    the recorded preset name; it does not apply the preset's values."""
    return _build([("", overrides)], base=flatten_config(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict (tuples -> lists): safe for YAML, JSON and ``torch.load(weights_only=True)``."""
    return TypeAdapter(Config).dump_python(cfg, mode="json")


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (flat keys too); missing fields take defaults, ``preset`` is recorded."""
    return _build([("", d)])


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Flat ``{field: value}`` for every field (plus ``preset``), e.g. to log as run parameters."""
    out = {name: getattr(getattr(cfg, section), name) for name, section in SECTION_OF.items()}
    return {**out, "tags": dict(out["tags"]), "preset": cfg.preset}


def save_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as nested YAML that ``build_config(yaml_path=path)`` reads back to an equal Config."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _load_presets() -> Mapping[str, Mapping[str, Any]]:
    """Preset name -> its field values (``stbp/config/presets/NAME.yaml``; tune the numbers there), validated."""
    presets = {}
    for path in sorted((Path(__file__).parent / "presets").glob("*.yaml")):
        values = flatten(load_yaml(path), f" (in {str(path)!r})")
        _build([(f"in {str(path)!r}", values)])
        presets[path.stem] = types.MappingProxyType(values)
    return types.MappingProxyType(presets)


PRESETS = _load_presets()


def build_config(
    preset: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    cli: Sequence[str] | Mapping[str, Any] | None = None,
) -> Config:
    """A validated Config: defaults < preset < YAML file < overrides mapping < command line (arguments, or the
    fields :func:`parse_args` read from them). The YAML file may name a preset (``preset: NAME``), used when
    ``preset`` is None."""
    file_values = load_yaml(yaml_path) if yaml_path is not None else {}
    preset = file_values.pop("preset", None) if preset is None else preset
    file_values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS)}: one of {', '.join(PRESETS)}")
    layers = [(f"preset {preset!r}", {**PRESETS[preset], "preset": preset})] if preset else []
    layers += [(f"in {str(yaml_path)!r}", file_values), ("in overrides", overrides or {})]
    cli = cli if isinstance(cli, Mapping) else parse_cli(cli or [])
    return _build([*layers, ("from the command line", cli)])


# The command line: one parser generated from the fields


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print and exit: let the entry script report it
        raise ConfigError(message)


class _Schema(argparse.Action):
    def __call__(self, parser, *args):  # print a JSON Schema and exit, as --help does
        print(json.dumps(self.const(), indent=2))
        parser.exit()


def config_parser(exclude=(), files: bool = True, schema=None, **kwargs: Any) -> argparse.ArgumentParser:
    """An argparse parser with ``--field`` and ``--section.field`` for every field not in ``exclude`` (help from
    the fields' docstrings; bools also as ``--no-field``), ``--config``/``--preset`` where ``files``, and
    ``--schema`` to print ``schema()``."""
    kwargs.setdefault("usage", "%(prog)s [--OPTION VALUE ...]   (--help lists them)")
    parser = _Parser(allow_abbrev=False, argument_default=argparse.SUPPRESS, **kwargs)
    if schema:
        parser.add_argument("--schema", nargs=0, action=_Schema, const=schema, help="print the file's JSON Schema")
    if files:
        parser.add_argument("--config", metavar="FILE", help="a YAML config file (fields flat or by section)")
        parser.add_argument("--preset", metavar="NAME", help=f"start from a preset: {', '.join(PRESETS)}")
    parser.fields = [name for name in FIELDS if name not in exclude]  # what parse_args types and returns
    for sec, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{sec} (--{sec}.FIELD works too)", cls.__doc__)
        for name, info in cls.__pydantic_fields__.items():
            if name not in parser.fields:
                continue
            text = f"{info.description} (default: {info.get_default(call_default_factory=True)})"
            kwargs = dict(dest=name, metavar="VALUE", help=text.replace("%", "%%"))
            if info.annotation is bool:  # --x, --x true|false, --no-x
                group.add_argument(f"--no-{name}", dest=name, action="store_const", const="0", help=argparse.SUPPRESS)
                kwargs.update(nargs="?", const="1", metavar="true|false")
            group.add_argument(f"--{name}", f"--{sec}.{name}", **kwargs)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``argv`` parsed by ``parser`` (:func:`config_parser`): its namespace and the config fields given, as
    ``{field: value}`` typed from their text. Option names may use dashes (``--batch-size``)."""
    if isinstance(argv, str):
        raise ConfigError("expected a list of arguments, not one string")
    args = [_underscored(a) for a in argv]
    namespace, unknown = parser.parse_known_args(args)
    if unknown and not unknown[0].startswith("-"):
        raise ConfigError(f"unexpected argument {unknown[0]!r}: options look like --field value")
    if unknown:
        options = [o.lstrip("-") for o in parser._option_string_actions]
        bad = unknown[0].lstrip("-").partition("=")[0]
        raise ConfigError(f"unknown option {unknown[0]!r}{did_you_mean(bad, options)}")
    return namespace, {k: _typed(k, v) for k, v in vars(namespace).items() if k in parser.fields}


def parse_cli(argv: Sequence[str]) -> dict[str, Any]:
    """The ``--field value`` arguments of ``argv`` as ``{field: value}``, checked when a config is built."""
    return parse_args(config_parser(files=False), argv)[1]


def _underscored(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    negated = name[:3] in ("no-", "no_") and name[3:].replace("-", "_") in FIELDS
    return f"--{'no-' if negated else ''}{name[3 if negated else 0 :].replace('-', '_')}{eq}{value}"


def _typed(name: str, text: str) -> Any:
    """A field's command-line text as the first reading that its type accepts: the text itself, YAML's reading
    ('32', 'true', '1e-3', '[0.9, 0.999]'), a list ('0.9,0.999') or a mapping ('k=v,k2=v2'); else the text, for
    the config's validation to refuse. 'none' or 'null' is None where the field's default is."""
    if FIELDS[name].default is None and text.lower() in ("none", "null"):
        return None
    readings = (
        lambda: text,
        lambda: parse_yaml(text),
        lambda: parse_yaml(f"[{text}]"),
        lambda: dict(pair.split("=", 1) for pair in text.split(",")),
    )
    for read in readings:
        try:
            return TypeAdapter(FIELDS[name].annotation).validate_python(read())
        except (ValueError, yaml.YAMLError):  # pydantic's ValidationError is a ValueError
            continue
    return text


def train_schema(exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON Schema of a training config file: fields flat or nested by section, and ``preset``.
    ``exclude``: fields the file may not set (a sweep's ``train`` leaves out those each trial sets)."""
    props: dict[str, Any] = {
        "preset": {"description": "A preset: its values first, then the file's.", "enum": [*PRESETS, None]}
    }
    defs = {}
    for sec, cls in SECTIONS.items():
        fields = {k: v for k, v in TypeAdapter(cls).json_schema()["properties"].items() if k not in exclude}
        defs.update({f"field.{k}": v for k, v in fields.items()})
        refs = {k: {"$ref": f"#/$defs/field.{k}"} for k in fields}
        props[sec] = dict(description=cls.__doc__, type=["object", "null"], properties=refs, additionalProperties=False)
        props.update(refs)
    head = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "stbp training config"}
    return {**head, "type": "object", "properties": props, "additionalProperties": False, "$defs": defs}
