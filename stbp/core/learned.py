"""The learned neuron parameters (``learn_tau``, ``learn_v_th``; :mod:`stbp.core.neuron`) as part of a run's record: per
spiking layer, every epoch, in the epoch's metrics (``v_th/<layer>``, ``tau/<layer>``; with per-channel thresholds
also ``v_th_min/<layer>`` and ``v_th_max/<layer>``, ``v_th`` being their mean), as a CSV table and as a chart.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .neuron import LIF

__all__ = ["learned_neurons", "learned_means", "neuron_metrics", "neuron_table", "neuron_chart", "KINDS", "MEANS"]

KINDS = ("v_th", "v_th_min", "v_th_max", "tau")
#: The mean over spiking layers of each learned parameter: an MLflow metric every epoch, and what a sweep's
#: comparison of fixed and learned neurons shows (:mod:`stbp.sweep.compare`).
MEANS = ("v_th_mean", "tau_mean")


def learned_neurons(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer: {"v_th": ..., "tau": ...}}`` for every LIF layer of ``model`` (module paths, as the firing rates
    name them) that learns something; ``{}`` when none does. Reads the parameters to the host (once an epoch)."""
    out = {}
    for name, lif in model.named_modules():
        if not isinstance(lif, LIF) or (lif.tau_logit is None and lif.log_v_th is None):
            continue
        with torch.no_grad():
            v_th = torch.as_tensor(lif.threshold(), dtype=torch.float64)
            values = {"v_th": float(v_th.mean()), "tau": float(lif.decay())}
            if v_th.dim() == 1:
                values.update(v_th_min=float(v_th.min()), v_th_max=float(v_th.max()))
        out[name] = values
    return out


def learned_means(model: nn.Module) -> dict[str, float]:
    """``{"v_th_mean": ..., "tau_mean": ...}``: each learned parameter's mean over the layers (a per-channel
    threshold counts as its mean), only for what ``model`` learns."""
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    out = {}
    with torch.no_grad():
        thresholds = [lif.threshold().double().mean() for lif in lifs if lif.log_v_th is not None]
        taus = [lif.decay().double() for lif in lifs if lif.tau_logit is not None]
        for name, values in (("v_th_mean", thresholds), ("tau_mean", taus)):
            if values:
                out[name] = float(torch.stack(values).mean())
    return out


def neuron_metrics(values: dict[str, dict[str, float]]) -> dict[str, float]:
    """:func:`learned_neurons`'s values as flat metrics: ``{"v_th/<layer>": ..., "tau/<layer>": ...}``."""
    return {f"{kind}/{layer}": v for layer, kinds in values.items() for kind, v in kinds.items()}


def _layers(history: list[dict[str, float]], kind: str) -> list[str]:
    last = history[-1] if history else {}
    return [k.split("/", 1)[1] for k in last if k.startswith(f"{kind}/")]


def neuron_table(history: list[dict[str, float]], path: str | Path) -> Path | None:
    """Every epoch's learned values, one row per epoch and layer (``epoch, layer, v_th, v_th_min, v_th_max, tau``;
    blank where not per channel), or None when nothing is learned."""
    import csv

    layers = _layers(history, "v_th")
    if not layers:
        return None
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["epoch", "layer", *KINDS])
        for i, m in enumerate(history):
            for layer in layers:
                out.writerow([m.get("epoch", i + 1), layer, *(m.get(f"{k}/{layer}", "") for k in KINDS)])
    return Path(path)


def neuron_chart(history: list[dict[str, float]], path: str | Path) -> Path | None:
    """The learned threshold and decay factor of every layer against the epoch (two panels, PNG), or None when
    nothing is learned or matplotlib is missing."""
    layers = _layers(history, "v_th")
    if not layers:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [m.get("epoch", i + 1) for i, m in enumerate(history)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("viridis")
    for j, layer in enumerate(layers):
        colour = colours(j / max(len(layers) - 1, 1))
        for ax, kind in zip(axes, ("v_th", "tau")):
            ax.plot(epochs, [m.get(f"{kind}/{layer}", float("nan")) for m in history], color=colour, label=layer)
    axes[0].set(xlabel="epoch", ylabel="v_th (mean over channels)", title="Learned threshold per layer")
    axes[1].set(xlabel="epoch", ylabel="tau", title="Learned decay factor per layer")
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
