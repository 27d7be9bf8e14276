"""STBP spiking neuron: Heaviside spike with a rectangular surrogate gradient, and a multi-step LIF layer.

The road: a :class:`~stbp.core.spec.NeuronSpec` (from the config, or :data:`~stbp.core.spec.REFERENCE`) goes to
``LIF(spec, channels)``; the layer keeps it as ``spec``, and :meth:`LIF.threshold` and :meth:`LIF.decay` are the
values it fires with (the spec's, or learned ones). The tdBN driving a layer reads its threshold from there.

Shapes: the LIF layer takes ``[T, N, ...]`` (time first). Convolutions and tdBN see time folded into the
batch, ``[T*N, C, H, W]``; :meth:`LIF.forward_folded` does the (free) views between the two.

Dynamics (Wu et al. 2018, STBP; Zheng et al. 2021, tdBN):

    u_t = tau * u_{t-1} * (1 - o_{t-1}) + x_t,      u_{-1} = 0, o_{-1} = 0
    o_t = H(u_t - v_th)                              (spike when u_t > v_th)
    do_t/du_t ~= 1/(2*aa) * 1[|u_t - v_th| < aa]     (rectangular surrogate, centred at v_th)

``tau`` is a decay factor per step (not a time constant). The reference implementation centred the surrogate
window at 0; here it is centred at the threshold, where the Heaviside step actually is. Gradients flow through
the reset term ``(1 - o_{t-1})`` (it is not detached).

Learned neurons (each off by default; off, the arithmetic is the fixed neuron's, bit for bit):

- ``learn_tau``: PLIF (Fang et al. 2021): ``tau = sigmoid(w)`` per layer, ``w`` trained, so tau stays in (0, 1).
  ``dL/dtau = sum_t dL/du_{t+1} * (1 - o_t) * u_t``.
- ``learn_v_th``: ``v_th = exp(q)`` per layer or per channel, ``q`` trained, so v_th stays positive.
  ``dL/dv_th = -sum_t s_t * dL/do_t`` (the surrogate of ``H(u - v_th)`` in ``v_th``). With ``aa_mode='relative'``
  the window's half-width follows the threshold, ``aa * v_th / v_th_init`` (the threshold-robust surrogate:
  the window keeps its place relative to the threshold as the threshold moves); ``'fixed'`` keeps ``aa``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .spec import REFERENCE, NeuronSpec

__all__ = ["spike", "SpikeFunction", "lif_reference", "lif_fused", "LIF"]

#: A neuron parameter: a Python float (fixed), or a tensor (learned; v_th a scalar or broadcast over x[t]).
Param = float | Tensor


class SpikeFunction(torch.autograd.Function):
    """Heaviside forward ``u > v_th``; rectangular surrogate backward ``1/(2*aa)`` on ``|u - v_th| < aa``.

    The window is centred at ``v_th`` (not at 0 as in the reference code) and is open: points exactly on its
    edge, ``|u - v_th| == aa``, get zero gradient.
    """

    @staticmethod
    def forward(ctx, u: Tensor, v_th: Param, aa: Param) -> Tensor:
        mask = (u - v_th).abs() < aa
        ctx.save_for_backward(mask)
        ctx.aa = aa
        ctx.v_th_shape = v_th.shape if isinstance(v_th, Tensor) else None
        return (u > v_th).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (mask,) = ctx.saved_tensors
        grad_u = grad_out * mask.to(grad_out.dtype) * (0.5 / ctx.aa)
        # H(u - v_th): the threshold's surrogate gradient is minus the membrane's, summed to its shape
        grad_v_th = -grad_u.sum_to_size(ctx.v_th_shape) if ctx.needs_input_grad[1] else None
        return grad_u, grad_v_th, None


def spike(u: Tensor, v_th: Param = REFERENCE.v_th, aa: Param = REFERENCE.aa) -> Tensor:
    """Spikes ``(u > v_th)`` as ``u.dtype``, with the rectangular surrogate gradient (see :class:`SpikeFunction`)."""
    return SpikeFunction.apply(u, v_th, aa)


def lif_reference(x: Tensor, v_th: Param, aa: Param, tau: Param, return_membrane: bool = False):
    """The LIF recurrence as a plain loop over time with autograd through every op: the oracle for the fast path.
    Learned parameters (tensors ``v_th``, ``tau``) get their gradients from autograd.

    With ``return_membrane=True`` returns ``(spikes, membrane)``, both ``[T, N, ...]``.
    """
    u = torch.zeros_like(x[0])
    o = torch.zeros_like(x[0])
    out, membrane = [], []
    for t in range(x.shape[0]):
        u = tau * u * (1 - o) + x[t]
        o = spike(u, v_th, aa)
        out.append(o)
        membrane.append(u)
    if return_membrane:
        return torch.stack(out), torch.stack(membrane)
    return torch.stack(out)


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool tensor as 0/1 of ``dtype``. Through a uint8 view: on CPU, torch's bool->float cast is several times
    slower than its uint8->float one (BENCHMARKS.md, 'Analysis')."""
    return mask.view(torch.uint8).to(dtype)


