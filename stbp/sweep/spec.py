"""The sweep file: what a sweep searches and how its trials run, validated before anything starts.

A sweep file has the keys of :class:`Sweep` (``sweeps/vth_aa.yaml`` documents each one, and
``sweeps/sweep.schema.json`` lets an editor check them as they are typed). ``train`` is a training config (a preset
plus fields, exactly as ``train_ddp.py --config`` reads it); ``space`` maps training fields to ranges. Pydantic
checks the types; the checks across keys are :meth:`Sweep.__post_init__`'s. Every error is a :class:`SweepError`
that names the dotted key and the value, e.g. ``search.num_samples: input should be greater than or equal to 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationInfo, field_validator

from ..config.settings import (
    BOOKKEEPING_FIELDS,
    FIELDS,
    AtLeast1,
    Config,
    NonEmpty,
    apply_overrides,
    build_config,
    flatten,
)
from ..config.validation import Bool, ConfigError, Float, Int, Str, did_you_mean, load_yaml, section, validate
from ..core.monitor import SPIKE_COST

#: The metrics the trainer reports every epoch that a sweep can optimise (the spike cost is the validation set's).
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss", *SPIKE_COST)
#: Bookkeeping fields every trial sets for itself (a sweep may still say where the data is and add tags).
TRIAL_OWNED_FIELDS = tuple(f for f in BOOKKEEPING_FIELDS if f not in ("data_dir", "tags", "workers"))
SEARCHABLE = tuple(f for f in sorted(FIELDS) if f not in TRIAL_OWNED_FIELDS)


class SweepError(ConfigError):
    """An invalid sweep file or sweep option; raised before anything starts."""


sweep_section = functools.partial(section, error=SweepError)


def one_or_many(kind: Any) -> Any:
    """``kind`` or a list of them: read as a tuple, kept as the one value when there is one."""
    as_list = BeforeValidator(lambda v: [v] if isinstance(v, str) else v, json_schema_input_type=kind | list[kind])
    return Annotated[tuple[kind, ...], as_list, AfterValidator(lambda t: t[0] if len(t) == 1 else t)]


class _Interval:
    """``low < high``; the shared half of :class:`Range` and :class:`IntRange`."""

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low={self.low}")

    def contains(self, value: Any) -> bool:
        number = (int,) if self.type == "int" else (int, float)
        return isinstance(value, number) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        return f"{self.type}[{self.low}, {self.high}]"


@sweep_section
class Range(_Interval):
    """A float drawn from [low, high], uniformly or log-uniformly."""

    type: Literal["uniform", "loguniform"]
    low: Float
    high: Float

    def distribution(self):
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.type == "loguniform")


@sweep_section
class IntRange(_Interval):
    """An int drawn from [low, high]."""

    type: Literal["int"]
    low: Int
    high: Int

    def distribution(self):
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high)


@sweep_section
class Choice:
    """One of ``values``."""

    type: Literal["choice"]
    values: Annotated[tuple[Bool | Int | Float | Str | None, ...], Field(min_length=1)]

    def contains(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        return f"choice{list(self.values)}"

    def distribution(self):
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(list(self.values))


#: A search-space entry: a float range, an int range or a choice (``type`` says which).
SearchParam = Annotated[Range | IntRange | Choice, Field(discriminator="type")]


@sweep_section
class Search:
    """How trials are proposed: Optuna's sampler, its seed, the points to try first, how many and how wide."""

    searcher: Literal["optuna"] = "optuna"
    """The only searcher."""
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    """Optuna's sampler: 'tpe' (one or more metrics), 'nsga2' (NSGA-II, for several metrics) or 'random'; 'grid':
    every combination of the space's choices once, in order (num_samples = their number)."""
    seed: Int | None = 0
    """The sampler's seed (null = random)."""
    points_to_evaluate: tuple[dict[Str, Any], ...] = ()
    """Tried first, in order: one value for every searched parameter."""
    num_samples: AtLeast1 = 8
    """Points sampled in all, points_to_evaluate included."""
    repeats: AtLeast1 = 1
    """Trainings of every point, seeds train.seed + 0, 1, ...: the searcher and the report see their mean."""
    max_concurrent: AtLeast1 = 1
    """Trials at once."""


