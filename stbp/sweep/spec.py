"""The sweep file: what a sweep searches and how its trials run, validated before anything starts.

A sweep file has the keys of :class:`Sweep` (``sweeps/vth_aa.yaml`` documents each one, and
``sweeps/sweep.schema.json`` lets an editor check them as they are typed). ``train`` is a training config (a preset
plus fields, exactly as ``train_ddp.py --config`` reads it); ``space`` maps training fields to ranges. Every
error is a :class:`SweepError` that names the dotted key, e.g. ``search.num_samples must be >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from ..config import (
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    check_global_batch,
    config_to_dict,
    field_names,
    flatten_mapping,
    parse_cli,
)
from ..monitor import SPIKE_COST
from ..validation import Rule, Word, build, did_you_mean, init_fields, load_yaml, section, unknown_key
from .errors import SweepError
from .space import PARAMS, Choice, IntRange, Param, Range

__all__ = [
    "SweepError",
    "Range",
    "IntRange",
    "Choice",
    "Search",
    "Scheduler",
    "Resources",
    "Failures",
    "Mlflow",
    "Checkpoints",
    "Sweep",
    "load_sweep",
    "sweep_to_dict",
    "sweep_yaml",
    "METRICS",
    "TRIAL_OWNED_FIELDS",
]


#: The metrics the trainer reports every epoch that a sweep can optimise (the spike cost is the validation set's).
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss", *SPIKE_COST)
#: Training fields every trial sets for itself: a sweep may neither set nor search them.
TRIAL_OWNED_FIELDS = (
    "output_dir",
    "resume",
    "run_id",
    "tracking_uri",
    "experiment",
    "mlflow",
    "run_name",
    "register_model",
)

sweep_section = functools.partial(section, error=SweepError)
AtLeast1 = Annotated[int, Field(ge=1)]


@sweep_section
class Search:
    """How trials are proposed: Optuna's sampler, its seed, the points to try first, how many and how wide."""

    searcher: Literal["optuna"] = "optuna"
    """The only searcher."""
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    """Optuna's sampler: 'tpe' (one or more metrics), 'nsga2' (NSGA-II, for several metrics) or 'random'."""
    seed: int | None = 0
    """The sampler's seed (null = random)."""
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    """Tried first, in order: one value for every searched parameter."""
    num_samples: AtLeast1 = 8
    """Trials in all, points_to_evaluate included."""
    max_concurrent: AtLeast1 = 1
    """Trials at once."""


@sweep_section
class Scheduler:
    """Early stopping of poor trials: ASHA on the metric at each epoch, or none."""

    type: Literal["asha", "none"] = "asha"
    """'asha' or 'none' (every trial runs to its end)."""
    max_t: AtLeast1 | None = None
    """ASHA's budget, at most the trial's epochs (null: those epochs); its rungs lie below it."""
    grace_period: AtLeast1 = 1
    """Epochs every trial runs before ASHA may stop it: the first rung."""
    reduction_factor: Annotated[float, Field(gt=1), Word("a number")] = 3.0
    """Rungs at grace_period x reduction_factor^k epochs; at each, trials below the top 1/factor stop."""


@sweep_section
class Resources:
    """Per trial: ``workers`` training processes (DDP when > 1), each with ``cpus`` CPUs and ``gpus`` GPUs."""

    cpus: Annotated[float, Field(gt=0), Word("a number")] = 1.0
    """CPUs per worker."""
    gpus: Annotated[float, Field(ge=0), Word("a number")] = 0.0
    """GPUs per worker (0 or 1 when workers > 1: one GPU per DDP rank)."""
    workers: AtLeast1 = 1
    """Training processes per trial: DDP through Ray Train when > 1."""

    def __post_init__(self) -> None:
        if self.workers > 1 and self.gpus not in (0, 1):
            raise ValueError(f"gpus must be 0 or 1 when workers > 1 (one GPU per DDP rank), got {self.gpus}")


@sweep_section
class Failures:
    """How often a crashed trial is retried from its last checkpoint."""

    max_failures: Annotated[int, Field(ge=0)] = 0
    """Retries of a crashed trial (0 = never); a diverged trial is never retried."""


NonEmpty = Annotated[str, Field(pattern=r"\S")]
Metric = Literal[METRICS]  # type: ignore[valid-type]
Mode = Literal["max", "min"]


