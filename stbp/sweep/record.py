"""The MLflow record of a sweep: one parent run per sweep, one nested child run per trial, read back as rows.

Written with ``MlflowClient`` directly: Ray's MLflow callback keeps its trial-to-run map in memory and so
creates duplicate runs when a sweep is restored. Here the parent is found again through the id saved in the
Ray experiment directory, and each child through its ``ray_trial_id`` tag under that parent. A trial attaches
:func:`stbp.train.train` to its child run (``tracking.run_id``); the driver-side :class:`SweepCallback` closes
the runs that a trial cannot close itself (stopped early by ASHA, failed, interrupted).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from ..core.learned import MEANS
from ..core.monitor import SPIKE_COST
from ..tracking import TrackingError, experiment_id

if TYPE_CHECKING:
    from .spec import Sweep

__all__ = [
    "SweepRecord",
    "SweepCallback",
    "TrialRow",
    "COST_METRICS",
    "open_sweep_record",
    "child_run",
    "fail_child",
    "collect_rows",
    "ranked",
    "by_point",
    "log_point_stats",
    "POINT_TAG",
    "REPLICATE_TAG",
    "mark_parent",
]

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "ray_trial_id"
SWEEP_TAG = "stbp.sweep"
#: Every trial of one sampled point carries the point's number (the runs table groups by it), and its replicate.
POINT_TAG = "point"
REPLICATE_TAG = "replicate"
STATE_FILE = "mlflow_parent.json"
_ERROR_TAG_LIMIT = 5000  # MLflow tag values are limited (8000 chars on sqlite)


@dataclass(frozen=True)
class SweepRecord:
    """Where a sweep is recorded; small and picklable, it travels to every trial."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


# ----------------------------------------------------------------------------------------------------------
# Parent run (driver, before any trial starts)
# ----------------------------------------------------------------------------------------------------------


