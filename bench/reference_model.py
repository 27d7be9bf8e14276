"""ResNet-19 structured the way the original STBP-tdBN code ran it, to time our restructuring against.

What is reproduced (the structure, which is what costs time and memory):

- time kept last: every activation is ``[N, C, H, W, T]`` (``[N, F, T]`` after pooling);
- a Python loop over time steps inside every layer (the original ``tdLayer``): each conv / linear / pool is
  applied to ``x[..., t]`` and written into a preallocated time-last buffer;
- tdBN computing mean and variance over the whole ``[N, C, H, W, T]`` tensor with explicit tensor ops;
- the LIF layer looping over time with one ``autograd.Function`` per step (saving its fp32 input), reading the
  previous step's spikes back from the output buffer, as ``state_update`` did;
- the input image repeated over time and the stem convolution run at every step.

What is not: the original kept ``steps``/``Vth``/``aa``/``tau`` in module-level globals (here they are
attributes: same arithmetic, no global state), centred the surrogate window at 0 (here at ``v_th``, as in
``stbp``, so that the same weights give the same spikes and gradients; the cost is identical), and probed each
layer's output shape with an extra, discarded forward of step 0 (left out: it would only flatter us).
The module and parameter names mirror :func:`stbp.resnet19`, so ``load_state_dict(ours.state_dict())`` works.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ReferenceResNet19", "reference_resnet19", "SpikeAct", "LIFSpike", "TdBatchNorm", "per_step"]

RESIDUAL_ALPHA = 1 / math.sqrt(2)


class SpikeAct(torch.autograd.Function):
    """Heaviside forward, rectangular surrogate backward; saves its (full-precision) input, as the original."""

    @staticmethod
    def forward(ctx, u: Tensor, v_th: float, aa: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.v_th, ctx.aa = v_th, aa
        return torch.gt(u, v_th).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        hu = ((u - ctx.v_th).abs() < ctx.aa).to(grad.dtype) / (2 * ctx.aa)
        return grad * hu, None, None


def per_step(layer: nn.Module, x: Tensor) -> Tensor:
    """The original ``tdLayer``: ``layer`` on every time slice ``x[..., t]``, written into a time-last buffer."""
    steps = x.shape[-1]
    first = layer(x[..., 0])
    out = torch.zeros(*first.shape, steps, dtype=first.dtype, device=first.device)
    out[..., 0] = first
    for t in range(1, steps):
        out[..., t] = layer(x[..., t])
    return out


class TdBatchNorm(nn.BatchNorm2d):
    """tdBN over ``[N, C, H, W, T]`` with explicit mean/var ops (the original ``tdBatchNorm``)."""

    def __init__(self, num_features: int, v_th: float, alpha: float = 1.0):
        super().__init__(num_features)
        self.v_th, self.alpha = v_th, alpha

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1, 1, 1, 1)
        if self.training:
            mean = x.mean([0, 2, 3, 4])
            var = x.var([0, 2, 3, 4], unbiased=False)
            n = x.numel() / x.shape[1]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x = self.alpha * self.v_th * (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


class LIFSpike(nn.Module):
    """LIF over the last (time) axis: ``u = tau*u*(1-o) + x_t``, one :class:`SpikeAct` per step."""

    def __init__(self, v_th: float, aa: float, tau: float):
        super().__init__()
        self.v_th, self.aa, self.tau = v_th, aa, tau

    def forward(self, x: Tensor) -> Tensor:
        u = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        out = torch.zeros_like(x)
        for t in range(x.shape[-1]):
            u = self.tau * u * (1 - out[..., max(t - 1, 0)]) + x[..., t]
            out[..., t] = SpikeAct.apply(u, self.v_th, self.aa)
        return out


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, v_th: float, neuron: dict):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = TdBatchNorm(cout, v_th)
        self.lif1 = LIFSpike(**neuron)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = TdBatchNorm(cout, v_th, RESIDUAL_ALPHA)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), TdBatchNorm(cout, v_th, RESIDUAL_ALPHA)
            )
        self.lif2 = LIFSpike(**neuron)

    def forward(self, x: Tensor) -> Tensor:  # [N, C, H, W, T]
        out = self.lif1(self.bn1(per_step(self.conv1, x)))
        out = self.bn2(per_step(self.conv2, out))
        if len(self.shortcut):
            out = out + self.shortcut[1](per_step(self.shortcut[0], x))
        else:
            out = out + x
        return self.lif2(out)


class ReferenceResNet19(nn.Module):
    """ResNet-19 as :func:`stbp.resnet19` (same layers, same names), run time-last with per-layer time loops."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        timesteps: int = 2,
        v_th: float = 0.4,
        aa: float = 0.5,
        tau: float = 0.25,
        width: float = 1.0,
        hidden: int = 256,
    ):
        super().__init__()
        ch = lambda c: max(1, round(c * width))
        neuron = dict(v_th=v_th, aa=aa, tau=tau)
        self.timesteps = timesteps
        self.conv1 = _conv3x3(in_channels, ch(128))
        self.bn1 = TdBatchNorm(ch(128), v_th)
        self.lif1 = LIFSpike(**neuron)
        cin = ch(128)
        self.stages = nn.ModuleList()
        for cout, blocks, stride in ((ch(128), 3, 1), (ch(256), 3, 2), (ch(512), 2, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, v_th, neuron))
                cin = cout
            self.stages.append(nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(cin, hidden)
        self.lif_fc1 = LIFSpike(**neuron)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, images: Tensor) -> Tensor:  # [N, C, H, W] -> [N, num_classes]
        x = images.unsqueeze(-1).repeat(1, 1, 1, 1, self.timesteps)  # [N, C, H, W, T]
        x = self.lif1(self.bn1(per_step(self.conv1, x)))
        for stage in self.stages:
            x = stage(x)
        x = per_step(self.pool, x).flatten(1, 3)  # [N, C, 1, 1, T] -> [N, C, T]
        x = self.lif_fc1(per_step(self.fc1, x))
        return per_step(self.fc2, x).mean(-1)


def reference_resnet19(**kwargs) -> ReferenceResNet19:
    return ReferenceResNet19(**kwargs)
