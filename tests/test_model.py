"""ResNet-19: the paper's table (shapes, parameter count), readouts, the firing-rate monitor, and learning."""

import pytest
import torch
import torch.nn.functional as F

from stbp import LIF, FiringRateMonitor, TdBN, resnet19
from stbp.data import normalize


def test_resnet19_parameter_count_matches_the_table():
    # Bias-free convolutions, affine tdBN, biased FC layers; the tdBN paper quotes 12.63M for CIFAR.
    assert sum(p.numel() for p in resnet19(in_channels=3).parameters()) == 12_697_994


def test_resnet19_layer_table():
    m = resnet19(in_channels=3)
    convs = [mod for name, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and "shortcut" not in name]
    # stem + 2 convs x (3 + 3 + 2) blocks = 17 conv layers, + 2 FC = 19
    assert len(convs) == 17
    assert [c.out_channels for c in convs] == [128] + [128] * 6 + [256] * 6 + [512] * 4
    assert [c.stride[0] for c in convs if c.stride[0] != 1] == [2, 2]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (512, 256, 10)
    lifs = [mod for mod in m.modules() if isinstance(mod, LIF)]
    assert len(lifs) == 1 + 2 * 8 + 1
    alphas = sorted({round(b.alpha, 6) for b in m.modules() if isinstance(b, TdBN)})
    assert alphas == [round(2**-0.5, 6), 1.0]


@pytest.mark.parametrize("timesteps", [1, 2, 4])
@pytest.mark.parametrize("readout", ["mean", "spikes"])
def test_resnet19_shapes_and_finite_backward(timesteps, readout):
    m = resnet19(width=0.0625, timesteps=timesteps, readout=readout)
    x = torch.randn(3, 1, 28, 28)
    y = m(x)
    assert y.shape == (3, 10)
    y.square().sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if readout == "spikes":  # the reference's readout: firing rates, multiples of 1/T
        assert torch.equal(torch.round(y * timesteps), y * timesteps)


