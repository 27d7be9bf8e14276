"""Training: the loop that both front doors call (:mod:`.loop`), the recipe (:mod:`.recipe`: optimiser, schedule,
precision, EMA), checkpoints and resuming (:mod:`.checkpoint`), evaluation (:mod:`.evaluate`), the process group
(:mod:`.distributed`) and what a run shows while it trains (:mod:`.progress`)."""

from .loop import Callback, EarlyStopping, Preempted, TrainingDiverged, model_kwargs, tet_loss, train, train_step

__all__ = [
    "train",
    "train_step",
    "tet_loss",
    "EarlyStopping",
    "TrainingDiverged",
    "Preempted",
    "Callback",
    "model_kwargs",
]