@sweep_section
class Scheduler:
    """Early stopping of poor trials: ASHA on the metric at each epoch, or none (``scheduler: none`` for short)."""

    type: Literal["asha", "none"] = "asha"
    """'asha' or 'none' (every trial runs to its end)."""
    max_t: AtLeast1 | None = None
    """ASHA's budget, at most the trial's epochs (null: those epochs); its rungs lie below it."""
    grace_period: AtLeast1 = 1
    """Epochs every trial runs before ASHA may stop it: the first rung."""
    reduction_factor: Annotated[Float, Field(gt=1)] = 3.0
    """Rungs at grace_period x reduction_factor^k epochs; at each, trials below the top 1/factor stop."""


@sweep_section
class Resources:
    """Per trial: ``workers`` training processes (DDP when > 1), each with ``cpus`` CPUs and ``gpus`` GPUs."""

    cpus: Annotated[Float, Field(gt=0)] = 1.0
    """CPUs per worker."""
    gpus: Annotated[Float, Field(ge=0)] = 0.0
    """GPUs per worker (0 or 1 when workers > 1: one GPU per DDP rank)."""
    workers: AtLeast1 = 1
    """Training processes per trial: DDP through Ray Train when > 1."""

    def __post_init__(self) -> None:
        if self.workers > 1 and self.gpus not in (0, 1):
            raise ValueError(f"gpus must be 0 or 1 when workers > 1 (one GPU per DDP rank), got {self.gpus}")


