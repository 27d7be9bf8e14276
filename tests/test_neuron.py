"""The STBP spike function and the LIF layer against hand-computed and analytic oracles."""

import dataclasses

import pytest
import torch

from stbp import LIF, NeuronSpec, lif_fused, lif_reference, spike
from stbp.core.spec import REFERENCE


@pytest.mark.parametrize(
    "u, expected_spike, expected_grad",
    [
        # v_th = 0.5, aa = 0.25 (all exactly representable): window is the open interval (0.25, 0.75).
        (0.50, 0.0, 2.0),  # at threshold: no spike (strict >), centre of the window
        (0.60, 1.0, 2.0),  # inside, above threshold
        (0.30, 0.0, 2.0),  # inside, below threshold
        (0.75, 1.0, 0.0),  # upper edge: outside (open window)
        (0.25, 0.0, 0.0),  # lower edge: outside
        (0.80, 1.0, 0.0),  # outside above
        (0.00, 0.0, 0.0),  # outside below: the reference's window centred at 0 would give 2.0 here
        (-0.1, 0.0, 0.0),
    ],
)
def test_spike_forward_is_heaviside_and_surrogate_is_rectangle_centred_at_threshold(u, expected_spike, expected_grad):
    x = torch.tensor([u], dtype=torch.float64, requires_grad=True)
    o = spike(x, v_th=0.5, aa=0.25)
    o.backward()
    assert o.item() == expected_spike
    assert x.grad.item() == pytest.approx(expected_grad)  # 1/(2*aa) inside, 0 outside


def test_surrogate_height_is_one_over_twice_the_half_width():
    for aa in (0.1, 0.5, 2.0):
        x = torch.tensor([0.4], requires_grad=True)
        spike(x, v_th=0.4, aa=aa).backward()
        assert x.grad.item() == pytest.approx(1 / (2 * aa))


def test_lif_matches_hand_computed_four_step_sequence():
    # tau = 0.5, v_th = 1.0; inputs chosen so every value is exact in binary.
    # t0: u = 0.75             -> no spike
    # t1: u = 0.5*0.75 + 0.75 = 1.125 -> spike
    # t2: u = 0.5*1.125*(1-1) + 0.5 = 0.5 -> no spike (reset)
    # t3: u = 0.5*0.5 + 1.0 = 1.25 -> spike
    x = torch.tensor([0.75, 0.75, 0.5, 1.0]).view(4, 1)
    expected_u = [0.75, 1.125, 0.5, 1.25]
    expected_o = [0.0, 1.0, 0.0, 1.0]
    spikes, membrane = lif_reference(x, 1.0, 0.5, 0.5, return_membrane=True)
    assert membrane.flatten().tolist() == expected_u
    assert spikes.flatten().tolist() == expected_o
    assert lif_fused(x, 1.0, 0.5, 0.5).flatten().tolist() == expected_o
    # Gradients of o_3 with the window |u - 1| < 0.3, i.e. s = 1/0.6 at u = 0.75, 1.125, 1.25 and 0 at u = 0.5.
    xg = x.clone().requires_grad_(True)
    lif_reference(xg, 1.0, 0.3, 0.5)[3].sum().backward()
    # dO3/dx3 = 1/(2*0.3); dO3/dx2: u3 = 0.5*u2*(1-o2) + x3, o2 = 0 and u2 = 0.5 is outside the window
    # so dO3/dx2 = s3 * 0.5 * (1 - o2) = (1/0.6)*0.5.
    assert xg.grad[3].item() == pytest.approx(1 / 0.6)
    assert xg.grad[2].item() == pytest.approx(0.5 / 0.6)
    # Through x2 -> u2 -> ... u1 -> (reset term) d u2 / d u1 = tau*(1-o1) - tau*u1*do1/du1 = 0 - 0.5*1.125/0.6
    # and d u2/d x1 = that; then d O3/d x1 = s3 * 0.5 * (1 - o2) * du2/dx1 = (1/0.6)*0.5*(-0.5*1.125/0.6)
    assert xg.grad[1].item() == pytest.approx((1 / 0.6) * 0.5 * (-0.5 * 1.125 / 0.6))
    # d u1/d u0 = tau*(1 - o0) - tau*u0*s0 = 0.5 - 0.5*0.75/0.6 = -0.125
    assert xg.grad[0].item() == pytest.approx(xg.grad[1].item() * -0.125)
    xf = x.clone().requires_grad_(True)
    lif_fused(xf, 1.0, 0.3, 0.5)[3].sum().backward()
    torch.testing.assert_close(xf.grad, xg.grad, rtol=0, atol=1e-6)


def _rand_drive(shape, seed, v_th=0.4, aa=0.5):
    # Uniform on [v_th - 2aa, v_th + 2aa]: about half the first step falls inside the surrogate window.
    g = torch.Generator().manual_seed(seed)
    return v_th + (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5) * 4 * aa


@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 4, 5, 5), (4, 2, 8, 3, 3), (6, 5, 16), (3, 2, 3, 1, 9)])
@pytest.mark.parametrize("params", [(0.4, 0.5, 0.25), (0.3, 0.1, 0.5), (1.0, 0.8, 1.0)])
def test_fused_lif_equals_plain_loop_forward_exactly_and_gradients_to_1e6(shape, params):
    v_th, aa, tau = params
    x = _rand_drive(shape, seed=sum(shape), v_th=v_th, aa=aa)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    o1 = lif_reference(x1, v_th, aa, tau)
    o2 = lif_fused(x2, v_th, aa, tau)
    assert torch.equal(o1, o2)
    with torch.no_grad():  # the inference path (nothing saved for backward) gives the same spikes
        assert torch.equal(lif_fused(x, v_th, aa, tau), o1)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (o1 * w).sum().backward()
    (o2 * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)
    assert x1.grad.abs().sum() > 0  # the comparison is not vacuous