class _LIFFunction(torch.autograd.Function):
    """The whole LIF time loop as one autograd node that saves only what STBP's backward needs.

    Per step it keeps the spike and the surrogate window as bool tensors, and the membrane ``u_t`` only for
    ``t < T-1`` (the reset term ``-tau * u_t * o_t`` of step ``t+1`` needs it; the last step's does not exist).
    Backward, with ``g_t`` the incoming gradient of ``o_t`` and ``s_t = 1[|u_t - v_th| < aa] / (2*aa)``:

        dL/do_t = g_t - tau * u_t * dL/du_{t+1}
        dL/du_t = s_t * dL/do_t + tau * (1 - o_t) * dL/du_{t+1}
        dL/dx_t = dL/du_t
        dL/dv_th = -sum_t s_t * dL/do_t,   dL/dtau = sum_t dL/du_{t+1} * (1 - o_t) * u_t   (when learned)

    Every product is taken in the order autograd takes it for :func:`lif_reference`, so forward and the input's
    gradient agree with it to the last bit. Masks are used as 0/1 floats (no masked_fill, no bool arithmetic: both
    are slow on CPU). ``v_th``, ``aa`` and ``tau`` are floats, or tensors when learned (:data:`Param`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, v_th: Param, aa: Param, tau: Param) -> Tensor:
        steps = x.shape[0]
        # The membrane is integrated in fp32 even under autocast; spikes are exact in any dtype.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        spikes = torch.empty_like(x, dtype=torch.bool)
        window = torch.empty_like(x, dtype=torch.bool)
        out = torch.empty_like(x)
        membranes = []
        for t in range(steps):
            if t == 0:
                u = xf[0].clone() if steps > 1 else xf[0]  # u_0 = x_0; a copy only if backward must keep it
            else:
                u = torch.mul(u, tau).mul_(1 - out[t - 1].to(u.dtype)).add_(xf[t])  # tau * u * (1 - o) + x
            torch.gt(u, v_th, out=spikes[t])
            out[t] = _as_float(spikes[t], x.dtype)
            torch.lt((u - v_th).abs_(), aa, out=window[t])
            if t < steps - 1:
                membranes.append(u)
        ctx.save_for_backward(spikes, window, *membranes)
        ctx.params = (aa, tau, v_th.shape if isinstance(v_th, Tensor) else None)
        ctx.mark_non_differentiable(spikes)
        return out, spikes  # the bool spikes too: a SpikeConv2d after this layer saves them, not a copy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_spikes: Tensor | None = None):
        spikes, window, *membranes = ctx.saved_tensors
        aa, tau, v_th_shape = ctx.params
        learn_v_th, learn_tau = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        dtype = torch.promote_types(grad_out.dtype, torch.float32)
        grad_x = torch.empty_like(grad_out)
        in_place = grad_x.dtype == dtype  # then each step's gradient is written straight into grad_x
        grad_u_next = grad_v_th = grad_tau = None
        for t in range(grad_out.shape[0] - 1, -1, -1):
            g = grad_out[t].to(dtype)
            # dL/do_t = g_t - (tau * u_t) * dL/du_{t+1}
            grad_o = g if grad_u_next is None else g - (membranes[t] * tau).mul_(grad_u_next)
            # dL/du_t = s_t * dL/do_t + tau * (1 - o_t) * dL/du_{t+1}
            grad_u = torch.mul(grad_o, _as_float(window[t], dtype), out=grad_x[t] if in_place else None)
            grad_u.mul_(0.5 / aa)
            if learn_v_th:
                step = grad_u.sum_to_size(v_th_shape)
                grad_v_th = -step if grad_v_th is None else grad_v_th - step
            if grad_u_next is not None:
                keep = torch.mul(grad_u_next, 1 - _as_float(spikes[t], dtype))
                if learn_tau:
                    step = (keep * membranes[t]).sum()
                    grad_tau = step if grad_tau is None else grad_tau + step
                grad_u.add_(keep.mul_(tau))
            if not in_place:
                grad_x[t] = grad_u
            grad_u_next = grad_u
        if learn_tau and grad_tau is None:  # T = 1: tau never acts
            grad_tau = torch.zeros((), dtype=dtype, device=grad_out.device)
        return grad_x, grad_v_th, None, grad_tau


def _lif_inference(x: Tensor, v_th: Param, tau: Param) -> Tensor:
    """The forward of :class:`_LIFFunction` alone (same arithmetic), when no gradient is needed."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = torch.empty_like(x)
    u = xf[0]
    for t in range(x.shape[0]):
        if t > 0:
            u = torch.mul(u, tau).mul_(1 - out[t - 1].to(u.dtype)).add_(xf[t])
        out[t] = _as_float(torch.gt(u, v_th), x.dtype)
    return out


