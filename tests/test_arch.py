"""The tdBN paper's ImageNet networks, ResNet-18 and ResNet-34 (:func:`stbp.resnet18`, :func:`stbp.resnet34`): their
layout against torchvision's, shapes on small images, a few steps that learn, the spike cost, and checkpoints that
name their network (:func:`stbp.build_network`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stbp import LIF, FiringRateMonitor, TdBN, build_network, load_checkpoint, resnet18, resnet19, resnet34
from stbp.core.conv import SpikeConv2d
from stbp.train.checkpoint import (
    CheckpointError,
    build_model_from_checkpoint,
    model_config_fields,
    model_kwargs,
    save_checkpoint,
)

BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
FACTORY = {"resnet18": resnet18, "resnet34": resnet34}


def shapes_of(model: nn.Module, kind: type) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_the_layout_is_torchvisions_conv_for_conv_and_tdbn_for_batchnorm(arch):
    """An independent oracle: torchvision's ResNet-18/34 (He et al. 2016) has the same convolutions (in the same
    order: stem, then per block conv1, conv2 and the 1x1 downsampling one), BatchNorm where tdBN is, and the same
    classifier; so the parameter counts agree, part by part."""
    import torchvision.models as tv

    ours, theirs = FACTORY[arch](), getattr(tv, arch)(weights=None)  # defaults: 3 channels in, 1,000 classes out
    assert shapes_of(ours, nn.Conv2d) == shapes_of(theirs, nn.Conv2d)
    assert shapes_of(ours, TdBN) == shapes_of(theirs, nn.BatchNorm2d)
    assert (ours.fc.in_features, ours.fc.out_features) == (theirs.fc.in_features, theirs.fc.out_features) == (512, 1000)

    def count(model, kinds):
        return sum(p.numel() for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False))

    assert count(ours, (nn.Conv2d, nn.Linear)) == count(theirs, (nn.Conv2d, nn.Linear))
    assert count(ours, TdBN) == count(theirs, nn.BatchNorm2d)  # tdBN's affine pair is BatchNorm's
    total = sum(p.numel() for p in ours.parameters())
    assert total == sum(p.numel() for p in theirs.parameters())
    assert total == {"resnet18": 11_689_512, "resnet34": 21_797_672}[arch]  # what the docstrings say
    assert [len(stage) for stage in ours.stages] == BLOCKS[arch]
    assert (ours.conv1.kernel_size, ours.conv1.stride, ours.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert ours.fc1 is None and ours.lif_fc1 is None and not hasattr(ours, "fc2")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
@pytest.mark.parametrize("readout", ["mean", "spikes"])
def test_small_images_pass_the_stem_the_pool_and_four_stages_in_the_expected_shapes(arch, readout):
    """3x64x64 at width 1/8, T=2: the stem halves the image (32), the max pool again (16), then the stages 16, 8, 4,
    2; every spiking layer reports its rate; a backward pass reaches every parameter."""
    torch.manual_seed(0)
    model = build_network(arch, 0.125, timesteps=2, num_classes=10, readout=readout)
    seen = {}
    for name, module in [("conv1", model.conv1), ("maxpool", model.maxpool)] + [
        (f"stages.{i}", stage[-1])
        for i, stage in enumerate(model.stages)  # a stage's output: its last block's
    ]:
        module.register_forward_hook(lambda m, i, out, name=name: seen.setdefault(name, out))
    x = torch.randn(3, 3, 64, 64)
    logits, rates = model(x, rates=True)
    assert logits.shape == (3, 10) and model(x, per_step=True).shape == (2, 3, 10)
    assert seen["conv1"].shape == (3, 8, 32, 32)  # convolved once, then repeated over T (direct encoding)
    assert seen["maxpool"].shape == (2 * 3, 8, 16, 16)
    stages = [tuple(seen[f"stages.{i}"][0].shape) for i in range(4)]  # (spikes, mask) per stage
    assert stages == [(6, 8, 16, 16), (6, 16, 8, 8), (6, 32, 4, 4), (6, 64, 2, 2)]
    pooled = seen["maxpool"]
    assert torch.equal(pooled, (pooled > 0).float())  # the max of spikes: still 0s and 1s
    assert rates.shape == (1 + 2 * sum(BLOCKS[arch]) + (readout == "spikes"),)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if readout == "spikes":  # firing rates of the output layer: multiples of 1/T
        assert torch.equal(torch.round(logits * 2), logits * 2)


def test_after_the_pool_the_first_convolution_keeps_its_own_bool_copy_and_trains_like_a_plain_one():
    """The LIF's mask has the unpooled shape, so the pool hands None on: the first block's conv1 saves the pooled
    spikes as bool itself (one storage more than the LIFs' own), and the gradients are those of nn.Conv2d's."""
    torch.manual_seed(0)
    model = resnet18(width=0.0625, timesteps=2, num_classes=4)
    storages = set()

    def pack(t):
        if t.dtype == torch.bool:
            storages.add(t.untyped_storage().data_ptr())
        return t

    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y).backward()
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert len(storages) == 2 * len(lifs) + 1  # spikes and window per LIF, and the pooled spikes
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    for module in model.modules():  # the same network, every spike convolution computed by F.conv2d
        if isinstance(module, SpikeConv2d):
            module.forward = lambda s, mask=None, conv=module: F.conv2d(s, conv.weight, None, conv.stride, conv.padding)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, ours[name]), name


def test_a_few_adam_steps_on_four_images_learn_them():
    """40 Adam steps on a fixed batch of four random images with four labels: the loss falls to a fraction of its
    start and every image is then classified right (eval mode, tdBN's running statistics)."""
    torch.manual_seed(0)
    model = resnet18(width=0.125, timesteps=2, num_classes=4)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.35 * losses[0], losses
    with torch.no_grad():
        assert torch.equal(model.eval()(x).argmax(1), y)


def test_the_spike_cost_counts_the_stem_the_pooled_spikes_and_the_classifier():
    """SOPs: every spiking convolution's windows (unfolded, as an im2col count) plus the last block's spikes times
    the classes they reach through the pool; MACs: the 7x7 stem once for all T."""
    torch.manual_seed(0)
    model = resnet18(width=0.0625, timesteps=2, num_classes=7, v_th=0.2).eval()
    assert model.dense_fan_outs() == {"stages.3.1.lif2": 7}
    reached = []

    def unfold(conv, inputs):
        cols = F.unfold(inputs[0].double(), conv.kernel_size, padding=conv.padding, stride=conv.stride)
        reached.append(cols.sum().item() * conv.out_channels)

    for m in model.modules():
        if isinstance(m, SpikeConv2d):
            m.register_forward_pre_hook(unfold)
    x = torch.randn(5, 3, 32, 32)
    with FiringRateMonitor(model) as monitor, torch.no_grad():
        model(x)
        spikes, _ = monitor.totals()
        total, sops, macs = monitor.cost_totals(spikes.double()).tolist()
        rates = monitor.rates()
    last = spikes[monitor.names.index("stages.3.1.lif2")].item()
    assert len(reached) == 8 * 2 + 3 and sum(reached) > 1e3
    assert sops == pytest.approx(sum(reached) + 7 * last, rel=1e-12)
    assert macs == 5 * 4 * 16 * 16 * 3 * 7 * 7  # 4 stem channels at 16x16, 7x7 over 3 input channels
    assert total == pytest.approx(spikes.sum().item())
    assert list(rates)[0] == "lif1" and len(rates) == 17 and all(0 <= r <= 1 for r in rates.values())


def test_every_factory_names_its_network_and_refuses_another():
    assert [type(m).__name__ for m in (resnet19(width=0.0625, arch="resnet19"),)] == ["SpikingResNet"]
    with pytest.raises(ValueError, match="build_network"):
        resnet18(arch="resnet34")
    with pytest.raises(ValueError, match="arch must be one of resnet19, resnet18, resnet34"):
        build_network("resnet50")
    with pytest.raises(TypeError):
        resnet34(stem="cifar")  # the layout is the factory's
    assert build_network(width=0.0625).fc1.out_features == 256  # the default: ResNet-19 with its spiking FC
    m = resnet18(width=0.0625, hidden=32, num_classes=5)  # a spiking FC layer on request
    assert (m.fc1.out_features, m.fc2.out_features, m.dense_fan_outs()["lif_fc1"]) == (32, 5, 5)


def small_config(arch: str):
    from stbp.config import build_config

    overrides = {"arch": arch, "width": 0.0625, "in_channels": 3, "num_classes": 6, "timesteps": 2}
    return build_config(overrides=overrides | {"learn_v_th": True, "output_dir": "unused"})


def test_a_resnet34_checkpoint_round_trips_to_the_same_logits(tmp_path):
    from stbp.config import config_to_dict

    cfg = small_config("resnet34")
    torch.manual_seed(0)
    model = build_network(**model_kwargs(cfg))
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # weights, thresholds and tdBN's running statistics away from their initial values
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
    state = {"model_kwargs": model_kwargs(cfg), "model": model.state_dict(), "config": config_to_dict(cfg)}
    assert state["model_kwargs"]["arch"] == "resnet34"
    save_checkpoint(state, tmp_path / "best.pt")
    loaded, loaded_cfg = load_checkpoint(tmp_path / "best.pt")
    assert loaded_cfg.model.arch == "resnet34" and [len(s) for s in loaded.stages] == BLOCKS["resnet34"]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("arch", ["resnet19", "resnet18", "resnet34"])
def test_build_model_from_checkpoint_builds_the_network_the_checkpoint_names(arch):
    torch.manual_seed(0)
    kwargs = model_kwargs(small_config(arch))
    trained = build_network(**kwargs)
    rebuilt = build_model_from_checkpoint({"model_kwargs": kwargs, "model": trained.state_dict()})
    assert repr(rebuilt) == repr(trained)
    assert model_config_fields(kwargs)["arch"] == arch
    other = "resnet18" if arch == "resnet34" else "resnet34"
    with pytest.raises(CheckpointError, match="do not match"):
        build_model_from_checkpoint({"model_kwargs": kwargs | {"arch": other}, "model": trained.state_dict()})


def test_a_checkpoint_that_names_no_network_is_a_resnet19():
    """Checkpoints written before ``arch`` existed: their model_kwargs rebuild ResNet-19 and say so."""
    kwargs = model_kwargs(small_config("resnet19"))
    del kwargs["arch"]
    trained = resnet19(**kwargs)
    rebuilt = build_model_from_checkpoint({"model_kwargs": kwargs, "model": trained.state_dict()})
    assert repr(rebuilt) == repr(trained) and model_config_fields(kwargs)["arch"] == "resnet19"


def test_a_registered_imagenet_model_is_exported_for_its_crops():
    """The registry's example input (what torch.export traces) has the data set's image size: ImageNet's 224
    pixels, or the config's image_size; and the description names the network."""
    from stbp.config import build_config
    from stbp.tracking.registry import describe, input_shape

    cfg = build_config(preset="imagenet")
    assert input_shape(cfg) == (3, 224, 224)
    assert describe(cfg, input_shape(cfg)).startswith("Spiking ResNet-34 (STBP, tdBN) on imagenet")
    assert input_shape(build_config(preset="imagenet", overrides={"image_size": 96})) == (3, 96, 96)


def test_the_imagenet_preset_is_the_papers_network_at_its_timesteps():
    from stbp.config import build_config

    cfg = build_config(preset="imagenet")
    assert (cfg.data.dataset, cfg.model.arch, cfg.model.timesteps) == ("imagenet", "resnet34", 6)
    assert (cfg.model.in_channels, cfg.model.num_classes) == (3, 1000)
