"""What a sweep's trials say: where the network works (the region within a fraction of the best), the derived
coordinate ``aa / v_th``, and the Pareto front of a multi-objective sweep. Pure functions of the trial rows.

Why ``aa / v_th``: tdBN normalises a layer's pre-activations to a standard deviation of ``alpha * v_th``, so in the
normalised layers a neuron's membrane potential scales with ``v_th`` and only the surrogate's width relative to
the threshold should matter. The spiking FC layer has no tdBN and breaks that symmetry: the sweep measures how much.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..core.spec import REFERENCE as REFERENCE_NEURON
from .record import TrialRow
from .spec import Sweep

__all__ = ["REFERENCE", "derived", "coordinates", "is_number", "working_region", "pareto_front", "is_reference"]

#: The reference implementation's setting (the searched part of :data:`stbp.core.spec.REFERENCE`), marked on the
#: plots, and how they name it.
REFERENCE = {"v_th": REFERENCE_NEURON.v_th, "aa": REFERENCE_NEURON.aa}
REFERENCE_LABEL = f"reference setting (v_th {REFERENCE['v_th']:g}, aa {REFERENCE['aa']:g})"
RATIO = "aa/v_th"


def derived(params: dict[str, Any]) -> dict[str, float]:
    """Coordinates computed from the searched values: ``aa/v_th`` when both are numbers."""
    aa, v_th = params.get("aa"), params.get("v_th")
    if isinstance(aa, (int, float)) and isinstance(v_th, (int, float)) and v_th > 0:
        return {RATIO: aa / v_th}
    return {}


def coordinates(row: TrialRow) -> dict[str, Any]:
    """A trial's searched values and its derived coordinates."""
    return {**row.params, **derived(row.params)}


def _scored(rows: Sequence[TrialRow]) -> list[TrialRow]:
    return [r for r in rows if r.value is not None and math.isfinite(r.value) and None not in r.params.values()]


def is_number(v: Any) -> bool:
    """A number on an axis: an int or float, not a bool (a choice of switches is not a range)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def working_region(rows: Sequence[TrialRow], sweep: Sweep, fraction: float = 0.9) -> dict[str, Any] | None:
    """The trials whose best (first) metric is within ``fraction`` of the best trial's (for ``max``: at least
    ``fraction x best``; for ``min``: at most ``best / fraction``), and the range of every coordinate among them:
    ``{"threshold", "best", "trials", "of", "ranges": {name: (low, high)}, "outside": [...]}``."""
    scored = _scored(rows)
    if not scored:
        return None
    maximise = sweep.modes[0] == "max"
    best = (max if maximise else min)(r.value for r in scored)
    threshold = fraction * best if maximise else best / fraction
    inside = [r for r in scored if (r.value >= threshold if maximise else r.value <= threshold)]
    names = list(coordinates(inside[0]))
    ranges = {}
    for name in names:
        values = [coordinates(r)[name] for r in inside]
        if all(is_number(v) for v in values):
            ranges[name] = (min(values), max(values))
        else:
            ranges[name] = tuple(dict.fromkeys(values))  # the choices that work
    return {
        "metric": sweep.metrics[0],
        "fraction": fraction,
        "best": best,
        "threshold": threshold,
        "trials": len(inside),
        "of": len(scored),
        "ranges": ranges,
        "outside": [r.trial_id for r in scored if r not in inside],
    }


def pareto_front(rows: Sequence[TrialRow], metrics: Sequence[str], modes: Sequence[str]) -> list[TrialRow]:
    """The trials no other trial dominates (at least as good in every metric, better in one), each metric read
    at the trial's last epoch; trials missing a metric are left out. Ordered by the first metric, best first."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    scored = [r for r in rows if all(m in r.last and math.isfinite(r.last[m]) for m in metrics)]
    points = {r.trial_id: [s * r.last[m] for s, m in zip(signs, metrics)] for r in scored}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    front = [r for r in scored if not any(dominates(points[o.trial_id], points[r.trial_id]) for o in scored)]
    return sorted(front, key=lambda r: -points[r.trial_id][0])


def is_reference(row: TrialRow) -> bool:
    """The trial ran at the reference setting (:data:`REFERENCE`)."""
    return all(
        isinstance(row.params.get(k), (int, float)) and abs(row.params[k] - v) < 1e-9 for k, v in REFERENCE.items()
    )
