"""Hyperparameter sweeps: Ray Tune drives Optuna over the training config; MLflow records every trial.

    sweep = load_sweep("sweeps/vth_aa.yaml", train_cli=["--epochs", "2"])  # validated; nothing started
    run_sweep(sweep)                                                        # Ray, trials, MLflow, report

A sweep file has the top-level keys of :data:`TOP_LEVEL_KEYS` (``sweeps/vth_aa.yaml`` documents each one).
Every trial calls the one training function, :func:`stbp.train.train`, with the sweep's base config plus the
trial's sampled values; with ``resources.workers > 1`` it runs under DDP in a Ray Train ``TorchTrainer``.
MLflow bookkeeping (parent and child runs, the final report) lives in :mod:`stbp.sweep_mlflow`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import (
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    config_from_dict,
    config_to_dict,
    field_names,
    load_yaml,
    parse_cli,
)
from .ports import free_port
from .sweep_mlflow import (
    STATE_FILE,
    SweepCallback,
    SweepRecord,
    TrialRow,
    child_run,
    collect_rows,
    fail_child,
    format_table,
    mark_parent,
    open_sweep_record,
    plot_landscape,
    ui_hint,
    write_csv,
    write_report,
)
from .tracking import check_tracking_uri, resolve_tracking_uri

__all__ = [
    "SweepError",
    "Param",
    "Search",
    "Scheduler",
    "Resources",
    "Sweep",
    "load_sweep",
    "sweep_to_dict",
    "run_sweep",
    "METRICS",
]


class SweepError(ConfigError):
    """An invalid sweep file or sweep option; raised before anything starts."""


SPACE_TYPES = ("uniform", "loguniform", "int", "choice")
SEARCHERS = ("optuna",)
SAMPLERS = ("tpe", "random")
SCHEDULERS = ("asha", "none")
#: The metrics the trainer reports every epoch that a sweep can optimise.
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
MODES = ("max", "min")
#: Training fields every trial sets for itself: a sweep may neither set nor search them.
TRIAL_OWNED_FIELDS = ("output_dir", "resume", "run_id", "tracking_uri", "experiment", "mlflow", "run_name")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The resolved sweep, saved in its Ray experiment directory: a resume must match it.
SWEEP_FILE = "sweep.yaml"
MIN_TRIALS_FOR_IMPORTANCE = 4


# ----------------------------------------------------------------------------------------------------------
# Checking helpers: every message names the key (dotted path) and what is allowed
# ----------------------------------------------------------------------------------------------------------


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(where: str, key: Any, valid: typing.Sequence[str]) -> SweepError:
    place = f"{where}." if where else ""
    return SweepError(f"unknown sweep key {place}{key}{_closest(key, valid)}; valid keys: {', '.join(valid)}")


def _check_keys(where: str, data: Mapping, valid: typing.Sequence[str]) -> None:
    for key in data:
        if key not in valid:
            raise _unknown_key(where, key, valid)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SweepError(message)


def _choice(key: str, value: Any, choices: typing.Sequence[str]) -> None:
    _require(value in choices, f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


_WORDS = {int: "an int", float: "a number", str: "a string", bool: "true or false"}


def _typed(key: str, hint: Any, value: Any) -> Any:
    """``value`` checked against a simple field type (int/float/str/bool, optionally ``| None``)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None and optional:
        return None
    ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if base is float and ok and not math.isfinite(value):
        raise SweepError(f"{key} must be finite, got {value!r}")
    if not ok:
        word = _WORDS.get(base, str(base)) + (" or null" if optional else "")
        raise SweepError(f"{key} expects {word}, got {value!r} ({type(value).__name__})")
    return value


def _read_section(cls: type, where: str, raw: Any) -> Any:
    """Build the section dataclass ``cls`` from the YAML mapping ``raw`` (None: all defaults)."""
    if raw is None:
        return cls()
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    _require(
        isinstance(raw, Mapping),
        f"{where} must be a mapping with keys {', '.join(names)}, got {raw!r} ({type(raw).__name__})",
    )
    _check_keys(where, raw, names)
    hints = typing.get_type_hints(cls)
    values = {k: _typed(f"{where}.{k}", hints[k], v) for k, v in raw.items() if k != "points_to_evaluate"}
    if "points_to_evaluate" in raw:
        values["points_to_evaluate"] = raw["points_to_evaluate"]  # checked against the space later
    return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# The sweep file, section by section
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched training field: ``uniform``/``loguniform``/``int`` over [low, high], or ``choice``."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice{list(self.values)}"
        return f"{self.type}[{self.low}, {self.high}]"


