"""The sweep's pictures: the landscape over two searched parameters, one-parameter slices with the working
region, and the Pareto front of a multi-objective sweep. Each returns the PNG's path (None when nothing to draw)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .analysis import REFERENCE, REFERENCE_LABEL, coordinates, derived, is_number, is_reference
from .record import TrialRow
from .spec import Sweep

__all__ = ["plot_landscape", "plot_slices", "plot_pareto"]

MARKERS = {"finished": "o", "stopped early": "v"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes_params(sweep: Sweep, without: str | None = None) -> list:
    """v_th and aa when both are searched, else the first two searched parameters (``without`` one of them)."""
    searched = [name for name in sweep.space if name != without]
    names = ["v_th", "aa"] if {"v_th", "aa"} <= set(searched) else searched[:2]
    return [(name, sweep.space[name]) for name in names]


def _coord(param, value):
    """Where ``value`` of ``param`` is drawn: a choice at its index, a number at itself."""
    return param.values.index(value) if param.type == "choice" and value in param.values else value


def _landscape_point(axes: list, row: TrialRow) -> tuple:
    """``row``'s (x, y): its values of the two plotted parameters, or of the one and its metric."""
    (xname, xparam), *rest = axes
    x = _coord(xparam, row.params[xname])
    y = _coord(rest[0][1], row.params[rest[0][0]]) if rest else row.value
    return x, y


def _scatter_outcomes(ax, scored: Sequence[TrialRow], axes: list):
    """The trials, one marker per outcome, coloured by their metric on one scale; the last scatter (for a colorbar)."""
    values = [r.value for r in scored]
    for outcome in sorted({r.outcome for r in scored}):
        group = [r for r in scored if r.outcome == outcome]
        pts = [_landscape_point(axes, r) for r in group]
        sc = ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            c=[r.value for r in group],
            cmap="viridis",
            vmin=min(values),
            vmax=max(values),
            s=70,
            marker=MARKERS.get(outcome, "s"),
            edgecolors="k",
            linewidths=0.5,
            label=outcome,
        )
    return sc


def _mark_best_and_reference(ax, best: TrialRow, sweep: Sweep, axes: list) -> None:
    """The best trial starred; the reference setting ringed when the axes are v_th and aa."""
    bx, by = _landscape_point(axes, best)
    label = f"best: {sweep.metric} {best.value:.4g}"
    ax.scatter([bx], [by], marker="*", s=400, facecolors="none", edgecolors="red", linewidths=2, label=label)
    if [name for name, _ in axes] == ["v_th", "aa"]:
        ax.scatter(
            [REFERENCE["v_th"]],
            [REFERENCE["aa"]],
            marker="o",
            s=260,
            facecolors="none",
            edgecolors="tab:orange",
            linewidths=2,
            label=REFERENCE_LABEL,
        )


def _landscape_axes(ax, axes: list, sweep: Sweep) -> None:
    """Each axis named, ticked (choices), log-scaled (loguniform) or spanning the whole searched range."""
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


