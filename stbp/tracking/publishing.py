"""What a training run publishes to its tracker (an MLflow run, or nothing): every epoch's metrics, firing-rate table,
learned-neuron table and checkpoints; at the end the test metrics, the summary, the firing-rate and learned-neuron
charts and the run's status; and best.pt in the Model Registry when asked. Training calls it on the primary rank
only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.learned import neuron_chart, neuron_table
from ..core.monitor import SPIKE_COST, firing_rate_chart, rate_table

__all__ = ["Publisher"]


def _epoch_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """An epoch's metrics as logged: per-layer rates go to a table (as metrics they would be charted ahead of the
    accuracy); the accuracy first, since MLflow's compare page charts the first metric a run logged."""
    ordered = {k: metrics[k] for k in ("val_acc", "val_loss", *SPIKE_COST) if k in metrics}
    return {**ordered, **{k: v for k, v in metrics.items() if "/" not in k}}


class Publisher:
    """Publishes a run whose files are in ``out`` and checkpoints in ``ckpts`` (a
    :class:`stbp.train.checkpoint.CheckpointDir`: its ``last`` and ``best`` paths) to ``tracker``
    (:class:`stbp.tracking.Tracker` or :class:`~stbp.tracking.NullTracker`)."""

    def __init__(self, tracker, out: Path, ckpts):
        self.tracker, self.out, self.ckpts = tracker, out, ckpts

    def caught_up(self, history: list[dict]) -> Publisher:
        """This publisher, once the epochs of a resumed run's ``history`` that its MLflow run lacks are logged: a
        run stopped after saving an epoch's checkpoint but before logging that epoch resumes after it."""
        logged = self.tracker.logged_steps("val_acc")
        for epoch, metrics in enumerate(history, 1):
            if logged is not None and epoch not in logged:
                self.tracker.log_metrics(_epoch_metrics(metrics), step=epoch)
        return self

    def epoch(self, epoch: int, metrics: dict[str, float], history: list[dict], is_best: bool) -> None:
        """Epoch ``epoch``'s metrics (logged at that step; the run's ``history`` so far for the rate table),
        last.pt and a new best.pt."""
        self.tracker.log_metrics(_epoch_metrics(metrics), step=epoch)
        for table in (
            rate_table(history, self.out / "firing_rates.csv"),
            neuron_table(history, self.out / "neurons.csv"),
        ):
            if table is not None:
                self.tracker.log_artifact(table)
        self.tracker.log_artifact(self.ckpts.last, "checkpoints")
        if is_best:
            self.tracker.log_artifact(self.ckpts.best, "checkpoints")

    def register(self, name: str, run_id: str | None, model, cfg) -> dict[str, Any] | None:
        """``model`` (best.pt's, trained with ``cfg``) in the MLflow Model Registry as a new version of ``name``
        (None without MLflow)."""
        if getattr(self.tracker, "uri", None) is None:
            return None
        from .registry import register_model

        return register_model(model, cfg, self.tracker.uri, run_id, name)

    def finish(
        self, step: int, test: dict[str, float], rates: dict[str, float], summary: Path, history: list[dict]
    ) -> None:
        """The test metrics (as of ``step``), the ``summary`` file, the firing-rate chart and the learned neurons'
        chart (from the run's ``history``); the run FINISHED."""
        self.tracker.log_metrics(
            {
                f"test_{k}" if k in SPIKE_COST else k: test[k]
                for k in ("test_acc", "test_loss", *SPIKE_COST)
                if k in test
            },
            step=step,
        )
        self.tracker.log_artifact(summary)
        charts = (
            firing_rate_chart(rates, self.out / "firing_rates.png"),
            neuron_chart(history, self.out / "neurons.png"),
        )
        for chart in charts:
            if chart is not None:
                self.tracker.log_artifact(chart)
        self.tracker.finish("FINISHED")

    def stopped(self) -> None:
        """The run stopped on request to be resumed (:class:`~stbp.train.Preempted`): a run this process opened is
        marked KILLED until the resume reopens it."""
        if self.tracker.run_id and getattr(self.tracker, "owns_run", False):
            self.tracker.set_tags({"preempted": "true"})
            self.tracker.finish("KILLED")

    def failed(self) -> None:
        """The run ended with an error: a run this process opened is marked FAILED (a --resume reopens it)."""
        if self.tracker.run_id and getattr(self.tracker, "owns_run", False):
            self.tracker.finish("FAILED")