@sweep_section
class Failures:
    """How often a crashed trial is retried from its last checkpoint."""

    max_failures: Annotated[Int, Field(ge=0)] = 0
    """Retries of a crashed trial (0 = never); a diverged trial is never retried."""


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

    name: Annotated[Str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    """Names the Ray experiment directory (<storage>/<name>) and the MLflow parent run."""
    train: Config
    """The base training config of every trial: a preset plus training fields."""
    space: dict[Literal[SEARCHABLE], SearchParam]  # type: ignore[valid-type]
    """The searched training fields: {type: uniform|loguniform|int, low, high} or {type: choice, values}."""
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    metric: one_or_many(Literal[METRICS]) = "val_acc"  # type: ignore[valid-type]
    """What the searcher and scheduler optimise, reported every epoch; several ([val_acc, sops_per_image]): Pareto."""
    mode: one_or_many(Literal["max", "min"]) | None = Field(  # type: ignore[valid-type]
        default=None, validate_default=True
    )
    """max or min, one per metric (default: max for *_acc, min for the others)."""
    resources: Resources = field(default_factory=Resources)
    failures: Failures = field(default_factory=Failures)
    mlflow: Mlflow = Field(default_factory=Mlflow, validate_default=True)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    source: str = field(default="", compare=False)
    """The file it was read from (logged with the sweep): :func:`load_sweep` says, never a key of the file."""

    # The values derived from others are filled in as the fields are read (each from fields above it), so that a
    # Sweep is whole when made; __post_init__ only checks.

    @field_validator("search")
    @classmethod
    def _first_points(cls, search: Search, info: ValidationInfo) -> Search:
        """The points to try first as the searcher takes them: ints as floats in float ranges; for a grid (a space
        of choices, no points given), every combination of the choices, in order."""
        space = info.data.get("space")
        if not space:
            return search
        if search.sampler == "grid":
            if search.points_to_evaluate or not all(isinstance(p, Choice) for p in space.values()):
                return search  # refused by _check_grid
            points = _grid(space)
        else:
            points = [
                {n: float(v) if type(v) is int and isinstance(space.get(n), Range) else v for n, v in point.items()}
                for point in search.points_to_evaluate
            ]
        return dataclasses.replace(search, points_to_evaluate=tuple(points))

    @field_validator("mode")
    @classmethod
    def _natural_mode(cls, mode: Any, info: ValidationInfo) -> Any:
        """No mode: max for each *_acc metric, min for the others."""
        metric = info.data.get("metric")
        if mode is not None or not metric:
            return mode
        natural = tuple("max" if m.endswith("_acc") else "min" for m in _as_tuple(metric))
        return natural if len(natural) > 1 else natural[0]

    @field_validator("mlflow")
    @classmethod
    def _model_name(cls, mlflow: Mlflow, info: ValidationInfo) -> Mlflow:
        """``{name}`` in the registered model's name is the sweep's."""
        if not mlflow.registered_model or "name" not in info.data:
            return mlflow
        return dataclasses.replace(
            mlflow, registered_model=mlflow.registered_model.replace("{name}", info.data["name"])
        )

    def __post_init__(self) -> None:
        if not self.space:
            raise ValueError("space: name at least one training field to search, e.g. v_th: {type: uniform, ...}")
        self._check_space()
        self._check_objectives()
        self._check_scheduler()
        self._check_points()
        if (batch := self.train.run.batch_size) % (workers := self.resources.workers):  # split over the workers
            raise ValueError(f"train.batch_size ({batch}) is not divisible by resources.workers ({workers})")

    def _check_space(self) -> None:
        """Each value a space can draw must be valid for its training field."""
        for name, param in self.space.items():
            ends = ((f"values[{i}]", v) for i, v in enumerate(param.values)) if isinstance(param, Choice) else None
            ends = ends or (("low", param.low), ("high", param.high))
            for key, value in ends:
                try:
                    apply_overrides(self.train, {name: value})
                except ConfigError as exc:
                    raise ValueError(f"space.{name}.{key}: {exc}") from None

    def _check_points(self) -> None:
        """Each point to try first gives a value inside every searched range."""
        if self.search.sampler == "grid":
            return self._check_grid()
        points = self.search.points_to_evaluate
        for i, point in enumerate(points):
            at = f"search.points_to_evaluate[{i}]"
            if set(point) != set(self.space):
                raise ValueError(f"{at} must give exactly {', '.join(self.space)}, got {', '.join(map(str, point))}")
            for n, p in self.space.items():
                if not p.contains(point[n]):
                    raise ValueError(f"{at}.{n} = {point[n]!r} is outside space.{n} {p.describe()}")
        if self.search.num_samples < len(points):
            raise ValueError(f"search.num_samples ({self.search.num_samples}) is below the {len(points)} points")

    def _check_grid(self) -> None:
        """A grid searches choices only, and its points are every combination of them (the sampler is then never
        asked), each once: :meth:`Sweep._first_points` fills them in."""
        ranges = [n for n, p in self.space.items() if not isinstance(p, Choice)]
        if ranges:
            raise ValueError(f"space.{ranges[0]}: a grid needs choices, got {self.space[ranges[0]].describe()}")
        points = self.search.points_to_evaluate
        if list(points) != _grid(self.space):
            raise ValueError("search.points_to_evaluate: a grid tries every point in order; leave it out")
        if self.search.num_samples != len(points):
            raise ValueError(f"search.num_samples: a grid of {len(points)} points, got {self.search.num_samples}")

    def _check_objectives(self) -> None:
        metrics = self.metrics
        if not metrics or len(set(metrics)) < len(metrics):
            raise ValueError(f"metric must name each metric once, got {list(metrics)}")
        if len(self.modes) != len(metrics):
            raise ValueError(f"mode must give one mode per metric ({', '.join(metrics)}), got {self.mode!r}")
        counted = [m for m in metrics if m in SPIKE_COST]
        if counted and not self.train.run.firing_rates:
            raise ValueError(f"metric {', '.join(counted)} is counted with the firing rates: keep train.firing_rates")

    def _check_scheduler(self) -> None:
        if self.scheduler.type == "none":
            return
        if self.search.repeats > 1:
            raise ValueError("scheduler: asha would stop a point's replicates apart: use `scheduler: none` to repeat")
        if self.multi_objective:
            raise ValueError("scheduler: asha ranks trials by one metric; set `scheduler: none` for several (Pareto)")
        if self.max_t > self.train.run.epochs:
            raise ValueError(f"scheduler.max_t ({self.max_t}) exceeds the trial's epochs ({self.train.run.epochs})")
        grace = self.scheduler.grace_period  # ASHA stops trials only before their last epoch
        if grace >= self.max_t:
            raise ValueError(f"scheduler.grace_period must be < max_t ({self.max_t}) or scheduler: none, got {grace}")

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or f"sweep-{self.name}"

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.train.run.epochs

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics, a tuple even for one; the first ranks the trials in tables."""
        return _as_tuple(self.metric)

    @property
    def modes(self) -> tuple[str, ...]:
        return _as_tuple(self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


def _as_tuple(one_or_many: str | Sequence[str]) -> tuple[str, ...]:
    return (one_or_many,) if isinstance(one_or_many, str) else tuple(one_or_many)


def _grid(space: Mapping[str, Choice]) -> list[dict[str, Any]]:
    """Every combination of the choices, in order."""
    return [dict(zip(space, values)) for values in itertools.product(*(p.values for p in space.values()))]


def load_sweep(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, **options: Any) -> Sweep:
    """Read and validate a sweep file; :class:`SweepError` names the file, the key and the value.

    ``overrides`` (training fields, e.g. ``tune.py``'s ``--epochs 2``) change every trial's base config;
    ``options``: ``num_samples`` and ``tracking_uri`` replace the file's ``search.num_samples`` and
    ``mlflow.tracking_uri``; ``metric`` (one or more) the file's ``metric``, each with its natural mode. Several
    metrics make a multi-objective sweep, which ASHA cannot schedule: ASHA is then off, and a note says so.
    """
    try:
        raw = _command_line(load_yaml(path, what="sweep file"), **options)
        if "train" in raw:
            raw["train"] = _read_train(raw["train"], overrides or {})
        return _validate(raw, path)
    except ConfigError as exc:
        raise SweepError(f"{path}: {exc}") from None


def _validate(raw: dict, path: str | os.PathLike) -> Sweep:
    """The sweep of a file's keys read from ``path``: where it was read is the loader's to say, so the file's own
    ``source`` key is an unknown one."""
    if "source" not in raw:
        return validate(Sweep, {**raw, "source": str(path)})
    unknown = f"unknown key source{did_you_mean('source', Sweep.__pydantic_fields__)}"
    try:
        validate(Sweep, {k: v for k, v in raw.items() if k != "source"})
    except ConfigError as exc:
        raise SweepError(f"{unknown}\n{exc}") from None
    raise SweepError(unknown)


def _command_line(raw: dict, num_samples=None, tracking_uri=None, metric: Sequence[str] | None = None) -> dict:
    """The file's keys with tune.py's options put in."""
    for key, name, value in (("search", "num_samples", num_samples), ("mlflow", "tracking_uri", tracking_uri)):
        if value is not None and isinstance(raw.get(key) or {}, Mapping):
            raw[key] = {**(raw.get(key) or {}), name: value}
    if isinstance(raw.get("scheduler"), str):  # `scheduler: none`
        raw["scheduler"] = {"type": raw["scheduler"]}
    if metric is not None:
        raw.update(metric=list(metric), mode=None)
    if metric is not None and len(metric) > 1:
        print(f"[sweep] {len(metric)} metrics: a multi-objective sweep, so ASHA (which ranks trials by one) is off")
        raw["scheduler"] = {"type": "none"}
    return raw


def _read_train(raw: Any, overrides: Mapping[str, Any]) -> Config:
    if not isinstance(raw, Mapping):
        raise SweepError(f"train: must be a mapping of a preset and training fields ({{preset: tiny}}), got {raw!r}")
    values = dict(raw)
    preset = values.pop("preset", None)
    try:
        given = set(flatten(values)) | set(overrides)
        cfg = build_config(preset=preset, overrides=values, cli=overrides)
    except ConfigError as exc:
        raise SweepError(f"train: {exc}") from None
    owned = sorted(given & set(TRIAL_OWNED_FIELDS))
    if owned:
        raise SweepError(f"train.{owned[0]}: each trial sets it for itself; remove it")
    return apply_overrides(cfg, {"mlflow": True})


def sweep_to_dict(sweep: Sweep) -> dict[str, Any]:
    """The resolved sweep as plain data (what ran, command-line overrides included), e.g. for YAML."""
    return {
        k: v for k, v in TypeAdapter(Sweep).dump_python(sweep, mode="json", warnings=False).items() if k != "source"
    }