def open_sweep_record(sweep: Sweep, tracking_uri: str, sweep_dir: Path, resolved_yaml: Path) -> SweepRecord:
    """The sweep's parent run: found again through ``sweep_dir/mlflow_parent.json``, else created."""
    state = sweep_dir / STATE_FILE
    if state.exists():
        saved = json.loads(state.read_text())
        record = SweepRecord(**saved)
        client = record.client()
        try:
            client.update_run(record.parent_run_id, status="RUNNING")
        except MlflowException as exc:
            raise TrackingError(
                f"the MLflow parent run of this sweep ({record.parent_run_id} in {record.tracking_uri}, "
                f"saved in {state}) cannot be reopened: {exc}"
            ) from exc
        return record
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, sweep.experiment)
    scheduler = sweep.scheduler.type
    run = client.create_run(
        exp_id,
        run_name=sweep.name,
        tags={
            SWEEP_TAG: sweep.name,
            "stbp.role": "sweep",
            "searcher": sweep.search.searcher,
            "sampler": sweep.search.sampler,
            "scheduler": scheduler,
            "metric": ",".join(sweep.metrics),
            "mode": ",".join(sweep.modes),
            "sweep_dir": str(sweep_dir),
        },
    )
    record = SweepRecord(tracking_uri, exp_id, run.info.run_id, sweep.name)
    client.log_batch(record.parent_run_id, params=[Param(k, str(v)) for k, v in _sweep_params(sweep).items()])
    if sweep.source and Path(sweep.source).is_file():
        client.log_artifact(record.parent_run_id, sweep.source, "sweep")
    client.log_artifact(record.parent_run_id, str(resolved_yaml), "sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(record.__dict__, indent=2) + "\n")
    return record


def _sweep_params(sweep: Sweep) -> dict[str, Any]:
    s = sweep
    params: dict[str, Any] = {f"space.{name}": p.describe() for name, p in s.space.items()}
    params.update(
        {
            "preset": s.train.preset,
            "epochs": s.train.run.epochs,
            "num_samples": s.search.num_samples,
            "max_concurrent": s.search.max_concurrent,
            "seed": s.search.seed,
            "points_to_evaluate": json.dumps(list(s.search.points_to_evaluate)),
            "workers": s.resources.workers,
            "cpus_per_worker": s.resources.cpus,
            "gpus_per_worker": s.resources.gpus,
        }
    )
    if s.scheduler.type == "asha":
        params.update(
            max_t=s.max_t,
            grace_period=s.scheduler.grace_period,
            reduction_factor=s.scheduler.reduction_factor,
        )
    return params


# ----------------------------------------------------------------------------------------------------------
# Child runs (one per trial)
# ----------------------------------------------------------------------------------------------------------


def _find_child(client: MlflowClient, record: SweepRecord, trial_id: str):
    runs = client.search_runs(
        [record.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{record.parent_run_id}' and tags.{TRIAL_TAG} = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def _children(client: MlflowClient, record: SweepRecord):
    return client.search_runs(
        [record.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{record.parent_run_id}'",
        max_results=5000,
    )


def child_run(
    record: SweepRecord, trial_id: str, trial_name: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """The trial's child run id: found by its ``ray_trial_id`` tag (retry, resume) or created, nested."""
    client = record.client()
    run = _find_child(client, record, trial_id)
    if run is not None:
        if "error" in run.data.tags:  # a failed trial resumed: its old error no longer describes it
            client.delete_tag(run.info.run_id, "error")
        return run.info.run_id
    run = client.create_run(
        record.experiment_id,
        run_name=trial_name,
        tags={PARENT_TAG: record.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: record.sweep_name, **(tags or {})},
    )
    # The searched values first, so that even a trial that fails before training shows them.
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def _close(record: SweepRecord, trial, status: str, tags: dict[str, str], create: bool = False) -> None:
    client = record.client()
    run = _find_child(client, record, trial.trial_id)
    if run is None and create:  # it failed before it could open its run: the record still shows it
        params = {k: v for k, v in trial.config.items() if not k.startswith("__")}  # the searcher's bookkeeping
        point, replicate = trial.config.get("__point__"), trial.config.get("__trial_index__", 0)
        labels = {POINT_TAG: f"{point:02d}", REPLICATE_TAG: str(replicate)} if isinstance(point, int) else {}
        run_id = child_run(record, trial.trial_id, str(trial), params, labels)
    elif run is None or run.info.status != "RUNNING":
        return  # never started, or closed already (train() marks its own success FINISHED)
    else:
        run_id = run.info.run_id
    _terminate(client, run_id, status, tags)


def _terminate(client: MlflowClient, run_id: str, status: str, tags: dict[str, str]) -> None:
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status)


def _error_tags(error: str) -> dict[str, str]:
    return {"error": error.strip()[-_ERROR_TAG_LIMIT:]}


def fail_child(record: SweepRecord, run_id: str, error: str) -> None:
    """Close a trial's child run as FAILED with the reason (a trial that ends itself, e.g. on divergence)."""
    _terminate(record.client(), run_id, "FAILED", _error_tags(error))


class SweepCallback(tune.Callback):
    """Driver side: closes the child runs that trials cannot close themselves.

    A trial that ASHA stops never runs code after its last report, and a failed one leaves its run to its
    owner; an interrupted sweep leaves its running trials behind (a resume reopens them).
    """

    def __init__(self, record: SweepRecord):
        self.record = record

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Still RUNNING after the trial ended: train() did not return, so the scheduler stopped it.
        _close(self.record, trial, "KILLED", {"stopped_early": "true"})

    def on_trial_error(self, iteration, trials, trial, **info):
        _close(self.record, trial, "FAILED", _error_tags(str(trial.get_error() or "unknown error")), create=True)

    def on_experiment_end(self, trials, **info):
        # Nothing runs after the experiment ends (done or interrupted): a run still open was cut short.
        client = self.record.client()
        for run in _children(client, self.record):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")


def mark_parent(record: SweepRecord, status: str) -> None:
    record.client().set_terminated(record.parent_run_id, status)


# ----------------------------------------------------------------------------------------------------------
# Reading the record back
# ----------------------------------------------------------------------------------------------------------


#: Reported with every row: what the trial's last epoch cost in spikes (on the validation set).
COST_METRICS = SPIKE_COST[:3]


@dataclass
class TrialRow:
    """One trial as MLflow recorded it; ``value`` is its best (first) metric over the epochs it ran, ``last``
    every metric of the sweep and the spike cost at its last epoch (what a multi-objective searcher was told)."""

    trial_id: str
    run_id: str
    params: dict[str, Any]
    status: str
    value: float | None
    epochs: int
    tags: dict[str, str] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    #: A point's row (:func:`by_point`): the replicates' standard deviation of ``value`` (under the first metric's
    #: name) and of each ``last`` metric, how many replicates have a value, and the replicates themselves.
    std: dict[str, float] = field(default_factory=dict)
    n: int = 1
    replicates: tuple[TrialRow, ...] = ()

    @property
    def point(self) -> str:
        """The sampled point's number (the trial's own id for a trial recorded without one)."""
        return self.tags.get(POINT_TAG) or self.trial_id

    @property
    def error(self) -> str:
        return self.tags.get("error", "")

    @property
    def ended(self) -> bool:
        """Finished, stopped early or failed: not to be run again."""
        return self.outcome in ("finished", "stopped early", "failed")

    @property
    def outcome(self) -> str:
        if self.status == "KILLED":
            return "stopped early" if self.tags.get("stopped_early") == "true" else "interrupted"
        return {"FINISHED": "finished", "FAILED": "failed"}.get(self.status, self.status.lower())


def _cast(param, text: str | None) -> Any:
    """A searched value back from its MLflow string."""
    if text is None:
        return None
    if param.type == "choice":
        return next((v for v in param.values if str(v) == text), text)
    return int(text) if param.type == "int" else float(text)


def collect_rows(record: SweepRecord, sweep: Sweep) -> list[TrialRow]:
    """Every child run of the sweep, ranked best first (failed trials after the others, those without a value
    last)."""
    client = record.client()
    rows = []
    metric, mode = sweep.metrics[0], sweep.modes[0]
    for run in _children(client, record):
        history = client.get_metric_history(run.info.run_id, metric)
        values = [m.value for m in history if math.isfinite(m.value)]
        best = (max if mode == "max" else min)(values) if values else None
        last = {}
        for name in dict.fromkeys((*sweep.metrics, *COST_METRICS, *MEANS)):
            points = history if name == metric else client.get_metric_history(run.info.run_id, name)
            if points and math.isfinite(final := max(points, key=lambda m: m.step).value):
                last[name] = final
        rows.append(
            TrialRow(
                trial_id=run.data.tags.get(TRIAL_TAG, "?"),
                run_id=run.info.run_id,
                params={name: _cast(p, run.data.params.get(name)) for name, p in sweep.space.items()},
                status=run.info.status,
                value=best,
                epochs=len({m.step for m in history}),
                tags=dict(run.data.tags),
                last=last,
            )
        )
    return ranked(rows, mode)


def ranked(rows: Sequence[TrialRow], mode: str) -> list[TrialRow]:
    """Best first; a failed trial (e.g. diverged after a good epoch) never above one that trained to its end."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.value is None, r.status == "FAILED", sign * (r.value or 0.0), r.trial_id))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def by_point(rows: Sequence[TrialRow], sweep: Sweep) -> list[TrialRow]:
    """One row per sampled point, ranked: the mean over its replicates of the best first metric and of each
    metric at the last epoch, with their sample standard deviations and counts (failed replicates left out)."""
    groups: dict[str, list[TrialRow]] = {}
    for row in ranked(rows, sweep.modes[0]):
        groups.setdefault(row.point, []).append(row)
    points = []
    for point, reps in groups.items():
        scored = [r.value for r in reps if r.value is not None and math.isfinite(r.value)]
        value, spread = _mean_std(scored) if scored else (None, float("nan"))
        last, std = {}, {sweep.metrics[0]: spread}
        for name in dict.fromkeys(k for r in reps for k in r.last):
            last[name], std[f"last_{name}"] = _mean_std([r.last[name] for r in reps if name in r.last])
        best = reps[0]  # its run holds the point's best model
        status = best.status if scored or len(reps) == 1 else "FAILED"
        epochs = max(r.epochs for r in reps)
        row = TrialRow(point, best.run_id, best.params, status, value, epochs, best.tags, last, std, len(scored))
        points.append(dataclasses.replace(row, replicates=tuple(reps)))
    return ranked(points, sweep.modes[0])


def log_point_stats(record: SweepRecord, points: Sequence[TrialRow], sweep: Sweep) -> None:
    """On every replicate's run, its point's mean and standard deviation of the first metric and ``replicates``
    (n), so that the compare page can plot a point's mean against its parameters."""
    from mlflow.entities import Metric

    client, metric = record.client(), sweep.metrics[0]
    for p in points:
        if p.value is None:
            continue
        stats = {f"{metric}_mean": p.value, f"{metric}_std": p.std.get(metric, 0.0), "replicates": p.n}
        for rep in p.replicates:
            client.log_batch(rep.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in stats.items()])
