"""Experiment tracking in MLflow, for rank 0: one run written through ``MlflowClient`` (:mod:`.runs`), what a
training run publishes to it each epoch and at the end (:mod:`.publishing`), and the Model Registry
(:mod:`.registry`). MLflow is imported only when a run is opened: the core and training load without it."""

from .runs import (
    NullTracker,
    Tracker,
    TrackingError,
    check_tracking_uri,
    default_tracking_uri,
    experiment_id,
    git_commit,
    make_tracker,
    open_training_run,
    resolve_tracking_uri,
)

__all__ = [
    "TrackingError",
    "default_tracking_uri",
    "resolve_tracking_uri",
    "check_tracking_uri",
    "experiment_id",
    "Tracker",
    "NullTracker",
    "make_tracker",
    "open_training_run",
    "git_commit",
]
