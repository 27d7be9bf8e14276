"""The end of a sweep: the ranked trials as a CSV and a table, the landscape plot, parameter importances and the
best trial's config, logged on the parent run, which then closes FINISHED."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

from ..config import Config, apply_overrides, save_yaml
from .analysis import derived, is_number, pareto_front, working_region
from .compare import format_pairs, pairs, plot_pairs, short_value, write_pairs_csv
from .plots import plot_landscape, plot_pareto, plot_slices
from .record import COST_METRICS, SweepRecord, TrialRow, by_point, log_point_stats
from .spec import Sweep

__all__ = [
    "report",
    "write_csv",
    "format_table",
    "format_region",
    "importances",
    "best_config",
    "ui_hint",
    "compare_url",
    "register_best",
]

MIN_TRIALS_FOR_IMPORTANCE = 4


def write_csv(rows: Sequence[TrialRow], sweep: Sweep, path: Path, front: Sequence[TrialRow] = ()) -> Path:
    """Every point (:func:`~stbp.sweep.record.by_point`): rank, searched values, derived coordinates, the mean
    and standard deviation over its replicates of the best first metric and of every metric and the spike cost
    at the last epoch, how many replicates, whether it is Pareto-optimal (multi-objective sweeps), outcome, the
    best replicate's run id, error."""
    derived_names = list(derived(rows[0].params)) if rows else []
    last = list(dict.fromkeys((*sweep.metrics, *COST_METRICS)))
    on_front = {r.trial_id for r in front}
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "rank",
                "point",
                *sweep.space,
                *(n.replace("/", "_over_") for n in derived_names),
                f"best_{sweep.metrics[0]}",
                f"best_{sweep.metrics[0]}_std",
                *(f"last_{m}{s}" for m in last for s in ("", "_std")),
                "n",
                *(["pareto_optimal"] if sweep.multi_objective else []),
                "epochs_run",
                "status",
                "run_id",
                "error",
            ]
        )
        for rank, r in enumerate(rows, 1):
            extra = derived(r.params)
            out.writerow(
                [
                    rank,
                    r.trial_id,
                    *(r.params[n] for n in sweep.space),
                    *(extra.get(n, "") for n in derived_names),
                    "" if r.value is None else r.value,
                    r.std.get(sweep.metrics[0], 0.0),
                    *(
                        v
                        for m in last
                        for v in (r.last.get(m, ""), r.std.get(f"last_{m}", "" if m not in r.last else 0))
                    ),
                    r.n,
                    *([str(r.trial_id in on_front).lower()] if sweep.multi_objective else []),
                    r.epochs,
                    r.outcome,
                    r.run_id,
                    r.error[-300:],
                ]
            )
    return path


def _trials(points: Sequence[TrialRow]) -> list[TrialRow]:
    """Every trial of the points, point by point."""
    return [run for p in points for run in p.replicates or (p,)]


def write_report(
    record: SweepRecord,
    rows: Sequence[TrialRow],
    sweep: Sweep,
    files: Sequence[Path],
    importances: dict[str, float] | None,
    region: dict | None,
    front: Sequence[TrialRow],
) -> None:
    """Log on the parent run the best trial, the report files, the importances, the working region and the link
    that compares the trials; tag each trial of a multi-objective sweep ``pareto_optimal``; close it FINISHED."""
    client = record.client()
    parent = record.parent_run_id
    for path in files:
        client.log_artifact(parent, str(path), "report")
    metrics = [Metric(f"importance.{k}", float(v), 0, 0) for k, v in (importances or {}).items()]
    best = rows[0] if rows and rows[0].value is not None else None
    trials = _trials(rows)
    tags = [RunTag("trials", str(len(trials))), RunTag("compare_trials_url", compare_url(record, trials))]
    if region is not None:
        metrics.append(Metric("region.trials", region["trials"], 0, 0))
        metrics += [
            Metric(f"region.{name}.{end}", float(v), 0, 0)
            for name, span in region["ranges"].items()
            if all(is_number(v) for v in span)
            for end, v in zip(("low", "high"), span)
        ]
    if sweep.multi_objective:
        on_front = {r.trial_id for r in front}
        for r in rows:
            for run in r.replicates or (r,):
                client.set_tag(run.run_id, "pareto_optimal", str(r.trial_id in on_front).lower())
        tags.append(RunTag("pareto_trials", ",".join(r.trial_id for r in front)))
    if best is not None:
        metrics.append(Metric(f"best_{sweep.metrics[0]}", best.value, 0, 0))
        tags += [RunTag("best_run_id", best.run_id), RunTag("best_trial_id", best.trial_id)]
        params = [Param(f"best.{k}", str(v)) for k, v in best.params.items()]
        existing = client.get_run(parent).data.params
        if all(existing.get(p.key, p.value) == p.value for p in params):  # params cannot change once logged
            client.log_batch(parent, params=[p for p in params if p.key not in existing])
        else:
            tags += [RunTag(p.key, p.value) for p in params]
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.set_terminated(parent, "FINISHED")