@dataclass(frozen=True)
class Search:
    """How trials are proposed: Optuna's sampler, its seed, the points to try first, how many and how wide."""

    searcher: str = "optuna"
    sampler: str = "tpe"
    seed: int | None = 0
    points_to_evaluate: tuple = ()
    num_samples: int = 8
    max_concurrent: int = 1

    def __post_init__(self) -> None:
        _choice("search.searcher", self.searcher, SEARCHERS)
        _choice("search.sampler", self.sampler, SAMPLERS)
        _require(self.num_samples >= 1, f"search.num_samples must be >= 1, got {self.num_samples}")
        _require(self.max_concurrent >= 1, f"search.max_concurrent must be >= 1, got {self.max_concurrent}")


@dataclass(frozen=True)
class Scheduler:
    """Early stopping of poor trials: ASHA on the metric at each epoch, or none."""

    type: str = "asha"
    max_t: int | None = None
    """ASHA's budget, at most the trial's epochs (null: those epochs); its rungs lie below it."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it: the first rung."""
    reduction_factor: float = 3.0
    """Rungs at grace_period x reduction_factor^k epochs; at each, trials below the top 1/factor stop."""

    def __post_init__(self) -> None:
        _choice("scheduler.type", self.type, SCHEDULERS)
        _require(self.max_t is None or self.max_t >= 1, f"scheduler.max_t must be >= 1, got {self.max_t}")
        _require(self.grace_period >= 1, f"scheduler.grace_period must be >= 1, got {self.grace_period}")
        _require(
            self.reduction_factor > 1,
            f"scheduler.reduction_factor must be > 1, got {self.reduction_factor}",
        )


