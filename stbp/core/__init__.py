"""The spiking core: the neuron (:mod:`.neuron`), threshold-dependent batch norm (:mod:`.tdbn`), the spike
convolution (:mod:`.conv`), the network (:mod:`.model`), the learned neurons' records (:mod:`.learned`) and firing
rates and spike cost (:mod:`.monitor`). Needs only torch; knows nothing of data, training or tracking."""

from .model import SpikingResNet, resnet19
from .monitor import FiringRateMonitor
from .neuron import LIF, lif_fused, lif_reference, spike
from .tdbn import TdBN, convert_sync_tdbn

__all__ = [
    "LIF",
    "TdBN",
    "FiringRateMonitor",
    "SpikingResNet",
    "convert_sync_tdbn",
    "lif_fused",
    "lif_reference",
    "resnet19",
    "spike",
]