def test_width_scales_every_convolution_but_not_the_spiking_fc_layer():
    m = resnet19(width=0.125)
    convs = [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    full = [c.out_channels for c in resnet19().modules() if isinstance(c, torch.nn.Conv2d)]
    assert convs == [c // 8 for c in full]
    assert m.fc1.in_features == 64 and m.fc1.out_features == 256


def test_resnet19_takes_spikingresnets_own_options_and_a_checkpoints_stored_ones():
    from stbp.core.spec import FIELDS as NEURON_FIELDS
    from stbp.train.checkpoint import NETWORK_KWARGS, build_model_from_checkpoint

    m = resnet19(width=0.0625, hidden=32, v_th=0.3, readout="spikes")
    assert (m.fc1.out_features, m.readout, m.lif1.spec.v_th) == (32, "spikes", 0.3)
    neuron_and_io = {"hidden", "num_classes", "in_channels", "timesteps", "v_th", "aa", "tau", "readout", "fast"}
    neuron_and_io |= {"learn_tau", "learn_v_th", "v_th_granularity", "aa_mode"}
    assert {"width", *NETWORK_KWARGS, *NEURON_FIELDS} == {"width", "arch"} | neuron_and_io
    with pytest.raises(TypeError):
        resnet19(width=0.0625, stem_channels=8)  # the layout is width's
    # What checkpoints hold under model_kwargs, plus a key the model does not take: it is left out. Before
    # NeuronSpec they held its fields flat (fast_lif for fast); now under "neuron".
    io = dict(num_classes=10, in_channels=1, timesteps=2, width=0.0625, readout="spikes")
    old = io | dict(v_th=0.3, aa=0.5, tau=0.25, fast_lif=True, sync_bn=False)
    new = io | dict(neuron=dict(v_th=0.3, aa=0.5, tau=0.25, fast=True), sync_bn=False)
    trained = resnet19(**io, v_th=0.3, aa=0.5, tau=0.25, fast=True)
    x = torch.randn(2, 1, 28, 28)
    for stored in (old, new):
        rebuilt = build_model_from_checkpoint({"model_kwargs": stored, "model": trained.state_dict()}).eval()
        assert rebuilt.lif1.spec == trained.lif1.spec
        torch.testing.assert_close(rebuilt(x), trained.eval()(x))


def test_every_spiking_layer_gets_the_one_neuron_spec():
    from stbp import NeuronSpec, SpikingResNet
    from stbp.core.spec import REFERENCE

    spec = NeuronSpec(v_th=0.3, aa=0.2, learn_v_th=True, v_th_granularity="channel")
    for m in (resnet19(width=0.0625, neuron=spec, readout="spikes"), resnet19(width=0.0625, neuron=vars(spec))):
        lifs = [lif for lif in m.modules() if isinstance(lif, LIF)]
        assert all(lif.spec == spec for lif in lifs) and len({id(lif.spec) for lif in lifs}) == 1
    assert resnet19(width=0.0625).lif1.spec is REFERENCE
    assert resnet19(width=0.0625, neuron=spec, tau=0.5).lif1.spec == NeuronSpec(0.3, 0.2, 0.5, learn_v_th=True,
        v_th_granularity="channel")  # fmt: skip
    with pytest.raises(TypeError, match="NeuronSpec"):
        resnet19(width=0.0625, neuron=0.3)
    with pytest.raises(TypeError, match="NeuronSpec"):
        SpikingResNet(neuron={"v_th": 0.3})
    with pytest.raises(ValueError, match="v_th must be > 0, got -1"):
        resnet19(width=0.0625, v_th=-1)


def test_mean_readout_is_time_mean_of_last_layer():
    m = resnet19(width=0.0625, timesteps=3).eval()
    captured = {}
    m.fc2.register_forward_hook(lambda mod, i, o: captured.setdefault("o", o))
    y = m(torch.randn(2, 1, 28, 28))
    torch.testing.assert_close(y, captured["o"].view(3, 2, 10).mean(0))


def test_fast_and_plain_lif_models_agree():
    torch.manual_seed(0)
    fast = resnet19(width=0.0625)
    plain = resnet19(width=0.0625, fast=False)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 1, 28, 28)
    yf, yp = fast(x), plain(x)
    torch.testing.assert_close(yf, yp, rtol=0, atol=0)
    yf.sum().backward()
    yp.sum().backward()
    for (n, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_two_models_with_different_thresholds_live_in_one_process():
    torch.manual_seed(0)
    a = resnet19(width=0.0625, v_th=0.2)
    b = resnet19(width=0.0625, v_th=0.8)
    with torch.no_grad():  # tdBN makes the network scale-free in v_th at zero bias; a bias breaks that
        for bn in a.modules():
            if isinstance(bn, TdBN):
                bn.bias.fill_(0.1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with FiringRateMonitor(a) as ma, FiringRateMonitor(b) as mb:
        a(x), b(x)
        ra, rb = ma.rates(), mb.rates()
    assert {lif.spec.v_th for lif in a.modules() if isinstance(lif, LIF)} == {0.2}
    assert ra["lif1"] != rb["lif1"]


def test_firing_rate_monitor_counts_spikes_per_layer_against_hooks():
    m = resnet19(width=0.0625, timesteps=2)
    seen = {}
    for name, mod in m.named_modules():
        if isinstance(mod, LIF):
            # Inside the network a LIF returns (spikes, mask) (see LIF.forward); the spikes are what counts.
            mod.register_forward_hook(
                lambda mod, i, o, name=name: seen.setdefault(name, []).append(
                    (o[0] if isinstance(o, tuple) else o).detach().clone()
                )
            )
    mon = FiringRateMonitor(m)
    m(torch.randn(5, 1, 28, 28))
    m(torch.randn(3, 1, 28, 28))
    rates = mon.rates()
    assert list(rates) == list(seen) and "stages.0.0.lif1" in rates and "lif_fc1" in rates
    for name, outs in seen.items():
        expected = sum(o.sum().item() for o in outs) / sum(o.numel() for o in outs)
        assert rates[name] == pytest.approx(expected)
    mon.reset()
    assert all(v == 0 for v in mon.rates().values())
    mon.close()
    m(torch.randn(2, 1, 28, 28))
    assert all(v == 0 for v in mon.rates().values())  # detached: nothing recorded


@pytest.mark.slow
def test_a_few_adam_steps_on_real_mnist_lower_the_loss(mnist):
    torch.manual_seed(0)
    model = resnet19(width=0.125)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = normalize(mnist.train_images[:256])
    y = mnist.train_labels[:256]
    # The loss on batch statistics, as the steps see it: after 48 steps tdBN's running statistics are still a poor
    # estimate (the eval-mode loss of the same weights swings between seeds and thread counts), not the weights.
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    for _ in range(12):
        for xb, yb in zip(x.split(64), y.split(64)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_spike_cost_counts_every_synaptic_operation_like_an_im2col_count(amp):
    """SOPs against a second count: every spiking convolution's input unfolded into its windows (im2col: one column
    per output position, borders and strides included), each spike in a window reaching all C_out outputs; the
    spikes into the pool reach all 256 fc1 units, lif_fc1's all 10 outputs. Energy: 0.9 pJ/SOP + 4.6 pJ/MAC."""
    from stbp.core.conv import SpikeConv2d
    from stbp.train.evaluate import evaluate

    torch.manual_seed(0)
    m = resnet19(width=0.0625, timesteps=2, v_th=0.2)
    sops, spikes, neuron_steps = [0.0], {}, [0]
    for name, mod in m.named_modules():
        if isinstance(mod, SpikeConv2d):

            def count(mod, inputs):
                cols = F.unfold(inputs[0].detach().float(), mod.kernel_size, padding=mod.padding, stride=mod.stride)
                sops[0] += cols.sum().item() * mod.out_channels

            mod.register_forward_pre_hook(count)
        if isinstance(mod, LIF):

            def fired(mod, inputs, out, name=name):
                out = out[0] if isinstance(out, tuple) else out
                spikes[name] = spikes.get(name, 0.0) + out.double().sum().item()
                neuron_steps[0] += out.numel()

            mod.register_forward_hook(fired)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6)
    result = evaluate(m, [(x[:4], y[:4]), (x[4:], y[4:])], "val", amp=amp, firing_rates=True)
    sops = sops[0] + spikes["stages.2.1.lif2"] * 256 + spikes["lif_fc1"] * 10
    macs = 6 * 28 * 28 * 8 * 1 * 9  # the stem: 8 output channels of 3x3 over one input channel, once for all T
    assert sops > 1e4 and result["sops_per_image"] == pytest.approx(sops / 6, rel=1e-12)
    assert result["spikes_per_image"] == pytest.approx(sum(spikes.values()) / 6, rel=1e-12)
    assert result["energy_uj_per_image"] == pytest.approx((0.9 * sops + 4.6 * macs) / 6 * 1e-6, rel=1e-12)
    assert result["firing_rate"] == pytest.approx(sum(spikes.values()) / neuron_steps[0], rel=1e-12)


def test_the_model_config_and_the_model_agree_on_every_option_and_default():
    """The network's options are declared by SpikingResNet (and resnet19's width), the neuron's by NeuronSpec;
    ModelConfig adds their types, ranges and docs. A default changed on one side only would make `resnet19()` and
    the config's network differ."""
    from stbp.config import Config, ModelConfig
    from stbp.core.spec import REFERENCE
    from stbp.train.checkpoint import FLAT_NEURON_KWARGS, NETWORK_KWARGS, model_kwargs

    config = ModelConfig()
    shared = [name for name in NETWORK_KWARGS if hasattr(config, name)]
    assert set(NETWORK_KWARGS) - set(shared) == {"hidden"}  # a layout detail no config sets
    assert set(ModelConfig.__pydantic_fields__) - set(shared) - set(FLAT_NEURON_KWARGS) == {"sync_bn"}  # DDP's
    assert config.neuron == REFERENCE
    torch.manual_seed(0)
    default = resnet19()
    torch.manual_seed(0)
    configured = resnet19(**model_kwargs(Config()))
    assert repr(configured) == repr(default)  # every layer's size, alpha and neuron
    assert (configured.timesteps, configured.readout) == (default.timesteps, default.readout)
    assert configured.lif1.spec == default.lif1.spec


# ---------------------------------------------------------------- event frames


def test_event_frames_run_the_stem_at_every_step_as_by_hand():
    """``[N, T, 2, H, W]``: the stem convolves each step's frame; the rest is the network as for images."""
    torch.manual_seed(0)
    m = resnet19(width=0.0625, timesteps=3, in_channels=2, v_th=0.2).eval()
    frames = torch.log1p(torch.randint(0, 3, (4, 3, 2, 16, 16)).float())
    with torch.no_grad():
        x = torch.cat([m.conv1(frames[:, t]) for t in range(3)])  # [T*N, ...], time-major as the LIFs unfold it
        x, mask = m.lif1.forward_folded(m.bn1(x, m.lif1.threshold()), 3, return_mask=True)
        for stage in m.stages:
            for block in stage:
                x, mask = block(x, mask)
        x = m.lif_fc1.forward_folded(m.fc1(m.pool(x).flatten(1)), 3)
        by_hand = m.fc2(x).view(3, 4, -1)
        torch.testing.assert_close(m(frames, per_step=True), by_hand, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(frames), by_hand.mean(0), rtol=0, atol=1e-6)


def test_the_same_frame_at_every_step_is_direct_encoding():
    torch.manual_seed(0)
    m = resnet19(width=0.0625, timesteps=2, in_channels=2).eval()
    image = torch.rand(3, 2, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(m(image.unsqueeze(1).expand(3, 2, 2, 12, 12)), m(image), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"need T = timesteps = 2, got \(3, 4, 2, 12, 12\)"):
        m(torch.zeros(3, 4, 2, 12, 12))


def test_the_stem_on_event_frames_counts_the_macs_of_the_pixels_with_events():
    """An event-driven stem works only where there are events: C_out MACs for every nonzero input in each window,
    at every step; the spiking layers' SOPs count as for images."""
    from stbp.train.evaluate import evaluate

    torch.manual_seed(0)
    m = resnet19(width=0.0625, timesteps=2, in_channels=2, v_th=0.2)
    counts = torch.randint(0, 3, (5, 2, 2, 10, 10)) * (torch.rand(5, 2, 2, 10, 10) < 0.2)
    frames = torch.log1p(counts.float())
    result = evaluate(m, [(frames, torch.arange(5))], "val", firing_rates=True)
    windows = F.unfold((frames != 0).float().flatten(0, 1), 3, padding=1)  # every step's frames, im2col
    macs = windows.sum().item() * 8  # 8 stem channels at width 0.0625
    assert 0 < macs < 5 * 2 * 10 * 10 * 8 * 2 * 9  # fewer than a dense stem's
    sops = result["sops_per_image"] * 5
    assert result["energy_uj_per_image"] == pytest.approx((0.9 * sops + 4.6 * macs) / 5 * 1e-6, rel=1e-12)
    images = evaluate(m, [(frames[:, 0], torch.arange(5))], "val", firing_rates=True)  # the same model on images:
    dense = 5 * 10 * 10 * 8 * 2 * 9  # every MAC of one stem pass
    assert images["energy_uj_per_image"] == pytest.approx(
        (0.9 * images["sops_per_image"] * 5 + 4.6 * dense) / 5 * 1e-6, rel=1e-12
    )
