"""What a spiking neuron is: :class:`NeuronSpec`, one frozen value that travels unchanged from the config
(:attr:`stbp.config.ModelConfig.neuron`) through :func:`~stbp.core.model.resnet19` to every
:class:`~stbp.core.neuron.LIF` layer. :data:`REFERENCE`, the defaults below, is the reference point (the STBP/tdBN
reference implementation's neuron), written here once; the config's defaults and the sweep's reference read it.

Imports only the standard library (the config imports it without torch).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = ["NeuronSpec", "REFERENCE", "FIELDS", "Granularity", "AaMode"]

#: The choices of :attr:`NeuronSpec.v_th_granularity` and :attr:`NeuronSpec.aa_mode` (the config's types too).
Granularity = Literal["layer", "channel"]
AaMode = Literal["fixed", "relative"]


@dataclass(frozen=True)
class NeuronSpec:
    """A LIF neuron's parameters (the dynamics: :mod:`stbp.core.neuron`), checked when made: a bad value raises
    ``ValueError`` naming the field and the value. ``dataclasses.replace(spec, v_th=0.3)`` derives another."""

    v_th: float = 0.4
    """Firing threshold, > 0 (with ``learn_v_th``, the learned threshold's starting value)."""
    aa: float = 0.5
    """Half-width of the rectangular surrogate-gradient window around ``v_th``, > 0."""
    tau: float = 0.25
    """Membrane decay factor in (0, 1]: ``u_t = tau * u_{t-1} * (1 - o_{t-1}) + x_t`` (with ``learn_tau``, the
    learned factor's starting value, then < 1)."""
    fast: bool = True
    """Run the time loop as one fused autograd node (:func:`~stbp.core.neuron.lif_fused`), else the plain loop."""
    learn_tau: bool = False
    """Learn the decay factor (PLIF: ``tau = sigmoid(w)``), one per layer."""
    learn_v_th: bool = False
    """Learn the threshold (``v_th = exp(q)``); the tdBN driving the layer normalises to it."""
    v_th_granularity: Granularity = "layer"
    """With ``learn_v_th``: one threshold per layer, or one per channel."""
    aa_mode: AaMode = "fixed"
    """With ``learn_v_th``: ``'fixed'`` keeps the half-width ``aa``; ``'relative'`` scales it with the learned
    threshold (``aa * threshold / v_th``)."""

    def __post_init__(self) -> None:
        for name in ("v_th", "aa", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.v_th > 0:
            raise ValueError(f"v_th must be > 0, got {self.v_th}")
        if not self.aa > 0:
            raise ValueError(f"aa must be > 0, got {self.aa}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.learn_tau and not self.tau < 1:
            raise ValueError(f"learn_tau needs tau < 1 (tau = sigmoid(w) never reaches 1), got tau={self.tau}")
        for name, choices in (("v_th_granularity", Granularity), ("aa_mode", AaMode)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name} must be one of {get_args(choices)}, got {getattr(self, name)!r}")

    def with_fields(self, **fields: Any) -> NeuronSpec:
        """This spec with ``fields`` replaced (checked again); itself when there are none."""
        return dataclasses.replace(self, **fields) if fields else self


#: The field names of :class:`NeuronSpec`, in order.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(NeuronSpec))

#: The reference point: the STBP/tdBN reference implementation's neuron.
REFERENCE = NeuronSpec()
