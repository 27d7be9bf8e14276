"""The MLflow record of a sweep: one parent run per sweep, one nested child run per trial, and the report.

Written with ``MlflowClient`` directly: Ray's MLflow callback keeps its trial-to-run map in memory and so
creates duplicate runs when a sweep is restored. Here the parent is found again through the id saved in the
Ray experiment directory, and each child through its ``ray_trial_id`` tag under that parent. A trial attaches
:func:`stbp.train.train` to its child run (``tracking.run_id``); the driver-side :class:`SweepCallback` closes
the runs that a trial cannot close itself (stopped early by ASHA, failed, interrupted).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from .tracking import TrackingError

if TYPE_CHECKING:
    from .sweep import Sweep

__all__ = [
    "SweepRecord",
    "SweepCallback",
    "TrialRow",
    "open_sweep_record",
    "child_run",
    "fail_child",
    "collect_rows",
    "write_report",
    "format_table",
    "ui_hint",
]

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "ray_trial_id"
SWEEP_TAG = "stbp.sweep"
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


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    # The tag says "training runs" to MLflow 3's UI (it otherwise assumes GenAI traces).
    return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})


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
    exp_id = _experiment_id(client, sweep.experiment)
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
            "metric": sweep.metric,
            "mode": sweep.mode,
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
    params: dict[str, Any] = {f"space.{p.name}": p.describe() for p in s.space}
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


def child_run(record: SweepRecord, trial_id: str, trial_name: str, params: dict[str, Any]) -> str:
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
        tags={PARENT_TAG: record.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: record.sweep_name},
    )
    # The searched values first, so that even a trial that fails before training shows them.
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def _close(record: SweepRecord, trial, status: str, tags: dict[str, str], create: bool = False) -> None:
    client = record.client()
    run = _find_child(client, record, trial.trial_id)
    if run is None and create:  # it failed before it could open its run: the record still shows it
        run_id = child_run(record, trial.trial_id, str(trial), dict(trial.config))
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


# ----------------------------------------------------------------------------------------------------------
# The report (driver, after the sweep)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    """One trial as MLflow recorded it; ``value`` is its best metric over the epochs it ran."""

    trial_id: str
    run_id: str
    params: dict[str, Any]
    status: str
    value: float | None
    epochs: int
    tags: dict[str, str] = field(default_factory=dict)

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
    for run in _children(client, record):
        history = client.get_metric_history(run.info.run_id, sweep.metric)
        values = [m.value for m in history if math.isfinite(m.value)]
        best = (max if sweep.mode == "max" else min)(values) if values else None
        rows.append(
            TrialRow(
                trial_id=run.data.tags.get(TRIAL_TAG, "?"),
                run_id=run.info.run_id,
                params={p.name: _cast(p, run.data.params.get(p.name)) for p in sweep.space},
                status=run.info.status,
                value=best,
                epochs=len({m.step for m in history}),
                tags=dict(run.data.tags),
            )
        )
    sign = -1.0 if sweep.mode == "max" else 1.0
    # A failed trial (e.g. diverged after a good epoch) never ranks above one that trained to its end.
    return sorted(
        rows, key=lambda r: (r.value is None, r.status == "FAILED", sign * (r.value or 0.0), r.trial_id)
    )


def write_csv(rows: Sequence[TrialRow], sweep: Sweep, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "rank",
                "trial_id",
                *sweep.param_names,
                f"best_{sweep.metric}",
                "epochs_run",
                "status",
                "run_id",
                "error",
            ]
        )
        for rank, r in enumerate(rows, 1):
            out.writerow(
                [
                    rank,
                    r.trial_id,
                    *(r.params[n] for n in sweep.param_names),
                    "" if r.value is None else r.value,
                    r.epochs,
                    r.outcome,
                    r.run_id,
                    r.error[-300:],
                ]
            )
    return path


def _axes_params(sweep: Sweep) -> list:
    """v_th and aa when both are searched, else the first two searched parameters."""
    by_name = {p.name: p for p in sweep.space}
    if "v_th" in by_name and "aa" in by_name:
        return [by_name["v_th"], by_name["aa"]]
    return list(sweep.space[:2])


def plot_landscape(rows: Sequence[TrialRow], sweep: Sweep, path: Path) -> Path | None:
    """Every trial at its (x, y) searched values, coloured by its metric; the best one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = _axes_params(sweep)

    def coord(param, value):  # choices are drawn at their index
        return param.values.index(value) if param.type == "choice" and value in param.values else value

    def xy(row):
        x = coord(axes[0], row.params[axes[0].name])
        y = coord(axes[1], row.params[axes[1].name]) if len(axes) > 1 else row.value
        return x, y

    scored = [r for r in rows if r.value is not None and None not in r.params.values()]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(7, 5.5))
    markers = {"finished": "o", "stopped early": "v"}
    values = [r.value for r in scored]
    for outcome in sorted({r.outcome for r in scored}):
        group = [r for r in scored if r.outcome == outcome]
        pts = [xy(r) for r in group]
        sc = ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            c=[r.value for r in group],
            cmap="viridis",
            vmin=min(values),
            vmax=max(values),
            s=70,
            marker=markers.get(outcome, "s"),
            edgecolors="k",
            linewidths=0.5,
            label=outcome,
        )
    fig.colorbar(sc, ax=ax, label=f"best {sweep.metric}")
    best = scored[0]
    bx, by = xy(best)
    ax.scatter(
        [bx],
        [by],
        marker="*",
        s=400,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        label=f"best: {sweep.metric} {best.value:.4g}",
    )
    setters = (
        (ax.set_xlabel, ax.set_xscale, ax.set_xlim, ax.set_xticks),
        (ax.set_ylabel, ax.set_yscale, ax.set_ylim, ax.set_yticks),
    )
    for param, (label, scale, limits, ticks) in zip(axes, setters, strict=False):
        label(param.name)
        if param.type == "choice":
            ticks(range(len(param.values)), [str(v) for v in param.values])
        elif param.type == "loguniform":
            scale("log")
            limits(param.low, param.high)
        else:  # the whole searched range: the landscape also shows where nothing was tried
            margin = 0.03 * (param.high - param.low)
            limits(param.low - margin, param.high + margin)
    if len(axes) == 1:
        ax.set_ylabel(sweep.metric)
    title_axes = " x ".join(p.name for p in axes)
    ax.set_title(f"Sweep {sweep.name}: {title_axes} landscape ({len(scored)} trials)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    record: SweepRecord,
    rows: Sequence[TrialRow],
    sweep: Sweep,
    files: Sequence[Path],
    importances: dict[str, float] | None,
) -> None:
    """Log the best trial, the report files and the importances on the parent run, and close it FINISHED."""
    client = record.client()
    parent = record.parent_run_id
    for path in files:
        client.log_artifact(parent, str(path), "report")
    metrics = [Metric(f"importance.{k}", float(v), 0, 0) for k, v in (importances or {}).items()]
    best = rows[0] if rows and rows[0].value is not None else None
    tags = [RunTag("trials", str(len(rows)))]
    if best is not None:
        metrics.append(Metric(f"best_{sweep.metric}", best.value, 0, 0))
        tags += [RunTag("best_run_id", best.run_id), RunTag("best_trial_id", best.trial_id)]
        params = [Param(f"best.{k}", str(v)) for k, v in best.params.items()]
        existing = client.get_run(parent).data.params
        if all(existing.get(p.key, p.value) == p.value for p in params):  # params cannot change once logged
            client.log_batch(parent, params=[p for p in params if p.key not in existing])
        else:
            tags += [RunTag(p.key, p.value) for p in params]
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.set_terminated(parent, "FINISHED")


def mark_parent(record: SweepRecord, status: str) -> None:
    record.client().set_terminated(record.parent_run_id, status)


def format_table(rows: Sequence[TrialRow], sweep: Sweep) -> str:
    """The ranked trials as a plain-text table."""
    names = sweep.param_names
    header = ["rank", "trial", *names, f"best {sweep.metric}", "epochs", "status"]
    body = []
    for rank, r in enumerate(rows, 1):
        vals = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.params[n] for n in names)]
        value = "-" if r.value is None else f"{r.value:.4g}"
        body.append([str(rank), r.trial_id, *vals, value, str(r.epochs), r.outcome])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ui_hint(record: SweepRecord) -> str:
    """How to open this sweep in the MLflow UI (its runs table: MLflow 3 otherwise opens a GenAI view)."""
    page = f"/#/experiments/{record.experiment_id}/runs"
    if record.tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {record.tracking_uri.rstrip('/')}{page}"
    return (
        f"MLflow UI: mlflow ui --backend-store-uri {record.tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"           then open http://127.0.0.1:5000{page}"
    )
