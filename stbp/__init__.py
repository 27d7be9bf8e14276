"""stbp: deep spiking ResNets trained with STBP (rectangular surrogate gradients) and tdBN.

The core (neurons, tdBN, the network, training) needs only torch; Ray and MLflow are imported lazily by the
parts that use them.
"""

from .checkpoint import load_checkpoint
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
    "load_checkpoint",
    "resnet19",
    "spike",
]
__version__ = "0.1.0"