@dataclass(frozen=True)
class Resources:
    """Per trial: ``workers`` training processes (DDP when > 1), each with ``cpus`` CPUs and ``gpus`` GPUs."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1

    def __post_init__(self) -> None:
        _require(self.cpus > 0, f"resources.cpus must be > 0, got {self.cpus}")
        _require(self.gpus >= 0, f"resources.gpus must be >= 0, got {self.gpus}")
        _require(self.workers >= 1, f"resources.workers must be >= 1, got {self.workers}")
        _require(
            self.workers == 1 or self.gpus in (0, 1),
            f"resources.gpus must be 0 or 1 when workers > 1 (one GPU per DDP rank), got {self.gpus}",
        )


@dataclass(frozen=True)
class Failures:
    """``max_failures``: how often a crashed trial is retried from its last checkpoint (0 = never)."""

    max_failures: int = 0

    def __post_init__(self) -> None:
        _require(self.max_failures >= 0, f"failures.max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class Mlflow:
    """Where the sweep is recorded: tracking URI (null: ``sqlite:///<cwd>/mlflow.db``) and experiment."""

    tracking_uri: str | None = None
    experiment: str | None = None

    def __post_init__(self) -> None:
        for key in ("tracking_uri", "experiment"):
            value = getattr(self, key)
            _require(value is None or bool(value.strip()), f"mlflow.{key} must be a non-empty string or null")


@dataclass(frozen=True)
class Checkpoints:
    """``num_to_keep``: Ray checkpoints (last.pt + best.pt) kept per trial, the newest ones."""

    num_to_keep: int = 2

    def __post_init__(self) -> None:
        _require(self.num_to_keep >= 1, f"checkpoints.num_to_keep must be >= 1, got {self.num_to_keep}")


TOP_LEVEL_KEYS = (
    "name",
    "train",
    "space",
    "search",
    "scheduler",
    "metric",
    "mode",
    "resources",
    "failures",
    "mlflow",
    "checkpoints",
)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the base training config, the search space and how the trials run."""

    name: str
    train: Config
    space: tuple[Param, ...]
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    metric: str = "val_acc"
    mode: str = "max"
    resources: Resources = field(default_factory=Resources)
    failures: Failures = field(default_factory=Failures)
    mlflow: Mlflow = field(default_factory=Mlflow)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    source: str = ""
    """Path of the sweep file it was read from (logged as an artifact)."""

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"sweep-{self.name}"

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.train.run.epochs

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.space]


def _read_space(raw: Any, base: Config) -> tuple[Param, ...]:
    _require(
        isinstance(raw, Mapping) and len(raw) > 0,
        "space must be a non-empty mapping of training fields to {type, low, high | values}, "
        f"e.g. 'v_th: {{type: uniform, low: 0.2, high: 0.8}}'; got {raw!r}",
    )
    fields = [f for f in field_names() if f not in TRIAL_OWNED_FIELDS]
    params = []
    for name, spec in raw.items():
        if name in TRIAL_OWNED_FIELDS:
            raise SweepError(f"space.{name} cannot be searched: each trial sets it for itself")
        if name not in fields:
            raise SweepError(
                f"space.{name} is not a training config field{_closest(name, fields)}; "
                f"valid fields: {', '.join(fields)}"
            )
        params.append(_read_param(f"space.{name}", name, spec, base))
    return tuple(params)


def _read_param(where: str, name: str, spec: Any, base: Config) -> Param:
    _require(
        isinstance(spec, Mapping),
        f"{where} must be a mapping like {{type: uniform, low: 0.2, high: 0.8}}, got {spec!r}",
    )
    _check_keys(where, spec, ("type", "low", "high", "values"))
    kind = spec.get("type")
    _choice(f"{where}.type", kind, SPACE_TYPES)
    if kind == "choice":
        _require(set(spec) <= {"type", "values"}, f"{where}: a choice takes 'values', not low/high")
        values = spec.get("values")
        _require(
            isinstance(values, list) and len(values) > 0,
            f"{where}.values must be a non-empty list, got {values!r}",
        )
        for i, v in enumerate(values):
            _require(
                v is None or isinstance(v, (bool, int, float, str)),
                f"{where}.values[{i}] must be a number, string or bool, got {v!r}",
            )
            _valid_for_config(f"{where}.values[{i}]", name, v, base)
        return Param(name, kind, values=tuple(values))
    _require("values" not in spec, f"{where}: type {kind} takes low and high, not values")
    number = int if kind == "int" else float
    low = _typed(f"{where}.low", number, spec.get("low"))
    high = _typed(f"{where}.high", number, spec.get("high"))
    _require(low < high, f"{where}: low must be < high, got low={low}, high={high}")
    _require(kind != "loguniform" or low > 0, f"{where}: loguniform needs low > 0, got low={low}")
    _valid_for_config(f"{where}.low", name, low, base)
    _valid_for_config(f"{where}.high", name, high, base)
    return Param(name, kind, low, high)


def _valid_for_config(where: str, name: str, value: Any, base: Config) -> None:
    """The training config must accept ``value`` for ``name`` (its own type and range checks)."""
    try:
        apply_overrides(base, {name: value})
    except ConfigError as exc:
        raise SweepError(f"{where}: {exc}") from None


def _read_points(points: Any, space: tuple[Param, ...]) -> tuple[dict, ...]:
    where = "search.points_to_evaluate"
    _require(
        isinstance(points, (list, tuple)),
        f"{where} must be a list of {{param: value}} mappings, got {points!r}",
    )
    names = [p.name for p in space]
    out = []
    for i, point in enumerate(points or ()):
        at = f"{where}[{i}]"
        _require(isinstance(point, Mapping), f"{at} must be a mapping of {', '.join(names)}, got {point!r}")
        _check_keys(at, point, names)
        missing = [n for n in names if n not in point]
        _require(
            not missing, f"{at} is missing {', '.join(missing)} (every searched parameter needs a value)"
        )
        values = {}
        for p in space:
            value = point[p.name]
            if p.type in ("uniform", "loguniform") and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            _require(p.contains(value), f"{at}.{p.name} = {value!r} is outside space.{p.name} {p.describe()}")
            values[p.name] = value
        out.append(values)
    return tuple(out)


def _read_train(raw: Any, train_cli: typing.Sequence[str]) -> Config:
    _require(
        isinstance(raw, Mapping),
        f"train must be a mapping of a preset and training fields ({{preset: tiny, epochs: 2}}), got {raw!r}",
    )
    values = dict(raw)
    preset = values.pop("preset", None)
    try:
        given = set(_leaf_keys(values)) | set(parse_cli(train_cli))
        cfg = build_config(preset=preset, overrides=values, cli=list(train_cli))
    except ConfigError as exc:
        raise SweepError(f"train: {exc}") from None
    owned = sorted(given & set(TRIAL_OWNED_FIELDS))
    _require(not owned, f"train: {', '.join(owned)} is set by each trial itself; remove it")
    return apply_overrides(cfg, {"mlflow": True})


def _leaf_keys(values: Mapping) -> typing.Iterator[str]:
    """Flat field names of a training mapping whose keys are flat, dotted or nested by section."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from map(str, value)
        else:
            yield str(key).rsplit(".", 1)[-1]


def _read_scheduler(raw: Any, epochs: int) -> Scheduler:
    if isinstance(raw, str):  # `scheduler: none` or `scheduler: asha`
        raw = {"type": raw}
    sched = _read_section(Scheduler, "scheduler", raw)
    if sched.type == "none":
        return sched
    max_t = sched.max_t or epochs
    _require(
        max_t <= epochs,
        f"scheduler.max_t ({max_t}) exceeds the trial's epochs ({epochs}); lower it or leave it out "
        "(it defaults to epochs)",
    )
    _require(
        sched.grace_period < max_t,
        f"scheduler.grace_period ({sched.grace_period}) must be < max_t ({max_t}): ASHA stops trials only "
        "at rungs before a trial's last epoch (or set `scheduler: none`)",
    )
    return sched


def _default_mode(metric: str) -> str:
    return "min" if metric.endswith("_loss") else "max"


def load_sweep(
    path: str | os.PathLike,
    train_cli: typing.Sequence[str] = (),
    num_samples: int | None = None,
    tracking_uri: str | None = None,
) -> Sweep:
    """Read and validate a sweep file; :class:`SweepError` (a ConfigError) names the bad key.

    ``train_cli`` (``--field value`` ...) overrides the base training config of every trial; ``num_samples``
    and ``tracking_uri`` override the file's ``search.num_samples`` and ``mlflow.tracking_uri``.
    """
    try:
        raw = load_yaml(path)
    except ConfigError as exc:
        raise SweepError(str(exc).replace("config file", "sweep file")) from None
    try:
        return _build_sweep(raw, train_cli, num_samples, tracking_uri, str(path))
    except SweepError as exc:
        raise SweepError(f"{path}: {exc}") from None


def _build_sweep(raw: dict, train_cli, num_samples, tracking_uri, source: str) -> Sweep:
    _check_keys("", raw, TOP_LEVEL_KEYS)
    for key in ("name", "train", "space"):
        _require(key in raw, f"missing required key {key!r}; a sweep file has {', '.join(TOP_LEVEL_KEYS)}")
    name = _typed("name", str, raw["name"])
    _require(bool(_NAME_RE.match(name)), f"name must be letters, digits, '_', '.' or '-', got {name!r}")
    train = _read_train(raw["train"], train_cli)
    space = _read_space(raw["space"], train)
    search = _read_section(Search, "search", raw.get("search"))
    points = _read_points(search.points_to_evaluate, space)
    if num_samples is not None:
        search = dataclasses.replace(search, num_samples=num_samples)  # re-validated in __post_init__
    search = dataclasses.replace(search, points_to_evaluate=points)
    _require(
        search.num_samples >= len(points),
        f"search.num_samples ({search.num_samples}) is smaller than the {len(points)} points_to_evaluate",
    )
    metric = _typed("metric", str, raw.get("metric", "val_acc"))
    _choice("metric", metric, METRICS)
    mode = _typed("mode", str, raw.get("mode", _default_mode(metric)))
    _choice("mode", mode, MODES)
    mlflow_section = _read_section(Mlflow, "mlflow", raw.get("mlflow"))
    if tracking_uri is not None:
        mlflow_section = dataclasses.replace(mlflow_section, tracking_uri=tracking_uri)
    resources = _read_section(Resources, "resources", raw.get("resources"))
    _require(
        train.run.batch_size % resources.workers == 0,
        f"train.batch_size ({train.run.batch_size}, global) must be divisible by resources.workers "
        f"({resources.workers})",
    )
    return Sweep(
        name=name,
        train=train,
        space=space,
        search=search,
        scheduler=_read_scheduler(raw.get("scheduler"), train.run.epochs),
        metric=metric,
        mode=mode,
        resources=resources,
        failures=_read_section(Failures, "failures", raw.get("failures")),
        mlflow=mlflow_section,
        checkpoints=_read_section(Checkpoints, "checkpoints", raw.get("checkpoints")),
        source=source,
    )


def sweep_to_dict(sweep: Sweep) -> dict[str, Any]:
    """The resolved sweep as plain data (what ran, command-line overrides included), e.g. for YAML."""
    out: dict[str, Any] = {"name": sweep.name, "train": config_to_dict(sweep.train)}
    out["space"] = {
        p.name: {"type": p.type, "values": list(p.values)}
        if p.type == "choice"
        else {"type": p.type, "low": p.low, "high": p.high}
        for p in sweep.space
    }
    for key in ("search", "scheduler", "resources", "failures", "mlflow", "checkpoints"):
        out[key] = dataclasses.asdict(getattr(sweep, key))
    out["search"]["points_to_evaluate"] = [dict(p) for p in sweep.search.points_to_evaluate]
    out["metric"], out["mode"] = sweep.metric, sweep.mode
    return out


def sweep_yaml(sweep: Sweep) -> str:
    return yaml.safe_dump(sweep_to_dict(sweep), sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------------------------------------
# Trials (run in Ray worker processes)
# ----------------------------------------------------------------------------------------------------------

#: Reported to Tune in this order: its live table shows the first four.
_TUNE_METRICS = (
    "val_acc",
    "val_loss",
    "train_acc",
    "train_loss",
    "epoch",
    "lr",
    "epoch_time_s",
    "images_per_s",
)
_CHECKPOINT_FILES = ("last.pt", "best.pt")


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs, pickled to the trial processes."""

    base: dict  # the base training config, as config_to_dict
    sweep_dir: str
    record: SweepRecord
    resources: Resources
    keep_checkpoints: int
    data_dir: str
    metric: str  # what Tune's scheduler and searcher read from every trial's results


def _trial_config(plan: TrialPlan, params: dict, trial_dir: Path, run_id: str, run_name: str) -> Config:
    """The base config with the trial's values; its outputs in the trial's directory, its run in MLflow."""
    values = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}  # numpy scalars
    values.update(
        output_dir=str(trial_dir / "train"),
        resume="auto",  # a retried or restored trial continues from its checkpoint
        run_id=run_id,
        run_name=run_name,
        tracking_uri=plan.record.tracking_uri,
        mlflow=True,
        data_dir=plan.data_dir,  # absolute: trials run in their own working directories
    )
    return apply_overrides(config_from_dict(plan.base), values)


def stbp_trial(params: dict, plan: TrialPlan) -> None:
    """One trial: open its child run, then train (here, or under DDP when ``workers > 1``)."""
    from ray import tune

    ctx = tune.get_context()
    # Trial outputs live in the trial's directory of the sweep (not Ray's per-session staging directory),
    # so that a resumed sweep finds them.
    trial_dir = Path(plan.sweep_dir) / Path(ctx.get_trial_dir()).name
    run_id = child_run(plan.record, ctx.get_trial_id(), ctx.get_trial_name(), params)
    cfg = _trial_config(plan, params, trial_dir, run_id, ctx.get_trial_name())
    from .train import TrainingDiverged, train

    try:
        if plan.resources.workers == 1:
            _restore_checkpoint(tune.get_checkpoint(), cfg)
            train(cfg, callback=_report_to_tune)
        else:
            _fit_ddp(plan, cfg, trial_dir)
    except TrainingDiverged as exc:
        # Deterministic: a retry from the last checkpoint (failures.max_failures) would diverge again. The
        # trial ends here, its run FAILED with the reason, and the sweep goes on.
        fail_child(plan.record, run_id, f"TrainingDiverged: {exc}")
        print(f"[sweep] trial {ctx.get_trial_name()} diverged, not retried: {exc}", flush=True)
        # Tune needs the metric in a trial's last result (even one that diverged before its first report); NaN
        # makes Optuna record the trial as failed rather than as a value to learn from.
        tune.report({plan.metric: float("nan"), "epoch": exc.epoch})


def _tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
    # Firing rates go to MLflow (train() logs them); Tune gets what its table and the scheduler need.
    return {k: metrics[k] for k in _TUNE_METRICS if k in metrics}


def _copy_checkpoints(source: Path, target: Path) -> None:
    """Copy last.pt/best.pt (those present), each atomically: DDP ranks on one node may copy at once."""
    target.mkdir(parents=True, exist_ok=True)
    for name in _CHECKPOINT_FILES:
        if (source / name).exists():
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
            os.close(fd)
            shutil.copy2(source / name, tmp)
            os.replace(tmp, target / name)


@contextlib.contextmanager
def _checkpoint_copy(checkpoint_dir: str | None, checkpoint_cls: type):
    """A Ray checkpoint of a fresh copy of the trial's checkpoints (Ray moves or deletes what it persists)."""
    if checkpoint_dir is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="stbp-ckpt-") as tmp:
        _copy_checkpoints(Path(checkpoint_dir), Path(tmp))
        yield checkpoint_cls.from_directory(tmp)


def _report_to_tune(epoch: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    from ray import tune

    with _checkpoint_copy(checkpoint_dir, tune.Checkpoint) as checkpoint:
        tune.report(_tune_metrics(metrics), checkpoint=checkpoint)


def _report_to_train(epoch: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    import ray.train

    # Every rank reports (Ray Train waits for all of them); only rank 0 has a checkpoint.
    with _checkpoint_copy(checkpoint_dir, ray.train.Checkpoint) as checkpoint:
        ray.train.report(_tune_metrics(metrics), checkpoint=checkpoint)


def _restore_checkpoint(checkpoint, cfg: Config) -> None:
    """Put the checkpoint Ray restored into output_dir/checkpoints, where ``resume='auto'`` continues from."""
    if checkpoint is None:
        return
    target = Path(cfg.run.output_dir) / "checkpoints"
    # A last.prev.pt newer than the restored last.pt would be a wrong fallback.
    (target / "last.prev.pt").unlink(missing_ok=True)
    with checkpoint.as_directory() as source:
        _copy_checkpoints(Path(source), target)


def _ddp_worker(loop_config: dict) -> None:
    """One DDP rank under Ray Train: train() joins the process group Ray Train set up."""
    import ray.train

    from .train import train

    cfg = config_from_dict(loop_config["config"])
    _restore_checkpoint(ray.train.get_checkpoint(), cfg)
    train(cfg, callback=_report_to_train)


def _fit_ddp(plan: TrialPlan, cfg: Config, trial_dir: Path) -> None:
    """Drive a Ray Train run of ``workers`` ranks; its reports reach Tune through TuneReportCallback."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = plan.resources
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"config": config_to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if res.gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus > 0, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name="ddp",  # stable: a retried trial's Ray Train run resumes from its own last checkpoint
            storage_path=str(trial_dir),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=plan.keep_checkpoints),
            # Retries are Tune's (failures.max_failures): it reruns this function, which resumes.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as exc:
        diverged = _diverged_rank(exc)
        if diverged is not None:
            raise diverged from None  # every rank diverged together: the trial handles it as one
        raise


def _diverged_rank(exc) -> Exception | None:
    """The TrainingDiverged raised by a rank of a failed Ray Train run, if that is why it failed."""
    from .train import TrainingDiverged

    for failure in exc.worker_failures.values():
        base = getattr(failure, "_base_exc", failure)  # Ray wraps a worker's exception with its traceback
        if isinstance(base, TrainingDiverged):
            return base
    return None


def _trial_resources(res: Resources) -> dict[str, float]:
    if res.workers == 1:
        return {"cpu": res.cpus, "gpu": res.gpus}
    # The trial itself only drives Ray Train, whose workers hold the CPUs/GPUs; Ray needs some resource in
    # a request, and a CPU here would starve the workers on a machine the trial exactly fills.
    return {"cpu": 0, "memory": 1 << 20}


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------


def optuna_space(space: typing.Sequence[Param]) -> dict[str, Any]:
    """The search space as Optuna distributions (inclusive bounds)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in space:
        if p.type == "choice":
            out[p.name] = CategoricalDistribution(list(p.values))
        elif p.type == "int":
            out[p.name] = IntDistribution(p.low, p.high)
        else:
            out[p.name] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    return out


def _searcher(sweep: Sweep):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Tune reports the trials already
    s = sweep.search
    sampler_cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[s.sampler]
    searcher = OptunaSearch(
        space=optuna_space(sweep.space),
        metric=sweep.metric,
        mode=sweep.mode,
        points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None,
        sampler=sampler_cls(seed=s.seed),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # not Tune's iteration count, which a retried DDP trial restarts
        # ASHA puts rungs up to and including its max_t; ours lie below max_t, so that no rung sits on a
        # trial's last epoch, where stopping it would save nothing but its test evaluation.
        max_t=sweep.max_t - 1,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
        # A trial past the last rung runs to its end (test accuracy, FINISHED) rather than being stopped.
        stop_last_trials=False,
    )


def _tuner(sweep: Sweep, plan: TrialPlan, sweep_dir: Path, resume: bool):
    from ray import tune

    # Tune warns whenever checkpoints force frequent state snapshots: here that is by design (exact resume).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(
        tune.with_parameters(stbp_trial, plan=plan), _trial_resources(sweep.resources)
    )
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        # Finished trials stay finished; the searcher's state and the callbacks come back from the directory.
        # (Tune keeps no scheduler state: ASHA's rungs start empty again, so it stops less right after.)
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            search_alg=_searcher(sweep),
            scheduler=_scheduler(sweep),
            num_samples=sweep.search.num_samples,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(sweep_dir.parent),
            callbacks=[SweepCallback(plan.record)],
            failure_config=tune.FailureConfig(max_failures=sweep.failures.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.checkpoints.num_to_keep),
            verbose=1,
        ),
    )


