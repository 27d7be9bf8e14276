"""Training: the loop that both front doors call (:mod:`.loop`), one optimisation step and its loss options
(:mod:`.step`), the recipe (:mod:`.recipe`: optimiser, schedule, precision, EMA), checkpoints (:mod:`.checkpoint`)
and continuing a run from one (:mod:`.resume`), evaluation (:mod:`.evaluate`), the process group
(:mod:`.distributed`) and what a run shows while it trains (:mod:`.progress`)."""

from .checkpoint import model_kwargs
from .loop import Callback, Trainer, train
from .resume import EarlyStopping, Preempted
from .step import EpochSums, LossOptions, TrainingDiverged, tet_loss, train_step

__all__ = [
    "train",
    "train_step",
    "tet_loss",
    "LossOptions",
    "EpochSums",
    "EarlyStopping",
    "TrainingDiverged",
    "Preempted",
    "Callback",
    "Trainer",
    "model_kwargs",
]