def lif_fused(x: Tensor, v_th: Param, aa: Param, tau: Param, return_mask: bool = False):
    """Fast path of :func:`lif_reference`: same forward and input gradient, bit for bit (and the learned
    parameters' gradients up to the order of their sums).

    ``return_mask=True`` returns ``(spikes, mask)``: ``mask`` is the bool copy of the spikes that the layer keeps
    for its backward (``None`` when no gradient is needed), for a :class:`~stbp.core.conv.SpikeConv2d` to share."""
    learned = [p for p in (v_th, tau) if isinstance(p, Tensor)]
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in learned))):
        out = _lif_inference(x, v_th, tau)
        return (out, None) if return_mask else out
    out, mask = _LIFFunction.apply(x, v_th, aa, tau)
    return (out, mask) if return_mask else out


class LIF(nn.Module):
    """Multi-step leaky integrate-and-fire layer with STBP's rectangular surrogate gradient.

    Input ``[T, N, ...]`` (membrane drive per time step), output spikes of the same shape and dtype. No state
    is kept between calls. With ``return_mask=True`` (how :class:`~stbp.core.model.SpikingResNet` calls it) the
    output is ``(spikes, mask)``, and forward hooks see that tuple.

    ``spec`` (:class:`~stbp.core.spec.NeuronSpec`, the reference one by default) says what the neuron is;
    ``fields`` override some of its fields (``LIF(v_th=0.3)`` is ``LIF(dataclasses.replace(REFERENCE,
    v_th=0.3))``). ``spec.fast`` runs the whole time loop as one fused autograd node (:func:`lif_fused`), else
    the plain loop (:func:`lif_reference`). With ``learn_tau`` and ``learn_v_th`` the decay factor and the
    threshold are parameters (module docstring), starting at ``spec.tau`` and ``spec.v_th``: one threshold for
    the layer, or one per channel (``v_th_granularity='channel'``, ``channels`` of them, the input's dimension 2).
    :meth:`threshold` and :meth:`decay` are what the layer fires with.
    """

    def __init__(self, spec: NeuronSpec = REFERENCE, channels: int | None = None, **fields: Any):
        super().__init__()
        if not isinstance(spec, NeuronSpec):
            raise TypeError(f"LIF takes a NeuronSpec (or its fields by keyword, LIF(v_th=0.3)), got {spec!r}")
        spec = spec.with_fields(**fields)
        if spec.learn_v_th and spec.v_th_granularity == "channel" and not channels:
            raise ValueError("v_th_granularity='channel' needs the layer's channels")
        self.spec = spec
        tau, v_th = spec.tau, spec.v_th
        self.tau_logit = nn.Parameter(torch.tensor(math.log(tau / (1 - tau)))) if spec.learn_tau else None
        shape = (channels,) if spec.v_th_granularity == "channel" else ()
        self.log_v_th = nn.Parameter(torch.full(shape, math.log(v_th))) if spec.learn_v_th else None

    def threshold(self) -> Param:
        """The firing threshold: ``spec.v_th``, or the learned one (a scalar tensor, or one per channel ``[C]``).
        The tdBN that drives this layer normalises to it."""
        return self.spec.v_th if self.log_v_th is None else self.log_v_th.exp()

    def decay(self) -> Param:
        """The membrane decay factor: ``spec.tau``, or the learned one (a scalar tensor)."""
        return self.spec.tau if self.tau_logit is None else torch.sigmoid(self.tau_logit)

    def _params(self, x: Tensor) -> tuple[Param, Param, Param]:
        """(v_th, aa, tau) as ``x`` ``[T, N, C, ...]`` takes them: a per-channel threshold broadcasts over dim 2."""
        v_th = self.threshold()
        if isinstance(v_th, Tensor) and v_th.dim() == 1:
            v_th = v_th.view(-1, *([1] * (x.dim() - 3)))
        aa = self.spec.aa
        if self.spec.aa_mode == "relative" and isinstance(v_th, Tensor):
            aa = v_th.detach() * (self.spec.aa / self.spec.v_th)  # the window scales with the threshold (no gradient)
        return v_th, aa, self.decay()

    def forward(self, x: Tensor, return_mask: bool = False):
        """Spikes ``[T, N, ...]``; with ``return_mask``, ``(spikes, mask)`` (see :func:`lif_fused`; the plain loop
        and inference give ``mask=None``)."""
        v_th, aa, tau = self._params(x)
        if self.spec.fast:
            return lif_fused(x, v_th, aa, tau, return_mask)
        out = lif_reference(x, v_th, aa, tau)
        return (out, None) if return_mask else out

    def forward_folded(self, x: Tensor, timesteps: int, return_mask: bool = False):
        """``[T*N, ...]`` in, ``[T*N, ...]`` out: unfolds time, fires, folds back (views, no copies)."""
        out = self(x.view(timesteps, x.shape[0] // timesteps, *x.shape[1:]), return_mask)
        if not return_mask:
            return out.flatten(0, 1)
        out, mask = out
        return out.flatten(0, 1), None if mask is None else mask.flatten(0, 1)

    def extra_repr(self) -> str:
        s = self.spec
        learned = [n for n, p in (("tau", self.tau_logit), ("v_th", self.log_v_th)) if p is not None]
        extra = f", learned={learned}, aa_mode={s.aa_mode}" if learned else ""
        return f"v_th={s.v_th}, aa={s.aa}, tau={s.tau}, fast={s.fast}{extra}"