def _check_sweep_dir(sweep: Sweep, sweep_dir: Path, resume: bool, tracking_uri: str) -> None:
    saved = sweep_dir / SWEEP_FILE
    if not resume:
        # Started = it has its MLflow parent (or Tune state): a sweep that stopped before is not one.
        started = (sweep_dir / STATE_FILE).exists() or any(sweep_dir.glob("experiment_state-*.json"))
        _require(
            not started,
            f"a sweep named {sweep.name!r} already exists in {sweep_dir}: pass --resume to continue it, or "
            "start afresh with another --storage (or after deleting that directory)",
        )
        return
    _require(saved.is_file(), f"nothing to resume: no sweep {sweep.name!r} in {sweep_dir} (see --storage)")
    before, now = yaml.safe_load(saved.read_text()), sweep_to_dict(sweep)
    changed = [k for k in now if before.get(k) != now[k]]
    _require(
        not changed,
        f"the sweep differs from the one in {sweep_dir} in {', '.join(changed)}: resume it with the same "
        "sweep file and options",
    )
    state = sweep_dir / STATE_FILE
    recorded = json.loads(state.read_text())["tracking_uri"] if state.is_file() else tracking_uri
    _require(
        recorded == tracking_uri,
        f"this sweep is recorded in {recorded}, not {tracking_uri}: resume it from the directory it started "
        f"in, or pass --tracking_uri {recorded}",
    )