@sweep_section
class Mlflow:
    """Where the sweep is recorded."""

    tracking_uri: NonEmpty | None = None
    """Tracking URI (null: sqlite:///<cwd>/mlflow.db; use a server beyond one node)."""
    experiment: NonEmpty | None = None
    """Experiment name (null: sweep-<name>)."""
    registered_model: NonEmpty | None = "stbp-{name}"
    """At the end, the best trial's model is registered under this name ({name}: the sweep's; null: not at all)."""


@sweep_section
class Checkpoints:
    """Ray checkpoints (last.pt + best.pt) kept per trial."""

    num_to_keep: AtLeast1 = 2
    """The newest this many are kept."""


@sweep_section
class Sweep:
    """A validated sweep: the base training config, the search space and how the trials run."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"), Rule("must be letters, digits, _ . or -")]
    """Names the Ray experiment directory (<storage>/<name>) and the MLflow parent run."""
    train: Config
    """The base training config of every trial: a preset plus training fields."""
    space: dict[str, Param]
    """The searched training fields: {type: uniform|loguniform|int, low, high} or {type: choice, values}."""
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    metric: Metric | tuple[Metric, ...] = "val_acc"
    """What the searcher (and the scheduler) optimise, reported every epoch; a list for a multi-objective sweep,
    e.g. [val_acc, sops_per_image], whose report is the Pareto front."""
    mode: Mode | tuple[Mode, ...] = "max"
    """max or min, one per metric (default: max for *_acc, min for the others)."""
    resources: Resources = field(default_factory=Resources)
    failures: Failures = field(default_factory=Failures)
    mlflow: Mlflow = field(default_factory=Mlflow)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    source: str = field(default="", init=False, compare=False)
    """The file it was read from (logged with the sweep)."""

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"sweep-{self.name}"

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.train.run.epochs

    @property
    def param_names(self) -> list[str]:
        return list(self.space)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics, a tuple even for one; the first ranks the trials in tables."""
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric)

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


FILE_KEYS = tuple(init_fields(Sweep))


def _read_train(raw: Any, train_cli: Sequence[str]) -> Config:
    if not isinstance(raw, Mapping):
        raise SweepError(f"train must be a mapping of a preset and training fields ({{preset: tiny}}), got {raw!r}")
    values = dict(raw)
    try:
        cfg = build_config(preset=values.pop("preset", None), overrides=values, cli=list(train_cli))
        owned = sorted((set(flatten_mapping(values)) | set(parse_cli(train_cli))) & set(TRIAL_OWNED_FIELDS))
    except ConfigError as exc:
        raise SweepError(f"train: {exc}") from None
    if owned:
        raise SweepError(f"train: {', '.join(owned)} is set by each trial itself; remove it")
    return apply_overrides(cfg, {"mlflow": True})


def _read_space(raw: Any, base: Config) -> dict[str, Param]:
    if not isinstance(raw, Mapping) or not raw:
        raise SweepError(
            "space must be a non-empty mapping of training fields to {type, low, high | values}, "
            f"e.g. 'v_th: {{type: uniform, low: 0.2, high: 0.8}}'; got {raw!r}"
        )
    searchable = [f for f in field_names() if f not in TRIAL_OWNED_FIELDS]
    space = {}
    for name, spec in raw.items():
        where = f"space.{name}"
        if name in TRIAL_OWNED_FIELDS:
            raise SweepError(f"{where} cannot be searched: each trial sets it for itself")
        if name not in searchable:
            raise SweepError(
                f"{where} is not a training config field{did_you_mean(name, searchable)}; "
                f"valid fields: {', '.join(searchable)}"
            )
        if not isinstance(spec, Mapping):
            raise SweepError(f"{where} must be a mapping like {{type: uniform, low: 0.2, high: 0.8}}, got {spec!r}")
        if spec.get("type") not in PARAMS:
            raise SweepError(f"{where}.type must be one of {', '.join(map(repr, PARAMS))}, got {spec.get('type')!r}")
        param = space[name] = build(PARAMS[spec["type"]], spec, where)
        values = enumerate(param.values) if isinstance(param, Choice) else (("low", param.low), ("high", param.high))
        for key, value in values:
            try:
                apply_overrides(base, {name: value})  # the training config's own type and range checks
            except ConfigError as exc:
                raise SweepError(f"{where}.{f'values[{key}]' if isinstance(key, int) else key}: {exc}") from None
    return space


