"""Threshold-dependent batch normalisation (tdBN; Zheng et al. 2021, arXiv 2011.05280, eq. 5-6).

Input is time folded into the batch, ``[T*N, C, H, W]``, so the per-channel statistics run over batch, time,
height and width at once, exactly as the paper prescribes:

    x_hat = alpha * v_th * (x - mean) / sqrt(var + eps)
    y     = weight * x_hat + bias

``alpha`` is 1 for ordinary layers and 1/sqrt(2) on the two branches that meet in a residual sum, so the sum
has the same pre-activation scale as a plain layer. ``v_th`` is the threshold of the LIF layer that the output
drives, and the layer stores none: :meth:`TdBN.forward` takes it, read from that LIF (``lif.threshold()``) at
every call. A float for a fixed threshold; a learned one is a tensor (a scalar, or one per channel) and the
target follows it with its gradient: the paper's ``alpha * V_th`` with ``V_th`` a parameter.

Cross-rank synchronisation: torch's ``SyncBatchNorm`` refuses CPU tensors (and SpikingJelly's tdBN breaks under
it). ``TdBN(sync=True)`` instead all-reduces per-channel sums and counts with a differentiable all-reduce that
works under gloo (CPU) and NCCL alike, and whose backward all-reduces the gradients of the statistics, so the
input gradient is the one a single process would compute on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TdBN", "convert_sync_tdbn", "RESIDUAL_ALPHA"]

# alpha of the tdBNs whose outputs meet in a residual sum (the paper's 1/sqrt(2)).
RESIDUAL_ALPHA = 1 / math.sqrt(2)


class TdBN(nn.BatchNorm2d):
    """tdBN over time-folded input ``[T*N, C, H, W]``; a ``BatchNorm2d`` with the ``alpha * v_th`` scale, ``v_th``
    given to :meth:`forward` by the caller (the threshold of the LIF layer the output drives).

    The learnable ``weight``/``bias`` start at 1/0 as in any BatchNorm, so at initialisation the output has mean
    0 and standard deviation ``alpha * v_th`` per channel. Running statistics are ordinary buffers and eval
    mode uses them. ``sync=True`` (or :func:`convert_sync_tdbn`) synchronises the batch statistics across the
    ranks of ``process_group`` during training.
    """

    def __init__(
        self,
        num_features: int,
        *,
        alpha: float = 1.0,
        eps: float = 1e-5,
        momentum: float = 0.1,
        sync: bool = False,
        process_group=None,
    ):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.alpha = float(alpha)
        self.sync = sync
        self.process_group = process_group

    def forward(self, x: Tensor, v_th: float | Tensor) -> Tensor:
        """``x`` normalised to ``alpha * v_th``: ``v_th`` is the driven LIF's threshold, a float, or a learned
        scalar or ``[C]`` tensor."""
        if x.dim() != 4:
            raise ValueError(f"TdBN expects time-folded input [T*N, C, H, W], got shape {tuple(x.shape)}")
        weight = self.weight * (self.alpha * v_th)
        if self.training and self.sync and _world_size(self.process_group) > 1:
            return self._forward_synced(x, weight)
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as in BatchNorm (this syncs; momentum is 0.1)
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight, self.bias, self.training, momentum, self.eps
        )

    def _forward_synced(self, x: Tensor, weight: Tensor) -> Tensor:
        dims = (0, 2, 3)
        # Sums in fp32 (fp64 where available would be slower on GPU); one all-reduce for sum, sum of squares
        # and count keeps the collective count at one per layer.
        xf = x.float()
        count = torch.full((1,), x.numel() // x.shape[1], dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = _AllReduceSum.apply(stats, self.process_group)
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = var * (n / (n - 1).clamp_min(1))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        inv = torch.rsqrt(var + self.eps) * weight
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * inv.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, alpha={self.alpha:.4g}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"
        )


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks: every rank's loss depends on every rank's
    statistics, so each rank's gradient of the statistics is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _world_size(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def convert_sync_tdbn(module: nn.Module, process_group=None) -> nn.Module:
    """Switch every :class:`TdBN` in ``module`` to cross-rank statistics (in place; returns ``module``)."""
    for m in module.modules():
        if isinstance(m, TdBN):
            m.sync = True
            m.process_group = process_group
    return module
