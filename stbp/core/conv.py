"""A convolution over spikes that keeps its input for the backward pass as 1 byte per element, not 4.

Autograd saves a convolution's input for the weight gradient. Inside the network that input is a spike tensor
of exact 0s and 1s, stored as float: 4 bytes for 1 bit of information, and the largest part of the memory a
training step holds. :class:`SpikeConv2d` saves it as ``torch.bool`` and widens it again in the backward pass,
which then calls the very kernel autograd would (``aten.convolution_backward``): gradients are bit-identical to
``nn.Conv2d``'s. Parameters and state dicts are those of ``nn.Conv2d``.

Contract: the input holds only 0s and 1s (LIF output). It is not checked, which would cost a device sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpikeConv2d", "spike_conv2d"]


class _SpikeConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spikes: Tensor, mask, weight: Tensor, stride, padding, dtype: torch.dtype) -> Tensor:
        # ``dtype`` is the compute dtype autocast would choose; the cast weight is not kept (recast in backward).
        ctx.stride, ctx.padding, ctx.dtype = stride, padding, dtype
        ctx.save_for_backward(spikes.to(torch.bool) if mask is None else mask, weight)
        return F.conv2d(spikes.to(dtype), weight.to(dtype), None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        packed, weight = ctx.saved_tensors
        grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out.to(ctx.dtype),
            packed.view(torch.uint8).to(ctx.dtype),  # exact (0s and 1s); via uint8: bool casts are slow on CPU
            weight.to(ctx.dtype),
            None,  # no bias
            ctx.stride,
            ctx.padding,
            (1, 1),  # dilation
            False,  # transposed
            (0, 0),  # output padding
            1,  # groups
            (ctx.needs_input_grad[0], ctx.needs_input_grad[2], False),
        )
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_in, None, grad_w, None, None, None


def spike_conv2d(spikes: Tensor, weight: Tensor, stride=(1, 1), padding=(0, 0), mask: Tensor | None = None) -> Tensor:
    """``F.conv2d(spikes, weight, None, stride, padding)`` for a 0/1 ``spikes`` tensor, saving it as bool.

    ``mask``: ``spikes`` as bool, already kept by the layer that fired them (:meth:`LIF.forward_folded` with
    ``return_mask``); saved instead of a new copy."""
    device = spikes.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if not (torch.is_grad_enabled() and weight.requires_grad):  # inference: nothing is saved anyway
        return F.conv2d(spikes.to(dtype), weight.to(dtype), None, stride, padding)
    with torch.autocast(device, enabled=False):  # the dtype is chosen above, as autocast would
        return _SpikeConv2d.apply(spikes, mask, weight, tuple(stride), tuple(padding), dtype)


class SpikeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (no bias, no dilation or groups) whose input is a spike tensor; see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)

    def forward(self, spikes: Tensor, mask: Tensor | None = None) -> Tensor:
        return spike_conv2d(spikes, self.weight, self.stride, self.padding, mask)
