"""Spiking ResNet-19 (tdBN paper, Zheng et al. 2021, table 5) built from :class:`LIF` and :class:`TdBN`.

The neuron's road: one :class:`~stbp.core.spec.NeuronSpec` (``neuron``, the reference one by default) is given to
:func:`resnet19` (or its fields one by one, as overrides), then to :class:`SpikingResNet`, every
:class:`BasicBlock` and every ``LIF(neuron, channels)``. Each tdBN is normalised to the threshold of the LIF it
drives, read from that LIF (``lif.threshold()``) at every forward: the fixed ``v_th``, or the learned one.

Shapes: images ``[N, C, H, W]`` are repeated over ``T`` time steps (direct encoding); event frames
``[N, T, C, H, W]`` bring a new input at every step. Every convolution and tdBN sees ``[T*N, C, H, W]`` with time
folded into the batch; each LIF unfolds it to ``[T, N, ...]`` by a view.
The logits ``[N, num_classes]`` are the mean over time of the last linear layer (``readout="mean"``), or
the firing rate of a spiking output layer (``readout="spikes"``, the reference's behaviour, whose logits at T=2
can only be 0, 0.5 or 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .conv import SpikeConv2d
from .neuron import LIF
from .spec import FIELDS, REFERENCE, NeuronSpec
from .tdbn import RESIDUAL_ALPHA, TdBN

__all__ = ["BasicBlock", "SpikingResNet", "channels_last", "resnet19"]


def channels_last(x: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` in the channels-last layout of the model's weights; event frames ``[N, T, C, H, W]``
    as they are (the model lays them out once it has folded time into the batch)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _spike_conv3x3(cin: int, cout: int, stride: int = 1) -> SpikeConv2d:
    return SpikeConv2d(cin, cout, 3, stride=stride, padding=1)


class BasicBlock(nn.Module):
    """conv3x3-tdBN-LIF-conv3x3-tdBN(alpha=1/sqrt2) + shortcut, then LIF.

    The shortcut is the identity, or a 1x1 conv + tdBN(alpha=1/sqrt2) when the shape changes. Every
    convolution here sees spikes, so each is a :class:`SpikeConv2d` (its input saved as bool for backward).
    """

    def __init__(self, cin: int, cout: int, stride: int, timesteps: int, neuron: NeuronSpec):
        super().__init__()
        self.timesteps = timesteps
        self.conv1 = _spike_conv3x3(cin, cout, stride)
        self.bn1 = TdBN(cout)
        self.lif1 = LIF(neuron, channels=cout)
        self.conv2 = _spike_conv3x3(cout, cout)
        self.bn2 = TdBN(cout, alpha=RESIDUAL_ALPHA)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                SpikeConv2d(cin, cout, 1, stride=stride),
                TdBN(cout, alpha=RESIDUAL_ALPHA),
            )
        self.lif2 = LIF(neuron, channels=cout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, rates: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``[T*N, C, H, W]`` spikes (and their bool ``mask`` from the LIF that fired them, if it kept one) ->
        ``[T*N, C', H', W']`` spikes and their mask. The masks let each convolution save the LIF's own bool copy
        of its input rather than a second one. ``rates``: a list the two LIF layers' mean firing rates are added to
        (differentiable, on the device)."""
        out, out_mask = self.lif1.forward_folded(
            self.bn1(self.conv1(x, mask), self.lif1.threshold()), self.timesteps, return_mask=True
        )
        if rates is not None:
            rates.append(out.mean(dtype=torch.float32))
        v_th = self.lif2.threshold()  # the sum of both branches drives lif2
        out = self.bn2(self.conv2(out, out_mask), v_th)
        if isinstance(self.shortcut, nn.Identity):
            out = out + x
        else:
            conv, bn = self.shortcut
            out = out + bn(conv(x, mask), v_th)
        out, out_mask = self.lif2.forward_folded(out, self.timesteps, return_mask=True)
        if rates is not None:
            rates.append(out.mean(dtype=torch.float32))
        return out, out_mask