def plot_landscape(rows: Sequence[TrialRow], sweep: Sweep, path: Path) -> Path | None:
    """Every trial at its (x, y) searched values, coloured by its metric; the best one starred, the reference
    setting (:data:`~.analysis.REFERENCE`) ringed."""
    plt = _pyplot()
    axes = _axes_params(sweep)
    scored = [r for r in rows if r.value is not None and None not in r.params.values()]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(7, 5.5))
    fig.colorbar(_scatter_outcomes(ax, scored, axes), ax=ax, label=f"best {sweep.metric}")
    _mark_best_and_reference(ax, scored[0], sweep, axes)
    _landscape_axes(ax, axes, sweep)
    title_axes = " x ".join(name for name, _ in axes)
    ax.set_title(f"Sweep {sweep.name}: {title_axes} landscape ({_count(len(scored), sweep)})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _count(n: int, sweep: Sweep) -> str:
    return f"{n} points, means of {sweep.search.repeats} replicates" if sweep.search.repeats > 1 else f"{n} trials"


def _error_bars(ax, rows: Sequence[TrialRow], x, y, x_std: str | None, y_std: str | None) -> None:
    """One standard deviation of the replicates around each point (rows with one replicate: none)."""
    xs, ys = [r.std.get(x_std, 0.0) if x_std else 0.0 for r in rows], [r.std.get(y_std, 0.0) for r in rows]
    if any(v > 0 for v in xs + ys):
        points = ([x(r) for r in rows], [y(r) for r in rows])
        ax.errorbar(*points, xerr=xs, yerr=ys, fmt="none", ecolor="0.35", elinewidth=0.8, capsize=2, zorder=1)


def plot_slices(rows: Sequence[TrialRow], sweep: Sweep, region: dict | None, path: Path) -> Path | None:
    """The first metric against each searched parameter and derived coordinate, one panel each: the dashed line
    is the working threshold (a fraction of the best), the shaded span the range of the trials above it."""
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value) and None not in r.params.values()]
    if not scored or region is None:
        return None
    names = [n for n in coordinates(scored[0]) if all(is_number(coordinates(r)[n]) for r in scored)]
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True, squeeze=False)
    metric = sweep.metrics[0]
    for ax, name in zip(axes[0], names):
        for outcome in sorted({r.outcome for r in scored}):
            group = [r for r in scored if r.outcome == outcome]
            _error_bars(ax, group, lambda r, name=name: coordinates(r)[name], lambda r: r.value, None, metric)
            ax.scatter(
                [coordinates(r)[name] for r in group],
                [r.value for r in group],
                s=45,
                edgecolors="k",
                linewidths=0.5,
                marker=MARKERS.get(outcome, "s"),
                label=outcome,
            )
        low, high = region["ranges"][name]
        ax.axvspan(low, high, color="tab:green", alpha=0.12, label="working region")
        ax.axhline(region["threshold"], color="tab:green", ls="--", lw=1, label=f"{region['fraction']:.0%} of the best")
        ref = {**REFERENCE, **derived(REFERENCE)}.get(name)
        if ref is not None:
            ax.axvline(ref, color="tab:orange", lw=1, ls=":", label="reference setting")
        values = [coordinates(r)[name] for r in scored]
        param = sweep.space.get(name)
        wide = min(values) > 0 and max(values) / min(values) > 20  # a derived coordinate spanning decades
        if (param.type == "loguniform") if param is not None else wide:
            ax.set_xscale("log")
        ax.set_xlabel(name)
    axes[0][0].set_ylabel(f"best {metric}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Sweep {sweep.name}: {metric} against each coordinate ({_count(len(scored), sweep)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(rows: Sequence[TrialRow], front: Sequence[TrialRow], sweep: Sweep, path: Path) -> Path | None:
    """The first metric against the second, each at the trial's last epoch: every trial, the Pareto front
    highlighted and joined, the reference setting (:data:`~.analysis.REFERENCE`) starred."""
    y_name, x_name = sweep.metrics[:2]
    pts = [r for r in rows if x_name in r.last and y_name in r.last]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    _error_bars(ax, pts, lambda r: r.last[x_name], lambda r: r.last[y_name], f"last_{x_name}", f"last_{y_name}")
    ax.scatter(
        [r.last[x_name] for r in pts],
        [r.last[y_name] for r in pts],
        s=40,
        color="0.6",
        edgecolors="k",
        linewidths=0.4,
        label="trials",
    )
    line = sorted(front, key=lambda r: r.last[x_name])
    ax.plot(
        [r.last[x_name] for r in line],
        [r.last[y_name] for r in line],
        "-o",
        color="tab:red",
        ms=8,
        drawstyle="steps-post" if sweep.modes[1] == "min" else "default",
        label="Pareto front",
    )
    for r in line:
        label = ", ".join(f"{k} {v:.3g}" for k, v in r.params.items() if isinstance(v, (int, float)))
        ax.annotate(label, (r.last[x_name], r.last[y_name]), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ref = [r for r in pts if is_reference(r)]
    if ref:
        ax.scatter(
            [ref[0].last[x_name]],
            [ref[0].last[y_name]],
            marker="*",
            s=320,
            color="tab:orange",
            edgecolors="k",
            zorder=5,
            label=REFERENCE_LABEL,
        )
    xs = [r.last[x_name] for r in pts if r.last[x_name] > 0]
    if xs and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"{x_name} ({sweep.modes[1]}, last epoch)")
    ax.set_ylabel(f"{y_name} ({sweep.modes[0]}, last epoch)")
    ax.set_title(f"Sweep {sweep.name}: {len(front)} Pareto-optimal of {_count(len(pts), sweep)}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
