"""The spiking core: what a neuron is (:mod:`.spec`), the neuron (:mod:`.neuron`), threshold-dependent batch norm
(:mod:`.tdbn`), the spike convolution (:mod:`.conv`), the networks (:mod:`.model`), the learned neurons' records
(:mod:`.learned`) and firing rates and spike cost (:mod:`.monitor`). Needs only torch; knows nothing of data,
training or tracking.

The names below load on first use (PEP 562), so that the config can read :mod:`.spec` without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import SpikingResNet, build_network, resnet18, resnet19, resnet34
    from .monitor import FiringRateMonitor
    from .neuron import LIF, lif_fused, lif_reference, spike
    from .nir_graph import NIRExportError, to_nir
    from .spec import REFERENCE, NeuronSpec
    from .tdbn import TdBN, convert_sync_tdbn

_HOME = {
    **dict.fromkeys(["SpikingResNet", "build_network", "resnet18", "resnet19", "resnet34"], ".model"),
    **dict.fromkeys(["FiringRateMonitor"], ".monitor"),
    **dict.fromkeys(["LIF", "lif_fused", "lif_reference", "spike"], ".neuron"),
    **dict.fromkeys(["NIRExportError", "to_nir"], ".nir_graph"),
    **dict.fromkeys(["REFERENCE", "NeuronSpec"], ".spec"),
    **dict.fromkeys(["TdBN", "convert_sync_tdbn"], ".tdbn"),
}

__all__ = [
    "LIF",
    "REFERENCE",
    "TdBN",
    "FiringRateMonitor",
    "NeuronSpec",
    "NIRExportError",
    "SpikingResNet",
    "build_network",
    "convert_sync_tdbn",
    "lif_fused",
    "lif_reference",
    "resnet18",
    "resnet19",
    "resnet34",
    "spike",
    "to_nir",
]
assert sorted(__all__) == sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
