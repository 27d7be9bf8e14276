"""One optimisation step and what it adds up: :func:`train_step` (a pure function of the model, the optimiser and a
batch, with no host sync), its loss options (:class:`LossOptions`), and an epoch's running sums on the device
(:class:`EpochSums`), whose one host sync is at the log interval."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PLAIN", "LossOptions", "EpochSums", "TrainingDiverged", "check_divergence", "tet_loss", "train_step"]


@dataclass(frozen=True)
class LossOptions:
    """What the training loss is made of, beyond the cross-entropy of the time-mean output."""

    tet: bool = False
    """TET (Deng et al. 2022): the cross-entropy of every time step's output (:func:`tet_loss`)."""
    tet_lambda: float = 1e-3
    """TET: weight of the regulariser that pulls every step's output towards ``tet_phi``."""
    tet_phi: float = 1.0
    """TET: the regulariser's target."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (either loss)."""
    rate_weight: float = 0.0
    """Firing-rate penalty ``rate_weight * sum_l (rate_l - rate_target)^2`` over the spiking layers (0: off)."""
    rate_target: float = 0.1
    """The penalty's target mean rate."""

    @classmethod
    def of(cls, cfg) -> LossOptions:
        """The options a config's ``optim`` section sets."""
        o = cfg.optim
        return cls(o.loss == "tet", o.tet_lambda, o.tet_phi, o.label_smoothing, o.rate_weight, o.rate_target)


PLAIN = LossOptions()  #: the plain cross-entropy of the time-mean output


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite at ``epoch`` (1-based), ``step`` (1-based, within the epoch), ``lr``."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0, lr: float = float("nan")):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr

    def __reduce__(self):  # picklable with its fields: Ray sends it from a DDP rank to the trial
        return (type(self), (str(self), self.epoch, self.step, self.lr))


def tet_loss(outputs: Tensor, labels: Tensor, lamb: float, phi: float, label_smoothing: float = 0.0) -> Tensor:
    """TET's loss (Deng et al. 2022, eq. 8-10) of per-step outputs ``[T, N, C]``: the cross-entropy of every time
    step's output, averaged over steps, weighted ``1 - lamb``, plus ``lamb`` x the mean squared distance of the
    outputs from ``phi`` (the regulariser that keeps them from growing without bound)."""
    ce = F.cross_entropy(outputs.flatten(0, 1), labels.repeat(outputs.shape[0]), label_smoothing=label_smoothing)
    return (1 - lamb) * ce + lamb * F.mse_loss(outputs, torch.full_like(outputs, phi))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    amp: torch.dtype | None = None,
    grad_clip: float | None = None,
    loss: LossOptions = PLAIN,
) -> tuple[Tensor, Tensor]:
    """One optimisation step: forward (under ``amp`` autocast when given), the loss in fp32 as ``loss`` says,
    backward, optional gradient-norm clipping, optimizer step. Returns the detached loss and time-mean logits;
    no host sync."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        options = {"per_step": True} if loss.tet else {}  # (only what is used: the benchmarks' other models)
        outputs = model(x, **options, **({"rates": True} if loss.rate_weight else {}))
        if loss.rate_weight:
            outputs, rates = outputs
        outputs = outputs.float()
        if loss.tet:
            value = tet_loss(outputs, y, loss.tet_lambda, loss.tet_phi, label_smoothing=loss.label_smoothing)
            logits = outputs.mean(0)
        else:
            logits = outputs
            value = F.cross_entropy(logits, y, label_smoothing=loss.label_smoothing)
        if loss.rate_weight:
            value = value + loss.rate_weight * (rates - loss.rate_target).square().sum()
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value.detach(), logits.detach()


class EpochSums:
    """An epoch's running training sums on the device (loss x images, correct, images) and the first step whose loss
    was not finite: updated every step without a host sync, read at the log interval and the epoch's end."""

    def __init__(self, device: torch.device, loss: float = 0.0, correct: int = 0, seen: int = 0):
        self.loss = torch.tensor(float(loss), device=device, dtype=torch.float64)
        self.correct = torch.tensor(int(correct), device=device, dtype=torch.int64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.seen = int(seen)  # on the host: the batch sizes are known there

    def add(self, step: int, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.loss += loss.double() * y.shape[0]
        self.correct += (logits.argmax(1) == y).sum()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.seen += y.shape[0]

    def stacked(self) -> Tensor:
        """``[loss x images, correct, images]`` as one float64 tensor (what an all-reduce sums over ranks)."""
        return torch.stack([self.loss, self.correct.double(), self.loss.new_tensor(float(self.seen))])

    def mean_loss(self) -> float:
        """The mean loss so far on this rank (a host sync)."""
        return self.loss.item() / max(self.seen, 1)


def check_divergence(first_bad: Tensor, epoch: int, lr: float, world_size: int = 1) -> None:
    """Raise :class:`TrainingDiverged` if any rank saw a non-finite loss (``first_bad``: its first such step, or -1)
    in epoch ``epoch`` (0-based); every rank raises together. A host sync: at the log interval only."""
    bad = first_bad.clone()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    step = int(bad)
    if step >= 0:
        raise TrainingDiverged(
            f"loss became NaN/Inf at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); "
            "lower --lr, set --grad_clip, or check v_th/aa",
            epoch=epoch + 1,
            step=step + 1,
            lr=lr,
        )
