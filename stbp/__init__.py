"""stbp: deep spiking ResNets trained with STBP (rectangular surrogate gradients) and tdBN.

A neuron is a :class:`NeuronSpec` (``stbp.core.spec.REFERENCE`` the reference one) that goes from the config to
every :class:`LIF` layer. The core (neurons, tdBN, the network, training) needs only torch; Ray and MLflow are
imported lazily by the parts that use them.
"""

from .core.model import SpikingResNet, build_network, resnet18, resnet19, resnet34
from .core.monitor import FiringRateMonitor
from .core.neuron import LIF, lif_fused, lif_reference, spike
from .core.spec import NeuronSpec
from .core.tdbn import TdBN, convert_sync_tdbn
from .train.checkpoint import load_checkpoint

__all__ = [
    "LIF",
    "TdBN",
    "FiringRateMonitor",
    "NeuronSpec",
    "SpikingResNet",
    "build_network",
    "convert_sync_tdbn",
    "lif_fused",
    "lif_reference",
    "load_checkpoint",
    "resnet18",
    "resnet19",
    "resnet34",
    "spike",
]
__version__ = "0.1.0"