def test_fused_lif_gradients_are_bit_identical_to_autograd_of_the_loop_on_cpu():
    # Stronger than the 1e-6 contract: the fused backward evaluates each term in autograd's order.
    x = _rand_drive((4, 6, 5, 3, 3), seed=11, v_th=0.3, aa=0.2)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (lif_reference(a, 0.3, 0.2, 0.5) * w).sum().backward()
    (lif_fused(b, 0.3, 0.2, 0.5) * w).sum().backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_lif_equals_plain_loop_on_cuda():
    x = _rand_drive((4, 8, 16, 6, 6), seed=3).cuda()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    assert torch.equal(lif_reference(x1, 0.4, 0.5, 0.25), lif_fused(x2, 0.4, 0.5, 0.25))
    lif_reference(x1, 0.4, 0.5, 0.25).sum().backward()
    lif_fused(x2, 0.4, 0.5, 0.25).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)


def test_fused_lif_in_float64_matches_autograd_of_the_loop_to_rounding():
    # The fused backward is a hand-derived recurrence; in fp64 it must agree with autograd to ~1e-12.
    x = _rand_drive((5, 3, 4), seed=9).double().requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    w = torch.arange(60.0, dtype=torch.float64).view(5, 3, 4)
    (lif_reference(x, 0.4, 0.5, 0.25) * w).sum().backward()
    (lif_fused(y, 0.4, 0.5, 0.25) * w).sum().backward()
    assert lif_fused(y, 0.4, 0.5, 0.25).dtype == torch.float64
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=1e-12)


def test_lif_keeps_no_state_between_calls_and_two_thresholds_coexist():
    x = _rand_drive((3, 4, 10), seed=5)
    a, b = LIF(v_th=0.2), LIF(v_th=0.9)
    first = a(x)
    b(x)
    assert torch.equal(a(x), first)
    assert a(x).sum() > b(x).sum()


@pytest.mark.parametrize("kwargs", [dict(v_th=0), dict(v_th=-1), dict(aa=0), dict(tau=0), dict(tau=1.5)])
def test_lif_rejects_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LIF(**kwargs)


def test_the_mask_is_the_layers_own_bool_copy_of_its_spikes():
    torch.manual_seed(0)
    lif = LIF(v_th=0.4, aa=0.5, tau=0.25)
    x = torch.randn(3, 4, 5, requires_grad=True)
    out, mask = lif(x, return_mask=True)
    assert mask.dtype == torch.bool and torch.equal(mask, out.bool()) and not mask.requires_grad
    assert torch.equal(out, lif(x))
    with torch.no_grad():
        assert lif(x, return_mask=True)[1] is None  # inference keeps nothing to share
    folded, folded_mask = lif.forward_folded(x.reshape(12, 5), 3, return_mask=True)
    assert torch.equal(folded_mask, folded.bool()) and folded.shape == (12, 5)


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(v_th=-0.1), "v_th must be > 0, got -0.1"),
        (dict(v_th=0), "v_th must be > 0, got 0"),
        (dict(aa=0.0), "aa must be > 0, got 0.0"),
        (dict(tau=0), "tau must be in (0, 1], got 0"),
        (dict(tau=1.5), "tau must be in (0, 1], got 1.5"),
        (dict(tau=1.0, learn_tau=True), "learn_tau needs tau < 1 (tau = sigmoid(w) never reaches 1), got tau=1.0"),
        (dict(v_th_granularity="layers"), "v_th_granularity must be one of ('layer', 'channel'), got 'layers'"),
        (dict(aa_mode="scaled"), "aa_mode must be one of ('fixed', 'relative'), got 'scaled'"),
        (dict(v_th="0.4"), "v_th must be a number, got '0.4'"),
    ],
)
def test_a_neuron_spec_names_the_field_and_the_value_it_refuses(fields, message):
    with pytest.raises(ValueError) as err:
        NeuronSpec(**fields)
    assert str(err.value) == message
    with pytest.raises(ValueError, match=next(iter(fields))):
        dataclasses.replace(REFERENCE, **fields)  # a derived spec is checked too


def test_the_reference_spec_is_the_default_frozen_and_takes_any_real_number():
    assert REFERENCE == NeuronSpec() and (REFERENCE.v_th, REFERENCE.aa, REFERENCE.tau) == (0.4, 0.5, 0.25)
    assert (REFERENCE.fast, REFERENCE.learn_tau, REFERENCE.learn_v_th) == (True, False, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        REFERENCE.v_th = 0.3  # type: ignore[misc]
    spec = NeuronSpec(v_th=1, aa=1, tau=1)
    assert spec == NeuronSpec(1.0, 1.0, 1.0) and LIF(spec).threshold() == 1.0  # an int is a number too


def test_lif_fields_are_overrides_of_its_spec():
    lif = LIF(v_th=0.3)
    assert lif.spec == dataclasses.replace(REFERENCE, v_th=0.3) == LIF(dataclasses.replace(REFERENCE, v_th=0.3)).spec
    assert LIF().spec is REFERENCE and LIF(NeuronSpec(aa=0.2), tau=0.5).spec == NeuronSpec(aa=0.2, tau=0.5)
    assert (lif.threshold(), lif.decay()) == (0.3, 0.25)  # fixed: the spec's numbers
    with pytest.raises(TypeError, match="NeuronSpec"):
        LIF(0.3)  # the old positional v_th
    with pytest.raises(TypeError):
        LIF(v_threshold=0.3)
    with pytest.raises(ValueError, match="needs the layer's channels"):
        LIF(learn_v_th=True, v_th_granularity="channel")
