"""Firing-rate monitor: the mean firing rate of every spiking layer, accumulated on the device.

Nothing is recorded unless a monitor is attached: it registers forward hooks on the :class:`LIF` layers and
removes them on :meth:`FiringRateMonitor.close` (or on leaving its ``with`` block). The hooks add each layer's
spike count to a device tensor, so ``forward`` never waits for the host; reading :meth:`rates` is the only
sync.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .neuron import LIF

__all__ = ["FiringRateMonitor", "firing_rate_chart"]


class FiringRateMonitor:
    """Mean firing rate (spikes per neuron per time step) of every :class:`LIF` layer of ``model``.

    Layer names are the module paths in ``model`` (``lif1``, ``stages.0.1.lif2``, ``lif_fc1``...), with a
    ``module.``/``_orig_mod.`` prefix of DDP or ``torch.compile`` wrappers stripped.
    """

    def __init__(self, model: nn.Module):
        self.names: list[str] = []
        self._handles = []
        lifs = [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)]
        if not lifs:
            raise ValueError("model has no LIF layers to monitor")
        for i, (name, module) in enumerate(lifs):
            for prefix in ("module.", "_orig_mod."):
                while name.startswith(prefix):
                    name = name[len(prefix) :]
            self.names.append(name)
            self._handles.append(module.register_forward_hook(self._hook(i)))
        self._spikes: Tensor | None = None
        self._counts = [0] * len(lifs)

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

    def reset(self) -> None:
        if self._spikes is not None:
            self._spikes.zero_()
        self._counts = [0] * len(self.names)

    def totals(self) -> tuple[Tensor | None, list[int]]:
        """Spike sums (device tensor, one per layer) and element counts: what ranks all-reduce."""
        return self._spikes, list(self._counts)

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