def _check_local_resources(res: Resources) -> None:
    """A local cluster is this machine: refuse a trial that could never be placed on it."""
    cpus = os.cpu_count() or 1
    _require(
        res.workers * res.cpus <= cpus,
        f"a trial needs resources.workers x resources.cpus = {res.workers * res.cpus:g} CPUs but this "
        f"machine has {cpus}; lower them, or join a bigger cluster with --address",
    )
    if res.gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        _require(
            gpus > 0,
            f"resources.gpus is {res.gpus:g} but this machine has no GPU: set resources.gpus: 0 to train on "
            "CPUs, or join a cluster with GPUs with --address",
        )
        _require(
            res.workers * res.gpus <= gpus,
            f"a trial needs resources.workers x resources.gpus = {res.workers * res.gpus:g} GPUs but this "
            f"machine has {gpus}",
        )


def _check_data(train: Config) -> None:
    """MNIST where the trials will look, fetched here once if allowed (not by every trial at once)."""
    from .data import DataNotFoundError, load_mnist

    try:
        load_mnist(train.data.data_dir, download=train.data.download)
    except DataNotFoundError as exc:
        raise SweepError(f"the trials would find no MNIST: {exc}") from None


def _start_ray(address: str | None) -> None:
    import ray

    if address:
        ray.init(address=address)
        return
    # address="local": a private cluster, never a stray one left by `ray start` on this machine. Its
    # dashboard stays on, on 127.0.0.1: Ray Train frees a stopped trial's workers through the state API it
    # serves. Workers find that API through RAY_API_SERVER_ADDRESS, else by guessing (RAY_ADDRESS,
    # /tmp/ray/ray_current_cluster, any GCS process), which can pick another cluster on this machine.
    # (Ray 2.60 still binds its GCS and raylet on every interface; its token auth is what guards them.)
    try:
        port = free_port()
    except OSError as exc:
        raise SweepError(f"{exc} for the Ray dashboard") from None
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


