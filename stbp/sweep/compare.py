"""Learn or sweep: a sweep that searches a learned-neuron switch (``learn_v_th`` or ``learn_tau`` as a choice of
false and true) holds two populations, and its report compares them point by point. For every setting of the other
searched parameters (the initial ``v_th`` and ``aa``), the network with fixed neurons against the one that learns
them: the first metric (mean, std and replicates), the spike cost, and the gain, in a CSV, a table and one
picture of the two landscapes side by side on one colour scale."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.learned import MEANS
from .plots import _axes_params, _coord, _landscape_axes, _pyplot
from .record import TrialRow
from .spec import Sweep

__all__ = ["SWITCHES", "Pair", "switch", "pairs", "write_pairs_csv", "format_pairs", "plot_pairs", "short_value"]

#: The model fields whose two values split a sweep into fixed and learned populations (the first one searched).
SWITCHES = ("learn_v_th", "learn_tau")
COST = "sops_per_image"


@dataclass(frozen=True)
class Pair:
    """One setting of the other searched parameters, with its fixed and its learned point (None: not tried)."""

    setting: dict[str, Any]
    fixed: TrialRow | None
    learned: TrialRow | None

    def gain(self) -> float | None:
        """The learned point's first metric minus the fixed one's (None unless both have one)."""
        if self.fixed is None or self.learned is None or None in (self.fixed.value, self.learned.value):
            return None
        return self.learned.value - self.fixed.value


def switch(sweep: Sweep) -> str | None:
    """The searched learned-neuron switch (a choice of exactly false and true), or None."""
    for name in SWITCHES:
        p = sweep.space.get(name)
        if p is not None and p.type == "choice" and sorted(p.values) == [False, True]:
            return name
    return None


def pairs(rows: Sequence[TrialRow], sweep: Sweep) -> list[Pair]:
    """The points (:func:`~stbp.sweep.record.by_point`'s rows, ranked) paired by the other searched parameters,
    sorted by them; ``[]`` when the sweep searches no switch."""
    name = switch(sweep)
    if name is None:
        return []
    others = [n for n in sweep.space if n != name]
    table: dict[tuple, dict[bool, TrialRow]] = {}
    for row in rows:
        key = tuple(row.params.get(n) for n in others)
        table.setdefault(key, {}).setdefault(bool(row.params[name]), row)  # ranked: the best of duplicates
    return [
        Pair(dict(zip(others, key)), found.get(False), found.get(True))
        for key, found in sorted(table.items(), key=lambda item: [str(v) for v in item[0]])
    ]


def write_pairs_csv(found: Sequence[Pair], sweep: Sweep, path: Path) -> Path:
    """One row per setting: its values, then for the fixed and the learned point the first metric's mean, std and
    replicates, the spike cost (SOPs per image at the last epoch) and the outcome; the learned point's final mean
    threshold and time constant over the layers (where learned); the gain (learned - fixed)."""
    metric = sweep.metrics[0]
    others = list(found[0].setting) if found else []
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        fields = (metric, f"{metric}_std", "n", COST, "outcome")
        means = [f"learned_{m}" for m in MEANS]
        out.writerow([*others, *(f"{p}_{k}" for p in ("fixed", "learned") for k in fields), *means, f"{metric}_gain"])
        for pair in found:
            cells = []
            for row in (pair.fixed, pair.learned):
                if row is None:
                    cells += ["", "", 0, "", "not tried"]
                    continue
                value = "" if row.value is None else row.value
                cells += [value, row.std.get(metric, 0.0), row.n, row.last.get(COST, ""), row.outcome]
            learned = [pair.learned.last.get(m, "") if pair.learned else "" for m in MEANS]
            gain = pair.gain()
            out.writerow([*pair.setting.values(), *cells, *learned, "" if gain is None else gain])
    return path


def short_value(v: Any) -> str:
    """A value for a table cell: floats to 4 significant digits, anything else as ``str`` gives it."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cell(row: TrialRow | None, metric: str) -> str:
    if row is None:
        return "not tried"
    if row.value is None:
        return row.outcome
    spread = f" ± {row.std[metric]:.2f}" if row.n > 1 else ""
    cost = f", {row.last[COST] / 1e6:.2f}M SOPs" if COST in row.last else ""
    moved = f", v_th -> {row.last['v_th_mean']:.2f}" if "v_th_mean" in row.last else ""
    return f"{row.value:.2f}{spread}{cost}{moved}"


def format_pairs(found: Sequence[Pair], sweep: Sweep) -> str:
    """The comparison as a text table: setting, fixed, learned, gain."""
    metric = sweep.metrics[0]
    name = switch(sweep)
    head = ["  ".join(f"{k}={short_value(v)}" for k, v in p.setting.items()) for p in found]
    width = max([len("setting"), *map(len, head)])
    lines = [f"{'setting':<{width}}  {'fixed (' + name + ' false)':<32}  {'learned (true)':<48}  gain"]
    for label, pair in zip(head, found):
        gain = pair.gain()
        shown = "" if gain is None else f"{gain:+.2f}"
        lines.append(f"{label:<{width}}  {_cell(pair.fixed, metric):<32}  {_cell(pair.learned, metric):<48}  {shown}")
    return "\n".join(lines)


def plot_pairs(found: Sequence[Pair], sweep: Sweep, path: Path) -> Path | None:
    """The two populations' landscapes side by side, on one colour scale, each point labelled with its value."""
    name = switch(sweep)
    axes = _axes_params(sweep, without=name)
    scored = [r.value for p in found for r in (p.fixed, p.learned) if r is not None and r.value is not None]
    if not found or not scored or not axes:
        return None
    plt = _pyplot()
    fig, panels = plt.subplots(1, 2, figsize=(12, 5), sharex=True, sharey=True)
    lo, hi = min(scored), max(scored)
    for ax, side, title in zip(panels, ("fixed", "learned"), (f"{name}: false (fixed)", f"{name}: true (learned)")):
        points = [(p.setting, getattr(p, side)) for p in found]
        points = [(s, r) for s, r in points if r is not None and r.value is not None]
        xs = [_coord(axes[0][1], s[axes[0][0]]) for s, _ in points]
        ys = [_coord(axes[1][1], s[axes[1][0]]) if len(axes) > 1 else r.value for s, r in points]
        sc = ax.scatter(xs, ys, c=[r.value for _, r in points], cmap="viridis", vmin=lo, vmax=hi, s=260,
                        edgecolors="k", linewidths=0.5)  # fmt: skip
        for x, y, (_, r) in zip(xs, ys, points):
            ax.annotate(f"{r.value:.1f}", (x, y), textcoords="offset points", xytext=(0, 11), ha="center", fontsize=8)
        _landscape_axes(ax, axes, sweep)
        for (_, param), limits in zip(axes, (ax.set_xlim, ax.set_ylim)):
            if param.type == "choice":  # room around the first and last value
                limits(-0.5, len(param.values) - 0.5)
        ax.set_title(title)
    fig.colorbar(sc, ax=list(panels), label=f"best {sweep.metrics[0]}")
    fig.suptitle(f"Sweep {sweep.name}: fixed against learned neurons, by initial {' and '.join(n for n, _ in axes)}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