def register_best(record: SweepRecord, best: TrialRow, name: str | None) -> str | None:
    """The best trial's best.pt as a new version of ``name`` in the Model Registry; its model URI."""
    if name is None:
        return None
    from ..tracking.registry import register_model
    from ..train.checkpoint import load_checkpoint

    path = Path(best.tags.get("output_dir", "")) / "checkpoints" / "best.pt"
    if not path.is_file():  # trained on another node: its run has it
        from mlflow.artifacts import download_artifacts

        path = download_artifacts(
            run_id=best.run_id, artifact_path="checkpoints/best.pt", tracking_uri=record.tracking_uri
        )
    model, cfg = load_checkpoint(path)
    found = register_model(model, cfg, record.tracking_uri, best.run_id, name)
    record.client().set_tag(record.parent_run_id, "registered_model", found["model_uri"])
    return found["model_uri"]


def _value(row: TrialRow, sweep: Sweep) -> str:
    """The best first metric; a point's mean with its standard deviation and count when points repeat."""
    if row.value is None:
        return "-"
    spread = row.std.get(sweep.metrics[0], 0.0)
    return f"{row.value:.4g} ± {spread:.2g} (n={row.n})" if sweep.search.repeats > 1 else f"{row.value:.4g}"


def format_table(rows: Sequence[TrialRow], sweep: Sweep, front: Sequence[TrialRow] = ()) -> str:
    """The ranked trials as a plain-text table: searched values, aa/v_th, the best metric, the synaptic operations
    per image of the last epoch and, in a multi-objective sweep, every metric and the Pareto-optimal ones."""
    names = list(sweep.space)
    derived_names = list(derived(rows[0].params)) if rows else []
    others = list(sweep.metrics[1:])
    cost = [] if "sops_per_image" in others else ["sops_per_image"]
    header = [
        "rank",
        "point",
        *names,
        *derived_names,
        f"best {sweep.metrics[0]}",
        *others,
        *cost,
        *(["pareto"] if sweep.multi_objective else []),
        "epochs",
        "status",
    ]
    on_front = {r.trial_id for r in front}
    body = []
    for rank, r in enumerate(rows, 1):
        extra = derived(r.params)
        body.append(
            [
                str(rank),
                r.trial_id,
                *(short_value(r.params[n]) for n in names),
                *(short_value(extra.get(n, "-")) for n in derived_names),
                _value(r, sweep),
                *(short_value(r.last.get(m, "-")) for m in (*others, *cost)),
                *(["*" if r.trial_id in on_front else ""] if sweep.multi_objective else []),
                str(r.epochs),
                r.outcome,
            ]
        )
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_region(region: dict, unit: str = "trials") -> str:
    """Where the network works, in one line per coordinate (``unit``: what the rows are, trials or points)."""
    lines = [
        f"Where it works: {region['trials']} of {region['of']} {unit} reach {region['fraction']:.0%} of the "
        f"best {region['metric']} ({region['best']:.4g}; threshold {region['threshold']:.4g}):"
    ]
    for name, span in region["ranges"].items():
        text = (
            f"{span[0]:.3g} to {span[1]:.3g}"
            if all(is_number(v) for v in span)
            else ", ".join(map(str, span))  # the choices that work
        )
        lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def _ui_base(record: SweepRecord) -> str:
    if record.tracking_uri.startswith(("http://", "https://")):
        return record.tracking_uri.rstrip("/")
    return "http://127.0.0.1:5000"  # where `mlflow ui` below serves a local store


def compare_url(record: SweepRecord, rows: Sequence[TrialRow]) -> str:
    """MLflow's compare page of all the sweep's trials (parallel coordinates of the parameters and metrics)."""
    from urllib.parse import quote

    runs = json.dumps([r.run_id for r in rows], separators=(",", ":"))
    return (
        f"{_ui_base(record)}/#/compare-runs?runs={quote(runs)}&experiments={quote(json.dumps([record.experiment_id]))}"
    )


def ui_hint(record: SweepRecord, rows: Sequence[TrialRow] = ()) -> str:
    """How to open this sweep in the MLflow UI: its runs table (MLflow 3 otherwise opens a GenAI view) and the
    comparison of its trials."""
    lines = []
    if not record.tracking_uri.startswith(("http://", "https://")):
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {record.tracking_uri} --host 127.0.0.1 --port 5000")
    lines.append(f"Runs table:         {_ui_base(record)}/#/experiments/{record.experiment_id}/runs")
    if rows:
        lines.append(f"Compare the trials: {compare_url(record, rows)}")
    return "\n".join(lines)