class SpikingResNet(nn.Module):
    """Stem conv, three stages of :class:`BasicBlock`, global average pool, FC-LIF, FC; every spiking layer is a
    ``LIF(neuron, channels)``."""

    def __init__(
        self,
        stages: tuple[tuple[int, int, int], ...] = ((128, 3, 1), (256, 3, 2), (512, 2, 2)),
        stem_channels: int = 128,
        hidden: int = 256,
        num_classes: int = 10,
        in_channels: int = 1,
        timesteps: int = 2,
        neuron: NeuronSpec = REFERENCE,
        readout: str = "mean",
    ):
        super().__init__()
        if readout not in ("mean", "spikes"):
            raise ValueError(f"readout must be 'mean' or 'spikes', got {readout!r}")
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if not isinstance(neuron, NeuronSpec):
            raise TypeError(f"neuron must be a NeuronSpec, got {neuron!r}")
        self.timesteps = timesteps
        self.readout = readout
        self.conv1 = _conv3x3(in_channels, stem_channels)
        self.bn1 = TdBN(stem_channels)
        self.lif1 = LIF(neuron, channels=stem_channels)
        cin = stem_channels
        self.stages = nn.ModuleList()
        for cout, blocks, stride in stages:
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, timesteps, neuron))
                cin = cout
            self.stages.append(nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(cin, hidden)
        self.lif_fc1 = LIF(neuron, channels=hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.lif_out = LIF(neuron, channels=num_classes) if readout == "spikes" else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # fc1 sees pooled firing rates (mean ~0.1-0.2) with no normalisation before its LIF. With torch's default
        # Linear init its drive stays far below v_th and the layer starts silent, starving the readout; a
        # Kaiming (fan-in) init puts the drive on the threshold's scale so it fires from the first step.
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        nn.init.zeros_(self.fc1.bias)

    def dense_fan_outs(self) -> dict[str, int]:
        """The spiking layers that feed linear layers, by module path, and the synapses each of their spikes
        reaches: the last block's spikes reach every fc1 unit through the average pool, lif_fc1's every output.
        (The convolutions' synaptic operations are counted where they happen: :mod:`stbp.core.monitor`.)"""
        last = self.stages[-1][-1].lif2
        name = next(n for n, m in self.named_modules() if m is last)
        return {name: self.fc1.out_features, "lif_fc1": self.fc2.out_features}

    def forward(self, images: Tensor, per_step: bool = False, rates: bool = False):
        """Images ``[N, C, H, W]`` or event frames ``[N, T, C, H, W]`` -> ``[N, num_classes]``, the time-mean output;
        ``per_step``: ``[T, N, num_classes]``, the output at every time step (what TET's loss reads). ``rates``:
        ``(output, rates)``, with the mean firing rate of every spiking layer ``[L]`` (differentiable, fp32: what a
        firing-rate penalty reads)."""
        steps, n = self.timesteps, images.shape[0]
        seen: list[Tensor] | None = [] if rates else None
        x = self._stem(images)
        x, mask = self.lif1.forward_folded(self.bn1(x, self.lif1.threshold()), steps, return_mask=True)
        if seen is not None:
            seen.append(x.mean(dtype=torch.float32))
        for stage in self.stages:
            for block in stage:
                x, mask = block(x, mask, seen)
        x = self.pool(x).flatten(1)  # [T*N, C]
        x = self.lif_fc1.forward_folded(self.fc1(x), steps)
        if seen is not None:
            seen.append(x.mean(dtype=torch.float32))
        x = self.fc2(x).view(steps, n, -1)  # [T, N, classes]
        if self.lif_out is not None:
            x = self.lif_out(x)
            if seen is not None:
                seen.append(x.mean(dtype=torch.float32))
        x = x if per_step else x.mean(0)
        return (x, torch.stack(seen)) if rates else x

    def _stem(self, images: Tensor) -> Tensor:
        """The stem convolution's output at every step, ``[T*N, C, H, W]`` (time-major, as the LIFs unfold it)."""
        steps = self.timesteps
        if images.dim() == 5:
            if images.shape[1] != steps:
                raise ValueError(
                    f"event frames [N, T, C, H, W] need T = timesteps = {steps}, got {tuple(images.shape)}"
                )
            # A new frame at every step: the stem convolves each one ([N, T, ...] -> [T*N, ...]).
            return self.conv1(channels_last(images.transpose(0, 1).flatten(0, 1)))
        # Direct encoding: the stem sees the same image at every step, so convolve it once and repeat the result
        # over time ([N, ...] -> [T*N, ...]); the gradient of the repeat sums over time, as it should.
        x = self.conv1(images)
        return x.unsqueeze(0).expand(steps, *x.shape).flatten(0, 1)


def resnet19(
    width: float = 1.0, *, neuron: NeuronSpec | Mapping[str, Any] | None = None, **options: Any
) -> SpikingResNet:
    """Spiking ResNet-19: conv3x3,128; [3x3,128]x2 x3; [3x3,256]x2 x3 (stride 2); [3x3,512]x2 x2 (stride 2);
    global average pool; FC ``hidden`` (256) -> LIF; FC ``num_classes``. ``width`` scales every convolution's
    channel count. The spiking FC layer keeps its 256 units at any width: at T=2 it is a 2-step binary code, and
    narrowed with the convolutions (32 units at width 0.125) it became the bottleneck of narrow CPU models (a
    side-by-side run trained markedly worse).

    ``neuron``: the :class:`~stbp.core.spec.NeuronSpec` of every spiking layer (the reference one when None), or
    its fields as a mapping (how a checkpoint stores it). ``options``: :class:`SpikingResNet`'s own keywords
    (``timesteps``, ``readout``, ``in_channels``, ``num_classes``, ``hidden``) and, for convenience, NeuronSpec
    fields that override ``neuron``'s (``resnet19(width=0.0625, learn_v_th=True)``).

    With ``in_channels=3`` and ``width=1`` it has 12,697,994 parameters.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    neuron = REFERENCE if neuron is None else NeuronSpec(**neuron) if isinstance(neuron, Mapping) else neuron
    if not isinstance(neuron, NeuronSpec):
        raise TypeError(f"neuron must be a NeuronSpec or a mapping of its fields, got {neuron!r}")
    neuron = neuron.with_fields(**{name: options.pop(name) for name in FIELDS if name in options})
    ch = lambda c: max(1, round(c * width))
    stages = ((ch(128), 3, 1), (ch(256), 3, 2), (ch(512), 2, 2))
    return SpikingResNet(stages=stages, stem_channels=ch(128), neuron=neuron, **options)
