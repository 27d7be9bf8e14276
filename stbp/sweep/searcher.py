"""The searcher: Optuna under Ray Tune, every sampled point numbered and trained ``search.repeats`` times.

:class:`PointSearcher` is Ray Tune's ``Repeater`` with three changes: it numbers the points (``__point__``, for
the runs' names and the runs table's grouping), it averages every metric of a multi-objective searcher (Ray's
averages one), and it saves its groups with the searcher's state, so that a resumed sweep finishes the
replicates of a point it had started and goes on numbering.
"""

from __future__ import annotations

import os
import pickle
import tempfile

import numpy as np
from ray.tune.search import ConcurrencyLimiter, Repeater

from .spec import Sweep
from .trial import POINT_KEY

__all__ = ["PointSearcher", "make_searcher"]


class PointSearcher(Repeater):
    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config[POINT_KEY] = len(self._groups)  # 1, 2, ...: this trial's group
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs) -> None:
        metrics = self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
        group = self._trial_id_to_group.get(trial_id)
        if group is None:  # not one of ours (e.g. restored without state): nothing to average
            return
        group.report(trial_id, tuple(float((result or {}).get(m, np.nan)) for m in metrics))
        if group.finished_reporting():
            means = np.nanmean(np.array(group.scores(), dtype=float), axis=0)  # all-NaN: NaN, a failed point
            values = dict(zip(metrics, (float(m) for m in means)))
            self.searcher.on_trial_complete(group.primary_trial_id, result=values, **kwargs)

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            inner = os.path.join(tmp, "searcher.pkl")
            self.searcher.save(inner)
            with open(inner, "rb") as f:
                state = {"searcher": f.read(), "points": self.get_state()}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)  # noqa: S301 - written by save() above, in the sweep's own directory
        with tempfile.TemporaryDirectory() as tmp:
            inner = os.path.join(tmp, "searcher.pkl")
            with open(inner, "wb") as f:
                f.write(state["searcher"])
            self.searcher.restore(inner)
        self.set_state(state["points"])


def make_searcher(sweep: Sweep) -> ConcurrencyLimiter:
    """Optuna's sampler (its points to evaluate first), each point repeated, at most ``max_concurrent`` trials
    at once."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Tune reports the trials already
    s = sweep.search
    sampler_cls = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
        "grid": optuna.samplers.RandomSampler,  # never asked: the grid is the points to evaluate (Sweep._first_points)
    }[s.sampler]
    searcher = OptunaSearch(  # with several metrics, Optuna's study has one direction per metric
        space={name: p.distribution() for name, p in sweep.space.items()},
        metric=list(sweep.metrics) if sweep.multi_objective else sweep.metric,
        mode=list(sweep.modes) if sweep.multi_objective else sweep.mode,
        points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None,
        sampler=sampler_cls(seed=s.seed),
    )
    return ConcurrencyLimiter(PointSearcher(searcher, repeat=s.repeats), max_concurrent=s.max_concurrent)
