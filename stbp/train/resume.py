"""What a run carries from one epoch (or one mid-epoch stop) to the next, and how it continues from a checkpoint:
:class:`RunState` (epochs and steps done, history, best accuracy, early stopping, the MLflow run), the checkpoint
dict that saves it with the weights, optimiser and RNG states (:func:`checkpoint_state`), and the way back
(:func:`resume_state` finds and vets a checkpoint, :func:`restore` loads it). The file format is
:mod:`.checkpoint`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import BOOKKEEPING_FIELDS, Config, config_to_dict
from .checkpoint import CheckpointDir, CheckpointError, model_config_fields, model_kwargs, read_checkpoint

__all__ = [
    "CONTINUABLE",
    "EarlyStopping",
    "Preempted",
    "RunState",
    "checkpoint_state",
    "experiment_changes",
    "restore",
    "resume_state",
]

#: What continuing a run may change, since it stays the same experiment: how long it trains and stops, how it
#: runs and logs, where it records. A change of any other field (the model, loss, data, optimiser, seed) makes
#: another experiment, which a resume refuses rather than hide under the old run's name.
CONTINUABLE = (*BOOKKEEPING_FIELDS, "epochs", "patience", "log_interval", "eval_batch_size", "test_size", "amp")
CONTINUABLE += ("compile", "device", "fast_lif", "download", "firing_rates")


class Preempted(RuntimeError):
    """Training saw ``run.stop_file`` appear, saved last.pt mid-epoch (``epoch`` epochs and ``step`` steps done) and
    stopped: the same command resumes it exactly (what a SLURM job does on its warning signal, slurm/)."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.epoch, self.step = epoch, step

    def __reduce__(self):
        return (type(self), (str(self), self.epoch, self.step))


class EarlyStopping:
    """Stop after ``patience`` epochs in a row without a lower validation loss (``patience=0``: never)."""

    def __init__(self, patience: int):
        self.patience, self.best_val_loss, self.bad_epochs = patience, math.inf, 0

    def update(self, val_loss: float) -> None:
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "bad_epochs": self.bad_epochs, "patience": self.patience}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val_loss, self.bad_epochs = float(state["best_val_loss"]), int(state["bad_epochs"])


@dataclass
class RunState:
    """Where a run stands: ``start_epoch`` epochs done (and ``start_step`` steps into the next, with ``partial``, the
    sums of those steps over all ranks: loss x images, correct, images), one metrics dict per epoch done."""

    stopping: EarlyStopping
    start_epoch: int = 0
    start_step: int = 0
    partial: tuple[float, int, int] | None = None
    best_val_acc: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None


def experiment_changes(stored: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{section.field: (stored, now)}`` for each field that a run's stored config (nested, as in a checkpoint)
    and ``cfg`` set differently and that :data:`CONTINUABLE` does not allow."""
    now = config_to_dict(cfg)
    return {
        f"{section}.{name}": (before, now[section][name])
        for section, fields in stored.items()
        if isinstance(fields, dict) and isinstance(now.get(section), dict)
        for name, before in fields.items()
        if name not in CONTINUABLE and name in now[section] and now[section][name] != before
    }


def resume_state(cfg: Config, ckpts: CheckpointDir) -> dict | None:
    """The checkpoint ``cfg.run.resume`` asks to continue from (None: start afresh), refused with a
    :class:`CheckpointError` when it is another experiment."""
    resume = cfg.run.resume
    if resume == "never":
        return None
    found = ckpts.load_latest() if resume == "auto" else (read_checkpoint(resume), resume)
    if found is None:
        return None
    state, path = found
    stored = state.get("config") or {"model": model_config_fields(state.get("model_kwargs", {}))}
    stored = {**stored, "model": {"arch": "resnet19", **stored.get("model", {})}}  # written before arch: ResNet-19
    changed = experiment_changes(stored, cfg)
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: that run is another experiment ("
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + "). Train the new setting in a new directory (--output_dir NEW), or start this one over "
            "(--resume never); more epochs, patience and logging may change on a resume"
        )
    return state


def restore(state: dict, model: nn.Module, ema, optimizer: torch.optim.Optimizer, run: RunState, device) -> None:
    """Load checkpoint ``state`` into the model (and its ``ema``), the optimiser, ``run`` and the RNGs."""
    model.load_state_dict(state.get("train_model", state["model"]))
    if ema is not None:  # "model" holds the EMA's weights when the checkpoint was trained with one
        ema.load_state_dict({"module": state["model"], "updates": state.get("ema_updates", 0)})
    optimizer.load_state_dict(state["optimizer"])
    run.start_epoch = int(state["epoch"])
    run.start_step, run.partial = int(state.get("step", 0)), state.get("partial")
    run.stopping.load_state_dict(state["early_stopping"])
    run.best_val_acc = float(state["best_val_acc"])
    run.history = list(state["metrics"])
    run.mlflow_run_id = run.mlflow_run_id or state.get("mlflow_run_id")
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def checkpoint_state(
    cfg: Config, run: RunState, model: nn.Module, ema, optimizer, device, epoch: int, step: int = 0, partial=None
) -> dict[str, Any]:
    """The checkpoint of a run ``epoch`` epochs (and ``step`` steps, with the epoch's ``partial`` sums) in."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "model_kwargs": model_kwargs(cfg),
        "model": (model if ema is None else ema.module).state_dict(),  # what evaluation scores: best.pt's model
        **({"train_model": model.state_dict(), "ema_updates": ema.updates} if ema else {}),
        "config": config_to_dict(cfg),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        **({"step": step, "partial": list(partial)} if step else {}),
        "early_stopping": run.stopping.state_dict(),
        "best_val_acc": run.best_val_acc,
        "metrics": run.history,
        "rng": rng,
        "mlflow_run_id": run.mlflow_run_id,
    }