def _read_points(points: Any, space: Mapping[str, Param]) -> tuple[dict, ...]:
    where = "search.points_to_evaluate"
    if not isinstance(points, (list, tuple)):
        raise SweepError(f"{where} must be a list of {{param: value}} mappings, got {points!r}")
    out = []
    for i, point in enumerate(points):
        at = f"{where}[{i}]"
        if not isinstance(point, Mapping):
            raise SweepError(f"{at} must be a mapping of {', '.join(space)}, got {point!r}")
        for key in point:
            if key not in space:
                raise unknown_key(at, key, list(space), SweepError)
        missing = [n for n in space if n not in point]
        if missing:
            raise SweepError(f"{at} is missing {', '.join(missing)} (every searched parameter needs a value)")
        values = {
            n: float(v) if isinstance(p, Range) and type(v) is int else v
            for (n, p), v in zip(space.items(), (point[n] for n in space))
        }
        for n, p in space.items():
            if not p.contains(values[n]):
                raise SweepError(f"{at}.{n} = {values[n]!r} is outside space.{n} {p.describe()}")
        out.append(values)
    return tuple(out)


def _read_objectives(metric: Any, mode: Any) -> tuple[Any, Any]:
    """``metric`` and ``mode`` checked: one metric and one mode, or lists of equal length (a missing mode is the
    metric's natural one: max for *_acc, min for the others)."""
    many = isinstance(metric, (list, tuple))
    metrics = list(metric) if many else [metric]
    for i, m in enumerate(metrics):
        if m not in METRICS:
            where = f"metric[{i}]" if many else "metric"
            choices = ", ".join(map(repr, METRICS))
            raise SweepError(f"{where} must be one of {choices}, got {m!r}{did_you_mean(m, METRICS)}")
    if not metrics or len(set(metrics)) < len(metrics):
        raise SweepError(f"metric must name each metric once, got {metrics}")
    if mode is None:
        modes = ["max" if m.endswith("_acc") else "min" for m in metrics]
    else:
        modes = list(mode) if isinstance(mode, (list, tuple)) else [mode]
        if isinstance(mode, (list, tuple)) != many or len(modes) != len(metrics):
            raise SweepError(
                f"metric and mode must have the same length: metric is {metric!r}, mode {mode!r} "
                "(one mode per metric: max or min)"
            )
        for i, m in enumerate(modes):
            if m not in ("max", "min"):
                where = f"mode[{i}]" if many else "mode"
                raise SweepError(f"{where} must be one of 'max', 'min', got {m!r}")
    return (tuple(metrics), tuple(modes)) if len(metrics) > 1 else (metrics[0], modes[0])


def _read_scheduler(raw: Any, epochs: int, metric: Any = "val_acc") -> Scheduler:
    sched = build(Scheduler, {"type": raw} if isinstance(raw, str) else raw, "scheduler")  # `scheduler: none`
    if sched.type == "asha" and isinstance(metric, tuple):
        raise SweepError(
            f"scheduler: asha ranks trials by one metric, but this sweep has {len(metric)} ({', '.join(metric)}): "
            "it would stop trials that trade one for another, the very trials a Pareto front is made of. Set "
            "`scheduler: none` for a multi-objective sweep"
        )
    max_t = sched.max_t or epochs
    if sched.type == "asha" and max_t > epochs:
        raise SweepError(
            f"scheduler.max_t ({max_t}) exceeds the trial's epochs ({epochs}); lower it or leave "
            "it out (it defaults to epochs)"
        )
    if sched.type == "asha" and sched.grace_period >= max_t:
        raise SweepError(
            f"scheduler.grace_period ({sched.grace_period}) must be < max_t ({max_t}): ASHA stops "
            "trials only at rungs before a trial's last epoch (or set `scheduler: none`)"
        )
    return sched