def _best_config(sweep: Sweep, row: TrialRow, record: SweepRecord) -> Config:
    """The base config with the best trial's values, ready for ``train_ddp.py --config``."""
    return apply_overrides(
        sweep.train,
        {
            **row.params,
            "output_dir": f"runs/{sweep.name}-best",
            "run_name": f"{sweep.name}-best",
            "tracking_uri": record.tracking_uri,
            "experiment": sweep.experiment,
        },
    )


def _importances(rows: typing.Sequence[TrialRow], sweep: Sweep) -> dict[str, float] | None:
    """Optuna's parameter importances over the trials with a value, when there are enough of them."""
    import optuna

    scored = [r for r in rows if r.value is not None and None not in r.params.values()]
    if len(scored) < MIN_TRIALS_FOR_IMPORTANCE or len({r.value for r in scored}) < 2:
        return None
    dists = optuna_space(sweep.space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize")
    for r in scored:
        study.add_trial(optuna.trial.create_trial(params=r.params, distributions=dists, value=r.value))
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # e.g. every parameter constant
        print(f"[sweep] no parameter importances: {exc}")
        return None


def _report(sweep: Sweep, record: SweepRecord, rows: list[TrialRow], sweep_dir: Path) -> int:
    """The end of a complete sweep: the report files and best trial on the parent run, and the table."""
    from .config import save_yaml

    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(rows, sweep, out / "trials.csv")]
    landscape = plot_landscape(rows, sweep, out / "landscape.png")
    files += [landscape] if landscape else []
    importances = _importances(rows, sweep)
    if importances:
        (out / "importances.json").write_text(json.dumps(importances, indent=2) + "\n")
        files.append(out / "importances.json")
    best = rows[0] if rows and rows[0].value is not None else None
    if best is not None:
        save_yaml(_best_config(sweep, best, record), out / "best_config.yaml")
        files.append(out / "best_config.yaml")
    write_report(record, rows, sweep, files, importances)
    print(f"\nSweep {sweep.name!r}: {len(rows)} trials, ranked by their best {sweep.metric} ({sweep.mode})")
    print(format_table(rows, sweep))
    if best is None:
        print("\nNo trial reported a value: see the errors above and in MLflow.")
        return 1
    print(
        f"\nBest trial {best.trial_id}: {sweep.metric} {best.value:.4g} with "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    )
    print(f"Train it fully: python train_ddp.py --config {out / 'best_config.yaml'}")
    if importances:
        print("Parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
    print(f"Report files: {out}")
    print(ui_hint(record))
    return 0


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    resume: bool = False,
    storage: str | os.PathLike | None = None,
) -> int:
    """Run (or with ``resume`` continue) a sweep; returns the exit status (0 done, 130 interrupted).

    Everything that can refuse does so before Ray starts. ``storage`` holds the Ray experiment directories
    (default ``./ray_results``); ``address`` joins an existing Ray cluster instead of starting a local one.
    """
    import ray

    from .data import resolve_data_dir

    tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri)
    check_tracking_uri(tracking_uri)
    sweep_dir = Path(storage or "ray_results").expanduser().resolve() / sweep.name
    _check_sweep_dir(sweep, sweep_dir, resume, tracking_uri)
    if not address:
        _check_local_resources(sweep.resources)
        _check_data(sweep.train)
    elif not tracking_uri.startswith(("http://", "https://")):
        print(
            f"[sweep] warning: trials on other nodes cannot write to {tracking_uri}; give --tracking_uri "
            "of an MLflow tracking server (and --storage on storage all nodes share)"
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = sweep_dir / SWEEP_FILE
    if not resume:
        saved.write_text(sweep_yaml(sweep))
    record = open_sweep_record(sweep, tracking_uri, sweep_dir, saved)
    plan = TrialPlan(
        base=config_to_dict(sweep.train),
        sweep_dir=str(sweep_dir),
        record=record,
        resources=sweep.resources,
        keep_checkpoints=sweep.checkpoints.num_to_keep,
        data_dir=str(resolve_data_dir(sweep.train.data.data_dir)),
        metric=sweep.metric,
    )
    try:
        _start_ray(address)
        _tuner(sweep, plan, sweep_dir, resume).fit()
    except BaseException:
        mark_parent(record, "FAILED")  # a --resume reopens it
        raise
    finally:
        ray.shutdown()
    # MLflow, not Tune's result grid, tells whether every trial ended: Tune marks the trials it stops on
    # an interrupt as terminated too.
    rows = collect_rows(record, sweep)
    done = sum(row.ended for row in rows)
    if done < sweep.search.num_samples:
        mark_parent(record, "KILLED")
        print(
            f"\nSweep {sweep.name!r} interrupted after {done} of {sweep.search.num_samples} trials; continue "
            f"it with the same command plus --resume (its state is in {sweep_dir})."
        )
        return 130
    return _report(sweep, record, rows, sweep_dir)
