"""The same ResNet-19 built from SpikingJelly 2.0 multi-step layers (a benchmark-only, optional dependency).

Install into the venv with ``.venv/bin/pip install --no-deps spikingjelly==2.0.0 "loguru>=0.7,<1"`` (loguru is the one
of its dependencies it needs at import and the venv lacks); nothing outside ``bench/``
imports it. The neuron is the issue's

    LIFNode(tau=4/3, decay_input=False, v_threshold=v_th, v_reset=0, surrogate_function=Rect(alpha=1/(2*aa)),
            step_mode='m')

``decay_input=False``: ``H = V - V/tau + X``, with ``tau = 1/(1 - 0.25)`` that is ``H = 0.25*V + X``, the same
decay as ``stbp``'s ``tau=0.25``; the hard reset to 0 is ``V = H*(1 - S)``, our ``u*(1-o)``, with gradients
through the spike in both. SpikingJelly 2.0 has ``surrogate.Rect``: gradient ``alpha`` on ``|x| < 0.5/alpha``,
i.e. ``1/(2aa)`` on ``|H - v_th| < aa``, our window. (Its fused LIF operators cover seven other surrogates but
not Rect, so this LIFNode runs SpikingJelly's Torch reference loop, on CPU and GPU alike.)

``ThresholdDependentBatchNorm2d`` folds ``alpha*v_th`` into its initial weight, where ``stbp.TdBN`` multiplies
it in at every call; :func:`load_from_stbp` converts. Like ``stbp`` (and SpikingJelly's own examples) the stem
convolution runs once on the image and its output is repeated over time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SJResNet19", "sj_resnet19", "load_from_stbp", "available", "import_spikingjelly", "INSTALL_HINT"]

# loguru is the one of SpikingJelly's dependencies that it needs at import time and the venv lacks.
INSTALL_HINT = ".venv/bin/pip install --no-deps spikingjelly==2.0.0 'loguru>=0.7,<1'"
RESIDUAL_ALPHA = 1 / math.sqrt(2)


def import_spikingjelly():
    """``(functional, layer, neuron, surrogate)`` of ``spikingjelly.activation_based``; ImportError with the
    install command when it is missing."""
    try:
        from spikingjelly.activation_based import functional, layer, neuron, surrogate
    except ImportError as e:
        raise ImportError(f"SpikingJelly is not installed: {INSTALL_HINT}") from e
    return functional, layer, neuron, surrogate


def available() -> bool:
    try:
        import_spikingjelly()
    except ImportError:
        return False
    return True


class SJResNet19(nn.Module):
    """ResNet-19 from SpikingJelly multi-step layers; input ``[N, C, H, W]``, ``[T, N, ...]`` inside.

    Module and parameter names mirror :func:`stbp.resnet19` so weights map one to one (see
    :func:`load_from_stbp`). Call :meth:`reset_state` (``functional.reset_net``) before every forward; it is
    not named ``reset`` because reset_net calls every submodule's ``reset`` (this one included).
    """

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
        functional, layer, neuron, surrogate = import_spikingjelly()
        self._functional = functional
        ch = lambda c: max(1, round(c * width))
        sj_tau = 1.0 / (1.0 - tau)  # decay_input=False: H = (1 - 1/tau_sj) V + X = tau V + X

        def lif():
            return neuron.LIFNode(
                tau=sj_tau,
                decay_input=False,
                v_threshold=v_th,
                v_reset=0.0,
                surrogate_function=surrogate.Rect(alpha=1.0 / (2 * aa)),
                step_mode="m",
            )

        def bn(c, alpha=1.0):
            return layer.ThresholdDependentBatchNorm2d(alpha=alpha, v_th=v_th, num_features=c)

        def conv(cin, cout, k, stride=1):
            return layer.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, step_mode="m")

        self.timesteps = timesteps
        self.conv1 = nn.Conv2d(in_channels, ch(128), 3, padding=1, bias=False)  # single-step: runs once
        self.bn1 = bn(ch(128))
        self.lif1 = lif()
        cin = ch(128)
        self.stages = nn.ModuleList()
        for cout, blocks, stride in ((ch(128), 3, 1), (ch(256), 3, 2), (ch(512), 2, 2)):
            layers = []
            for i in range(blocks):
                s = stride if i == 0 else 1
                shortcut = None
                if s != 1 or cin != cout:
                    shortcut = nn.Sequential(conv(cin, cout, 1, s), bn(cout, RESIDUAL_ALPHA))
                layers.append(
                    _Block(
                        conv(cin, cout, 3, s),
                        bn(cout),
                        lif(),
                        conv(cout, cout, 3),
                        bn(cout, RESIDUAL_ALPHA),
                        shortcut,
                        lif(),
                    )
                )
                cin = cout
            self.stages.append(nn.Sequential(*layers))
        self.pool = layer.AdaptiveAvgPool2d(1, step_mode="m")
        self.fc1 = layer.Linear(cin, hidden, step_mode="m")
        self.lif_fc1 = lif()
        self.fc2 = layer.Linear(hidden, num_classes, step_mode="m")

    def reset_state(self) -> None:
        self._functional.reset_net(self)

    def forward(self, images: Tensor) -> Tensor:  # [N, C, H, W] -> [N, num_classes]
        x = self.conv1(images)
        x = x.unsqueeze(0).repeat(self.timesteps, 1, 1, 1, 1)  # [T, N, C, H, W]
        x = self.lif1(self.bn1(x))
        for stage in self.stages:
            x = stage(x)
        x = self.pool(x).flatten(2)  # [T, N, C]
        x = self.lif_fc1(self.fc1(x))
        return self.fc2(x).mean(0)


class _Block(nn.Module):
    """conv-tdBN-LIF-conv-tdBN(1/sqrt2) + shortcut, LIF; multi-step ``[T, N, C, H, W]``."""

    def __init__(self, conv1, bn1, lif1, conv2, bn2, shortcut, lif2):
        super().__init__()
        self.conv1, self.bn1, self.lif1, self.conv2, self.bn2 = conv1, bn1, lif1, conv2, bn2
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.lif2 = lif2

    def forward(self, x: Tensor) -> Tensor:
        out = self.lif1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.lif2(out)


def sj_resnet19(**kwargs) -> SJResNet19:
    return SJResNet19(**kwargs)


@torch.no_grad()
def load_from_stbp(sj: SJResNet19, ours: nn.Module) -> SJResNet19:
    """Copy ``ours``' (an ``stbp`` ResNet-19) weights into ``sj``; tdBN weights take ``alpha*v_th`` in."""
    from stbp.core.tdbn import TdBN

    v_th = ours.lif1.threshold()  # every layer's: the model has one neuron spec
    scales = {f"{name}.weight": m.alpha * v_th for name, m in ours.named_modules() if isinstance(m, TdBN)}
    state = {k: v * scales[k] if k in scales else v for k, v in ours.state_dict().items()}
    sj.load_state_dict(state)
    return sj