def best_config(sweep: Sweep, row: TrialRow, record: SweepRecord) -> Config:
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


def importances(rows: Sequence[TrialRow], sweep: Sweep) -> dict[str, float] | None:
    """Optuna's parameter importances over the trials with a value, when there are enough of them."""
    import optuna

    scored = [r for r in rows if r.value is not None and None not in r.params.values()]
    if len(scored) < MIN_TRIALS_FOR_IMPORTANCE or len({r.value for r in scored}) < 2:
        return None
    dists = {name: p.distribution() for name, p in sweep.space.items()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sweep.modes[0] == "max" else "minimize")
    for r in scored:
        study.add_trial(optuna.trial.create_trial(params=r.params, distributions=dists, value=r.value))
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # e.g. every parameter constant
        print(f"[sweep] no parameter importances: {exc}")
        return None


def _files(sweep: Sweep, rows: list[TrialRow], region: dict | None, front: list[TrialRow], out: Path) -> list[Path]:
    """The report's tables and pictures under ``out`` (the learned-against-fixed comparison when the sweep
    searches a learned-neuron switch, :mod:`stbp.sweep.compare`)."""
    files = [write_csv(rows, sweep, out / "trials.csv", front)]
    if region is not None:
        (out / "sensitivity.json").write_text(json.dumps(region, indent=2) + "\n")
        files.append(out / "sensitivity.json")
    if sweep.multi_objective:
        write_csv(front, sweep, out / "pareto.csv", front)
        files.append(out / "pareto.csv")
    plots = [plot_landscape(rows, sweep, out / "landscape.png"), plot_slices(rows, sweep, region, out / "slices.png")]
    if sweep.multi_objective:
        plots.append(plot_pareto(rows, front, sweep, out / "pareto.png"))
    if found := pairs(rows, sweep):
        files.append(write_pairs_csv(found, sweep, out / "learn_vs_fixed.csv"))
        plots.append(plot_pairs(found, sweep, out / "learn_vs_fixed.png"))
    return files + [p for p in plots if p]


def report(sweep: Sweep, record: SweepRecord, trials: list[TrialRow], sweep_dir: Path) -> int:
    """The end of a complete sweep: the report files, the working region, the Pareto front and the best point on
    the parent run (each on the points' means over their replicates), and the table."""
    rows = by_point(trials, sweep)
    log_point_stats(record, rows, sweep)
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    front = pareto_front(rows, sweep.metrics, sweep.modes) if sweep.multi_objective else []
    region = working_region(rows, sweep)
    files = _files(sweep, rows, region, front, out)
    scores = importances(rows, sweep)
    if scores:
        (out / "importances.json").write_text(json.dumps(scores, indent=2) + "\n")
        files.append(out / "importances.json")
    best = rows[0] if rows and rows[0].value is not None else None
    if best is not None:
        save_yaml(best_config(sweep, best, record), out / "best_config.yaml")
        files.append(out / "best_config.yaml")
    write_report(record, rows, sweep, files, scores, region, front)
    registered = register_best(record, best, sweep.mlflow.registered_model) if best is not None else None
    count = (
        f"{len(rows)} points x {sweep.search.repeats} replicates" if sweep.search.repeats > 1 else f"{len(rows)} trials"
    )
    print(f"\nSweep {sweep.name!r}: {count}, ranked by their best {sweep.metrics[0]} ({sweep.modes[0]})")
    print(format_table(rows, sweep, front))
    if best is None:
        print("\nNo trial reported a value: see the errors above and in MLflow.")
        return 1
    print(
        f"\nBest point {best.trial_id}: {sweep.metrics[0]} {_value(best, sweep)} with "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    )
    if region is not None:
        print(format_region(region, "points" if sweep.search.repeats > 1 else "trials"))
    if sweep.multi_objective:
        print(
            f"Pareto front ({', '.join(f'{m} {d}' for m, d in zip(sweep.metrics, sweep.modes))}): "
            f"{len(front)} of {len(rows)} trials, tagged pareto_optimal=true: {', '.join(r.trial_id for r in front)}"
        )
    if found := pairs(rows, sweep):
        print(f"\nFixed against learned neurons, setting by setting ({out / 'learn_vs_fixed.png'}):")
        print(format_pairs(found, sweep))
    print(f"Train it fully: python train_ddp.py --config {out / 'best_config.yaml'}")
    if registered:
        print(f'Its model: mlflow.pytorch.load_model("{registered}") (Model Registry)')
    if scores:
        print("Parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    print(f"Report files: {out}")
    print(ui_hint(record, _trials(rows)))  # the link the parent's tag keeps
    return 0
