"""Firing-rate monitor: the mean firing rate of every spiking layer and the spike cost of the whole network,
accumulated on the device.

Nothing is recorded unless a monitor is attached: it registers forward hooks on the :class:`LIF` layers (spikes)
and on the convolutions (synaptic operations) and removes them on :meth:`FiringRateMonitor.close` (or on leaving
its ``with`` block). The hooks add to device tensors, so ``forward`` never waits for the host; reading the totals
is the only sync.

**Spike cost**, the usual SNN energy proxy. A synaptic operation (SOP) is one spike reaching one synapse: an
accumulate of one weight. Every convolution that sees spikes counts its SOPs exactly, borders and strides
included: ``C_out x sum over output positions of the spikes in the window`` (one extra single-channel convolution
per layer, in evaluation only). Spikes that reach a linear layer (through the global average pool) count
``out_features`` each (``model.dense_fan_outs()``). The stem convolution sees pixels, not spikes: its
multiply-accumulates (MACs) are counted apart. Energy on 45 nm CMOS (Horowitz, ISSCC 2014, 32-bit float, as SNN
papers estimate it): ``E = E_AC x SOPs + E_MAC x MACs``.

On event frames (inputs ``[N, T, C, H, W]``) the stem runs at every step on frames of event counts (``log(1 +
count)``), which are not binary, so its operations stay MACs, but only the nonzero inputs count: an event-driven stem
does nothing for a pixel without events. They are counted like SOPs (``C_out x`` the nonzero inputs in each window,
over all T steps) and priced as MACs. A static image's stem counts every MAC, once for all T (its pixels are dense).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv import SpikeConv2d
from .neuron import LIF

__all__ = ["FiringRateMonitor", "spike_cost", "rate_table", "firing_rate_chart", "E_AC_PJ", "E_MAC_PJ", "SPIKE_COST"]

E_AC_PJ = 0.9  #: pJ per accumulate (a 32-bit float add, 45 nm; Horowitz 2014): the cost of one SOP
E_MAC_PJ = 4.6  #: pJ per multiply-accumulate (3.7 pJ multiply + 0.9 pJ add, 32-bit float, 45 nm; Horowitz 2014)
#: The spike-cost metrics :func:`stbp.train.evaluate.evaluate` reports with firing rates on (per epoch, on validation).
SPIKE_COST = ("spikes_per_image", "sops_per_image", "energy_uj_per_image", "firing_rate")


class FiringRateMonitor:
    """Mean firing rate (spikes per neuron per time step) of every :class:`LIF` layer of ``model``.

    Layer names are the module paths in ``model`` (``lif1``, ``stages.0.1.lif2``, ``lif_fc1``...), with a
    ``module.``/``_orig_mod.`` prefix of DDP or ``torch.compile`` wrappers stripped.
    """

    def __init__(self, model: nn.Module):
        model = _unwrap(model)  # the names are the model's own module paths
        self._handles = []
        lifs = [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)]
        if not lifs:
            raise ValueError("model has no LIF layers to monitor")
        self.names: list[str] = [name for name, _ in lifs]
        for i, (_, module) in enumerate(lifs):
            self._handles.append(module.register_forward_hook(self._hook(i)))
        self._spikes: Tensor | None = None
        self._counts = [0] * len(lifs)
        # Spike cost: exact SOPs of the convolutions that see spikes, MACs of those that see pixels.
        dense = getattr(model, "dense_fan_outs", dict)()
        self._fan_out = [float(dense.get(name, 0)) for name in self.names]
        self._sops: Tensor | None = None
        self._macs = 0
        self._sparse_macs: Tensor | None = None  # the stem's MACs on event frames: nonzero inputs only
        self._events = False  # whether the model's current input is event frames
        self._handles.append(model.register_forward_pre_hook(self._input_hook))
        for module in model.modules():
            if isinstance(module, SpikeConv2d):
                self._handles.append(module.register_forward_pre_hook(self._sop_hook))
            elif isinstance(module, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._mac_hook))

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if isinstance(output, tuple):  # (spikes, mask) from LIF.forward(..., return_mask=True)
                output = output[0]
            if self._spikes is None:
                self._spikes = torch.zeros(len(self.names), dtype=torch.float64, device=output.device)
            # Device-side accumulate; the element count is known on the host without a sync.
            self._spikes[index] += output.detach().sum(dtype=torch.float64)
            self._counts[index] += output.numel()

        return hook

    def _input_hook(self, model: nn.Module, inputs) -> None:
        self._events = bool(inputs) and inputs[0].dim() == 5

    @staticmethod
    def _reached(conv: nn.Conv2d, active: Tensor) -> Tensor:
        """``C_out x`` the active (nonzero) inputs in every output position's window: the synapses they reach."""
        with torch.autocast(active.device.type, enabled=False):  # exact integer counts: no bf16 here
            per_position = active.sum(1, keepdim=True, dtype=torch.float32)
            window = torch.ones(1, 1, *conv.kernel_size, device=active.device)
            reached = F.conv2d(per_position, window, stride=conv.stride, padding=conv.padding)
        return reached.sum(dtype=torch.float64) * conv.out_channels

    def _sop_hook(self, conv: nn.Conv2d, inputs) -> None:
        sops = self._reached(conv, inputs[0].detach())
        self._sops = sops if self._sops is None else self._sops + sops

    def _mac_hook(self, conv: nn.Conv2d, inputs, output) -> None:
        if self._events:  # event frames: only the pixels with events cost anything (module docstring)
            macs = self._reached(conv, inputs[0].detach() != 0)
            self._sparse_macs = macs if self._sparse_macs is None else self._sparse_macs + macs
            return
        self._macs += output.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    def reset(self) -> None:
        if self._spikes is not None:
            self._spikes.zero_()
        self._counts = [0] * len(self.names)
        self._sops, self._macs, self._sparse_macs = None, 0, None

    def totals(self) -> tuple[Tensor | None, list[int]]:
        """Spike sums (device tensor, one per layer) and element counts: what ranks all-reduce."""
        return self._spikes, list(self._counts)

    def cost_totals(self, spikes: Tensor) -> Tensor:
        """``[spikes, SOPs, MACs]`` summed over everything seen, from ``spikes``, the per-layer sums of
        :meth:`totals` as float64 (zeros before any forward); a device tensor, no sync: what ranks all-reduce before
        :func:`spike_cost` divides by the images."""
        dense = (spikes * torch.tensor(self._fan_out, device=spikes.device, dtype=spikes.dtype)).sum()
        sops = dense if self._sops is None else self._sops + dense
        macs = torch.tensor(float(self._macs), device=spikes.device, dtype=spikes.dtype)
        macs = macs if self._sparse_macs is None else macs + self._sparse_macs
        return torch.stack([spikes.sum(), sops, macs])

    def rates(self) -> dict[str, float]:
        """``{layer name: firing rate}``; syncs with the device once."""
        if self._spikes is None:
            return {name: 0.0 for name in self.names}
        spikes = self._spikes.tolist()
        return {n: (s / c if c else 0.0) for n, s, c in zip(self.names, spikes, self._counts)}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FiringRateMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spike_cost(spikes: float, sops: float, macs: float, images: float) -> dict[str, float]:
    """Per image: ``spikes_per_image`` (every spike of every spiking layer over all T steps), ``sops_per_image``
    and ``energy_uj_per_image`` (``E_AC_PJ x SOPs + E_MAC_PJ x MACs``, in microjoules)."""
    return {
        "spikes_per_image": spikes / images,
        "sops_per_image": sops / images,
        "energy_uj_per_image": (E_AC_PJ * sops + E_MAC_PJ * macs) / images * 1e-6,
    }


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP, torch.compile
        model = getattr(model, "module", None) or model._orig_mod
    return model


def rate_table(history: list[dict[str, float]], path: str | Path) -> Path | None:
    """The firing rate of every spiking layer at every epoch (``firing_rate/<layer>`` in each epoch's metrics) as a
    CSV table, one row per epoch: what MLflow keeps as an artifact rather than as 18 charts ahead of the accuracy."""
    import csv

    layers = [k for k in (history[-1] if history else {}) if k.startswith("firing_rate/")]
    if not layers:
        return None
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["epoch", *(k.removeprefix("firing_rate/") for k in layers)])
        out.writerows([m.get("epoch", i + 1), *(m.get(k, "") for k in layers)] for i, m in enumerate(history))
    return Path(path)


def firing_rate_chart(rates: dict[str, float], path: str | Path) -> Path | None:
    """A bar chart of the mean firing rate per spiking layer (PNG), or None without rates or matplotlib."""
    if not rates:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rates)), 4))
    ax.bar(range(len(rates)), list(rates.values()), color="tab:blue")
    ax.set_xticks(range(len(rates)), list(rates), rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("mean firing rate (spikes / neuron / step)")
    ax.set_title("Firing rate per spiking layer (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
