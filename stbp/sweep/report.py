"""The end of a sweep: the ranked trials as a CSV and a table, the landscape plot, parameter importances and the
best trial's config, logged on the parent run, which then closes FINISHED."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

from ..config import Config, apply_overrides, save_yaml
from .record import SweepRecord, TrialRow
from .spec import Sweep

__all__ = ["report", "write_csv", "plot_landscape", "format_table", "importances", "best_config", "ui_hint"]

MIN_TRIALS_FOR_IMPORTANCE = 4


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
    names = ["v_th", "aa"] if {"v_th", "aa"} <= set(sweep.space) else list(sweep.space)[:2]
    return [(name, sweep.space[name]) for name in names]


def plot_landscape(rows: Sequence[TrialRow], sweep: Sweep, path: Path) -> Path | None:
    """Every trial at its (x, y) searched values, coloured by its metric; the best one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = _axes_params(sweep)

    def coord(param, value):  # choices are drawn at their index
        return param.values.index(value) if param.type == "choice" and value in param.values else value

    def xy(row):
        (xname, xparam), *rest = axes
        x = coord(xparam, row.params[xname])
        y = coord(rest[0][1], row.params[rest[0][0]]) if rest else row.value
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
    for (name, param), (label, scale, limits, ticks) in zip(axes, setters, strict=False):
        label(name)
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
    title_axes = " x ".join(name for name, _ in axes)
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
    study = optuna.create_study(direction="maximize" if sweep.mode == "max" else "minimize")
    for r in scored:
        study.add_trial(optuna.trial.create_trial(params=r.params, distributions=dists, value=r.value))
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as exc:  # e.g. every parameter constant
        print(f"[sweep] no parameter importances: {exc}")
        return None


def report(sweep: Sweep, record: SweepRecord, rows: list[TrialRow], sweep_dir: Path) -> int:
    """The end of a complete sweep: the report files and best trial on the parent run, and the table."""
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(rows, sweep, out / "trials.csv")]
    landscape = plot_landscape(rows, sweep, out / "landscape.png")
    files += [landscape] if landscape else []
    scores = importances(rows, sweep)
    if scores:
        (out / "importances.json").write_text(json.dumps(scores, indent=2) + "\n")
        files.append(out / "importances.json")
    best = rows[0] if rows and rows[0].value is not None else None
    if best is not None:
        save_yaml(best_config(sweep, best, record), out / "best_config.yaml")
        files.append(out / "best_config.yaml")
    write_report(record, rows, sweep, files, scores)
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
    if scores:
        print("Parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    print(f"Report files: {out}")
    print(ui_hint(record))
    return 0
