"""The tdBN paper's spiking ResNets (Zheng et al. 2021) built from :class:`LIF` and :class:`TdBN`: ResNet-19, its
CIFAR network (table 5), and ResNet-18 and ResNet-34, its ImageNet networks (He et al. 2016's layout: a 7x7 stride-2
stem and a max pool, four stages, global average pool, one linear classifier). :func:`build_network` names them.

The neuron's road: one :class:`~stbp.core.spec.NeuronSpec` (``neuron``, the reference one by default) is given to
:func:`resnet19` (or :func:`resnet18`, :func:`resnet34`; or its fields one by one, as overrides), then to
:class:`SpikingResNet`, every :class:`BasicBlock` and every ``LIF(neuron, channels)``. Each tdBN is normalised to
the threshold of the LIF it drives, read from that LIF (``lif.threshold()``) at every forward: the fixed ``v_th``, or
the learned one.

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

__all__ = ["ARCHS", "BasicBlock", "SpikingResNet", "build_network", "channels_last", "resnet18", "resnet19", "resnet34"]


def channels_last(x: Tensor) -> Tensor:
    """Images ``[N, C, H, W]`` in the channels-last layout of the model's weights; event frames ``[N, T, C, H, W]``
    as they are (the model lays them out once it has folded time into the batch)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


