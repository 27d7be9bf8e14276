"""SpikeConv2d against nn.Conv2d (the oracle): same outputs and gradients bit for bit, a quarter of the memory
for the saved input."""

import pytest
import torch
from torch import nn

from stbp.core.conv import SpikeConv2d
from stbp.core.model import resnet19


def spikes(*shape, channels_last=False):
    x = (torch.rand(*shape) > 0.7).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pair(cin, cout, k, stride, padding):
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    ours = SpikeConv2d(cin, cout, k, stride=stride, padding=padding)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_gradients_equal_nn_conv2d_exactly(k, stride, padding, channels_last):
    torch.manual_seed(0)
    ref, ours = pair(8, 16, k, stride, padding)
    x = spikes(6, 8, 10, 10, channels_last=channels_last)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert torch.equal(y_ref, y_ours)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    assert torch.equal(x_ref.grad, x_ours.grad)
    assert torch.equal(ref.weight.grad, ours.weight.grad)


def test_under_bf16_autocast_it_matches_what_autocast_does_to_nn_conv2d():
    torch.manual_seed(0)
    ref, ours = pair(8, 16, 3, 1, 1)
    x = spikes(6, 8, 10, 10)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_ours = ref(x_ref), ours(x_ours)
    assert y_ours.dtype == torch.bfloat16 and torch.equal(y_ref, y_ours)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_ours.backward(grad)
    assert ours.weight.grad.dtype == torch.float32 and x_ours.grad.dtype == torch.float32
    assert torch.equal(x_ref.grad, x_ours.grad) and torch.equal(ref.weight.grad, ours.weight.grad)


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, by dtype."""
    seen = {}

    def pack(t):
        seen[t.data_ptr()] = (t.dtype, t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    out = {}
    for dtype, size in seen.values():
        out[dtype] = out.get(dtype, 0) + size
    return out


def test_it_saves_its_input_as_one_byte_per_element():
    ref, ours = pair(8, 16, 3, 1, 1)
    x = spikes(6, 8, 10, 10).requires_grad_()
    weight_bytes = ref.weight.numel() * 4
    assert saved_bytes(lambda: ref(x)) == {torch.float32: x.numel() * 4 + weight_bytes}
    assert saved_bytes(lambda: ours(x)) == {torch.bool: x.numel(), torch.float32: weight_bytes}


def test_without_grad_it_is_a_plain_convolution():
    ref, ours = pair(8, 16, 3, 2, 1)
    x = spikes(2, 8, 9, 9)
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))


class PlainConv(nn.Conv2d):
    """nn.Conv2d that takes (and ignores) the spike mask the blocks hand their convolutions."""

    def forward(self, x, mask=None):
        return super().forward(x)


def test_resnet19_with_spike_convs_trains_exactly_like_plain_convs():
    # The whole network: every SpikeConv2d swapped for an nn.Conv2d with the same weights.
    torch.manual_seed(0)
    ours = resnet19(width=0.0625, timesteps=2)
    plain = resnet19(width=0.0625, timesteps=2)
    for module in list(plain.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SpikeConv2d):
                conv = PlainConv(
                    child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding, bias=False
                )
                setattr(module, child_name, conv)
    plain.load_state_dict(ours.state_dict())  # same keys: checkpoints of either load into the other
    assert sum(isinstance(m, SpikeConv2d) for m in ours.modules()) == 8 * 2 + 2
    assert not any(isinstance(m, SpikeConv2d) for m in plain.modules())
    assert plain.stages[0][0].conv1.__class__ is PlainConv
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for model in (ours, plain):
        nn.functional.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_in_resnet19_the_convolutions_share_the_lifs_bool_spikes():
    # Every bool tensor saved in a training step belongs to a LIF (its spikes and window masks): the
    # convolutions after it save the very same storage, not a copy. Counted by storage, as memory is.
    model = resnet19(width=0.0625, timesteps=2)
    storages = {}

    def pack(t):
        if t.dtype == torch.bool:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(4, 1, 28, 28)).sum().backward()
    lifs = [m for m in model.modules() if type(m).__name__ == "LIF"]
    assert len(storages) == 2 * len(lifs)  # spikes + window per LIF, nothing more