def load_sweep(
    path: str | os.PathLike,
    train_cli: Sequence[str] = (),
    num_samples: int | None = None,
    tracking_uri: str | None = None,
    metric: Sequence[str] | None = None,
) -> Sweep:
    """Read and validate a sweep file; :class:`SweepError` (a ConfigError) names the bad key.

    ``train_cli`` (``--field value`` ...) overrides the base training config of every trial; ``num_samples``
    and ``tracking_uri`` override the file's ``search.num_samples`` and ``mlflow.tracking_uri``; ``metric``
    (one or more) the file's ``metric``, each with its natural mode. Several metrics make a multi-objective sweep,
    which ASHA cannot schedule: the file's ASHA is then turned off, and a note says so.
    """
    try:
        raw = load_yaml(path, what="sweep file")
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if metric is not None and isinstance(raw, dict):
        raw = {**raw, "metric": list(metric) if len(metric) > 1 else metric[0]}
        raw.pop("mode", None)
        sched = raw.get("scheduler") or {}
        if len(metric) > 1 and (sched.get("type", "asha") if isinstance(sched, Mapping) else sched) == "asha":
            print(
                f"[sweep] {len(metric)} metrics: a multi-objective sweep, so ASHA (which ranks trials by one) is "
                "off: every trial runs all its epochs"
            )
            raw["scheduler"] = "none"
    try:
        sweep = _build_sweep(raw, train_cli, num_samples, tracking_uri)
    except SweepError as exc:
        raise SweepError(f"{path}: {exc}") from None
    object.__setattr__(sweep, "source", str(path))  # not a key of the file
    return sweep


def _section(raw: dict, key: str, **overrides: Any) -> dict | None:
    """The file's ``key`` section (None if absent) with ``overrides`` that are not None put in."""
    values = raw.get(key)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return values
    if values is not None and not isinstance(values, Mapping):
        return values  # build() says what it must be
    return {**(values or {}), **overrides}


def _build_sweep(raw: dict, train_cli, num_samples, tracking_uri) -> Sweep:
    for key in raw:
        if key not in FILE_KEYS:
            raise unknown_key("", key, FILE_KEYS, SweepError)
    for key in ("name", "train", "space"):
        if key not in raw:
            raise SweepError(f"missing required key {key!r}; a sweep file has {', '.join(FILE_KEYS)}")
    train = _read_train(raw["train"], train_cli)
    space = _read_space(raw["space"], train)
    metric, mode = _read_objectives(raw.get("metric", "val_acc"), raw.get("mode"))
    counted = [m for m in ((metric,) if isinstance(metric, str) else metric) if m in SPIKE_COST]
    if counted and not train.run.firing_rates:
        raise SweepError(
            f"metric {', '.join(counted)} is counted during validation with the firing rates: "
            "train.firing_rates must stay true"
        )
    search_raw = _section(raw, "search", num_samples=num_samples)
    points = search_raw.pop("points_to_evaluate", ()) if isinstance(search_raw, Mapping) else ()
    search = build(Search, search_raw, "search")
    points = _read_points(points, space)
    if search.num_samples < len(points):
        raise SweepError(
            f"search.num_samples ({search.num_samples}) is smaller than the {len(points)} points_to_evaluate"
        )
    resources = build(Resources, raw.get("resources"), "resources")
    try:
        check_global_batch(train.run.batch_size, resources.workers, "resources.workers")
    except ConfigError as exc:
        raise SweepError(f"train.{exc}") from None
    sections = {
        key: build(cls, raw.get(key), key) for key, cls in (("failures", Failures), ("checkpoints", Checkpoints))
    }
    sections["mlflow"] = mlflow = build(Mlflow, _section(raw, "mlflow", tracking_uri=tracking_uri), "mlflow")
    if mlflow.registered_model is not None and isinstance(raw["name"], str):  # the name is checked below
        name = mlflow.registered_model.replace("{name}", raw["name"])
        sections["mlflow"] = dataclasses.replace(mlflow, registered_model=name)
    return build(
        Sweep,
        dict(
            name=raw["name"],
            train=train,
            space=space,
            search=dataclasses.replace(search, points_to_evaluate=points),
            scheduler=_read_scheduler(raw.get("scheduler"), train.run.epochs, metric),
            metric=metric,
            mode=mode,
            resources=resources,
            **sections,
        ),
    )


def sweep_to_dict(sweep: Sweep) -> dict[str, Any]:
    """The resolved sweep as plain data (what ran, command-line overrides included), e.g. for YAML."""
    out = {"name": sweep.name, "train": config_to_dict(sweep.train)}
    out["space"] = {
        n: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}
        for n, p in sweep.space.items()
    }
    for key in ("search", "scheduler", "resources", "failures", "mlflow", "checkpoints"):
        out[key] = dataclasses.asdict(getattr(sweep, key))
    out["search"]["points_to_evaluate"] = [dict(p) for p in sweep.search.points_to_evaluate]
    out["metric"], out["mode"] = (list(v) if isinstance(v, tuple) else v for v in (sweep.metric, sweep.mode))
    return out


def sweep_yaml(sweep: Sweep) -> str:
    return yaml.safe_dump(sweep_to_dict(sweep), sort_keys=False, default_flow_style=False)