#: The stems :class:`SpikingResNet` takes: their convolution's kernel and stride (padding kernel // 2).
STEMS = {"cifar": (3, 1), "imagenet": (7, 2)}


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
    """Stem, stages of :class:`BasicBlock`, global average pool, [FC-LIF,] FC; every spiking layer is a
    ``LIF(neuron, channels)``.

    ``stem``: ``"cifar"``, a 3x3 stride-1 convolution (``conv1``, then ``bn1``, ``lif1``); ``"imagenet"``, a 7x7
    stride-2 convolution and, after its LIF, a 3x3 stride-2 max pool (``maxpool``: the max of spikes is a spike, so
    the blocks still see 0s and 1s). ``stages``: ``(channels, blocks, stride)`` each. ``hidden``: the units of a
    spiking FC layer between the pool and the classifier (``fc1``, ``lif_fc1``, then the classifier ``fc2``:
    ResNet-19's head), or None for the classifier alone (``fc``: the ImageNet nets' head).
    """

    def __init__(
        self,
        stages: tuple[tuple[int, int, int], ...] = ((128, 3, 1), (256, 3, 2), (512, 2, 2)),
        stem_channels: int = 128,
        hidden: int | None = 256,
        num_classes: int = 10,
        in_channels: int = 1,
        timesteps: int = 2,
        neuron: NeuronSpec = REFERENCE,
        readout: str = "mean",
        stem: str = "cifar",
    ):
        super().__init__()
        if readout not in ("mean", "spikes"):
            raise ValueError(f"readout must be 'mean' or 'spikes', got {readout!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(map(repr, STEMS))}, got {stem!r}")
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if not isinstance(neuron, NeuronSpec):
            raise TypeError(f"neuron must be a NeuronSpec, got {neuron!r}")
        self.timesteps = timesteps
        self.readout = readout
        kernel, stride = STEMS[stem]
        self.conv1 = nn.Conv2d(in_channels, stem_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn1 = TdBN(stem_channels)
        self.lif1 = LIF(neuron, channels=stem_channels)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None
        self.stages = nn.ModuleList()
        cin = stem_channels
        for cout, blocks, stride in stages:
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, timesteps, neuron))
                cin = cout
            self.stages.append(nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._head(cin, hidden, num_classes, neuron)
        self.lif_out = LIF(neuron, channels=num_classes) if readout == "spikes" else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.fc1 is not None:
            # fc1 sees pooled firing rates (mean ~0.1-0.2) with no normalisation before its LIF. With torch's default
            # Linear init its drive stays far below v_th and the layer starts silent, starving the readout; a
            # Kaiming (fan-in) init puts the drive on the threshold's scale so it fires from the first step.
            nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
            nn.init.zeros_(self.fc1.bias)

    def _head(self, features: int, hidden: int | None, num_classes: int, neuron: NeuronSpec) -> None:
        """``fc1`` (``hidden`` units), ``lif_fc1`` and the classifier ``fc2``; without ``hidden``, the classifier
        ``fc`` alone (``fc1`` and ``lif_fc1`` None)."""
        if hidden is None:
            self.fc1 = self.lif_fc1 = None
            self.fc = nn.Linear(features, num_classes)
        else:
            self.fc1 = nn.Linear(features, hidden)
            self.lif_fc1 = LIF(neuron, channels=hidden)
            self.fc2 = nn.Linear(hidden, num_classes)

    @property
    def classifier(self) -> nn.Linear:
        """The last linear layer, whose time-mean output is the logits (``fc2`` after a spiking FC layer, else
        ``fc``)."""
        return self.fc if self.fc1 is None else self.fc2

    def dense_fan_outs(self) -> dict[str, int]:
        """The spiking layers that feed linear layers, by module path, and the synapses each of their spikes
        reaches: the last block's spikes reach every fc1 unit (or, without one, every output of fc) through the average
        pool, lif_fc1's every output.
        (The convolutions' synaptic operations are counted where they happen: :mod:`stbp.core.monitor`.)"""
        last = self.stages[-1][-1].lif2
        name = next(n for n, m in self.named_modules() if m is last)
        if self.fc1 is None:
            return {name: self.fc.out_features}
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
        if self.maxpool is not None:
            # Pooled spikes are still spikes, but the LIF's bool mask has the unpooled shape: the next convolutions
            # save their own bool copy (mask None).
            x, mask = self.maxpool(x), None
        for stage in self.stages:
            for block in stage:
                x, mask = block(x, mask, seen)
        x = self.pool(x).flatten(1)  # [T*N, C]
        if self.fc1 is not None:
            x = self.lif_fc1.forward_folded(self.fc1(x), steps)
            if seen is not None:
                seen.append(x.mean(dtype=torch.float32))
        x = self.classifier(x).view(steps, n, -1)  # [T, N, classes]
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
    fields that override ``neuron``'s (``resnet19(width=0.0625, learn_v_th=True)``); ``arch``, if given, must be
    ``"resnet19"`` (a checkpoint's keywords name it: :func:`build_network` takes the others).

    With ``in_channels=3`` and ``width=1`` it has 12,697,994 parameters.
    """
    stages = ((128, 3, 1), (256, 3, 2), (512, 2, 2))
    return _network("resnet19", width, neuron, options, stages, stem_channels=128, stem="cifar")


def resnet18(
    width: float = 1.0, *, neuron: NeuronSpec | Mapping[str, Any] | None = None, **options: Any
) -> SpikingResNet:
    """Spiking ResNet-18, the tdBN paper's ImageNet layout: conv7x7,64 stride 2 -> tdBN -> LIF; 3x3 max pool stride
    2; [3x3,64]x2 x2; [3x3,128]x2 x2 (stride 2); [3x3,256]x2 x2 (stride 2); [3x3,512]x2 x2 (stride 2); global
    average pool; FC ``num_classes``. A 224-pixel image leaves the stem at 56x56 and the last stage at 7x7.

    The ImageNet network by default (``in_channels=3``, ``num_classes=1000``: 11,689,512 parameters at ``width=1``,
    torchvision's ``resnet18`` count, tdBN's affine pair in place of BatchNorm's). ``width``, ``neuron`` and
    ``options`` as for :func:`resnet19`; ``hidden`` (None here) adds a spiking FC layer before the classifier.
    """
    stages = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))
    return _network("resnet18", width, neuron, _imagenet(options), stages, stem_channels=64, stem="imagenet")


def resnet34(
    width: float = 1.0, *, neuron: NeuronSpec | Mapping[str, Any] | None = None, **options: Any
) -> SpikingResNet:
    """Spiking ResNet-34: :func:`resnet18` with [3, 4, 6, 3] blocks in its four stages (the tdBN paper's ImageNet
    network: 67.05% top-1 at T=6 there). 21,797,672 parameters with ``in_channels=3``, ``num_classes=1000`` (the
    defaults) and ``width=1``, torchvision's ``resnet34`` count."""
    stages = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
    return _network("resnet34", width, neuron, _imagenet(options), stages, stem_channels=64, stem="imagenet")


#: The networks by name (``ModelConfig.arch``, a checkpoint's ``arch``): what :func:`build_network` dispatches to.
ARCHS = {"resnet19": resnet19, "resnet18": resnet18, "resnet34": resnet34}


def build_network(
    arch: str = "resnet19", width: float = 1.0, *, neuron: NeuronSpec | Mapping[str, Any] | None = None, **options
) -> SpikingResNet:
    """The network named ``arch`` (one of :data:`ARCHS`), built by its factory with ``width``, ``neuron`` and
    ``options``: ``build_network(**stbp.train.checkpoint.model_kwargs(cfg))`` is the config's network."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    return ARCHS[arch](width, neuron=neuron, **options)


def _imagenet(options: dict[str, Any]) -> dict[str, Any]:
    """The ImageNet nets' defaults under ``options``: RGB in, 1,000 classes out, no spiking FC layer."""
    return {"in_channels": 3, "num_classes": 1000, "hidden": None, **options}


def _network(
    arch: str,
    width: float,
    neuron: NeuronSpec | Mapping[str, Any] | None,
    options: dict[str, Any],
    stages: tuple[tuple[int, int, int], ...],
    **layout: Any,
) -> SpikingResNet:
    """What the factories share: ``arch`` checked, the neuron resolved (``options``' NeuronSpec fields override
    it), every convolution's channels scaled by ``width``; ``layout``: the stem's keywords."""
    given = options.pop("arch", arch)
    if given != arch:
        raise ValueError(f"{arch}() builds {arch!r}, not {given!r}: build_network(arch={given!r}) builds that one")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    neuron = REFERENCE if neuron is None else NeuronSpec(**neuron) if isinstance(neuron, Mapping) else neuron
    if not isinstance(neuron, NeuronSpec):
        raise TypeError(f"neuron must be a NeuronSpec or a mapping of its fields, got {neuron!r}")
    neuron = neuron.with_fields(**{name: options.pop(name) for name in FIELDS if name in options})
    ch = lambda c: max(1, round(c * width))
    stages = tuple((ch(c), blocks, stride) for c, blocks, stride in stages)
    layout["stem_channels"] = ch(layout["stem_channels"])
    return SpikingResNet(stages=stages, neuron=neuron, **layout, **options)
