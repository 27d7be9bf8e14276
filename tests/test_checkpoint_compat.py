"""Checkpoints written before :class:`~stbp.core.spec.NeuronSpec` (neuron fields flat in ``model_kwargs``) still
load, and give the network they were trained as: a committed one, written by the old code, against what the old
code's ``load_checkpoint`` model gave on 8 MNIST test images (``torch.set_num_threads(1)``): its logits, and the
spikes of every layer per image and channel. The logits alone would not do: that small network's last layers are
silent, so its logits are fc2's bias for every image; the spike counts see every threshold that fires."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from stbp import LIF, NeuronSpec, load_checkpoint, resnet19
from stbp.train.checkpoint import model_config_fields, model_kwargs, read_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint_stbp1_learned.pt"
LOGITS = FIXTURES / "checkpoint_stbp1_learned_logits.pt"
SPIKES = FIXTURES / "checkpoint_stbp1_learned_spikes.pt"
#: How SPIKES was made, by the package before NeuronSpec (commit 4856659), with OMP_NUM_THREADS=1 (argv: CHECKPOINT,
#: LOGITS, SPIKES): every LIF layer's spikes on LOGITS' images, summed over time and space, ``[N, C]`` int32.
SPIKES_SCRIPT = """
import sys, torch
from torch.torch_version import TorchVersion
from stbp import LIF, load_checkpoint
torch.set_num_threads(1)
ckpt, logits, out = sys.argv[1:4]
with torch.serialization.safe_globals([TorchVersion]):
    images = torch.load(logits, weights_only=True)["images"]
model, _ = load_checkpoint(ckpt)
counts, layers = [], []
def hook(mod, inputs, output):
    spikes = output[0] if isinstance(output, tuple) else output
    per_image = spikes.detach().sum(0)  # [N, C, ...] over time
    counts.append((per_image.flatten(2).sum(-1) if per_image.dim() > 2 else per_image).int())  # [N, C]
for name, mod in model.named_modules():
    if isinstance(mod, LIF):
        layers.append(name)
        mod.register_forward_hook(hook)
with torch.no_grad():
    model(images)
torch.save({"layers": layers, "counts": counts, "torch": str(torch.__version__)}, out)
"""
#: What the checkpoint's (flat) model_kwargs say: v_th 0.35, aa 0.45, tau 0.3, fast_lif, everything learned.
OLD_NEURON = NeuronSpec(
    v_th=0.35, aa=0.45, tau=0.3, fast=True, learn_tau=True, learn_v_th=True, v_th_granularity="channel",
    aa_mode="relative",
)  # fmt: skip


def load_golden(path: Path) -> dict:
    """A fixture of golden tensors; its ``"torch"`` (the version that wrote it) is a TorchVersion."""
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(path, weights_only=True)


def test_a_checkpoint_from_before_neuron_specs_rebuilds_with_its_spec_and_its_logits():
    """``torch.equal`` with the logits the old code computed; under another torch build than the one that wrote
    them (``golden["torch"]``) the bits may differ, and ``assert_close(rtol=1e-5, atol=1e-6)`` is the test."""
    stored = read_checkpoint(CHECKPOINT)["model_kwargs"]
    assert "neuron" not in stored and stored["fast_lif"] is True  # the old form, flat
    golden = load_golden(LOGITS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, cfg = load_checkpoint(CHECKPOINT)
        with torch.no_grad():
            logits = model(golden["images"])
    finally:
        torch.set_num_threads(threads)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert lifs and all(lif.spec == OLD_NEURON for lif in lifs)
    assert cfg.model.neuron == OLD_NEURON
    assert lifs[0].log_v_th.shape == (lifs[0].log_v_th.numel(),) and lifs[0].tau_logit is not None
    if str(golden["torch"]) == torch.__version__:
        assert torch.equal(logits, golden["logits"])
    else:
        torch.testing.assert_close(logits, golden["logits"], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_before_neuron_specs_fires_every_layer_as_the_old_code_did():
    """Spikes per image and channel of every LIF layer, equal to the old code's. Spikes are 0 or 1: another torch
    build may round a membrane differently and flip one, so there the counts may differ by a few in all."""
    golden = torch.load(SPIKES, weights_only=True)
    images = load_golden(LOGITS)["images"]
    model, _ = load_checkpoint(CHECKPOINT)
    layers = [name for name, m in model.named_modules() if isinstance(m, LIF)]
    counts = {}

    def count(name):
        def hook(mod, inputs, output):
            per_image = (output[0] if isinstance(output, tuple) else output).detach().sum(0)  # [N, C, ...]
            counts[name] = (per_image.flatten(2).sum(-1) if per_image.dim() > 2 else per_image).int()

        return hook

    for name in layers:
        model.get_submodule(name).register_forward_hook(count(name))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model(images)
    finally:
        torch.set_num_threads(threads)
    assert layers == golden["layers"] and sum(int(c.sum()) for c in golden["counts"]) > 10_000
    if golden["torch"] == torch.__version__:
        for name, expected in zip(layers, golden["counts"]):
            assert torch.equal(counts[name], expected), name
    else:
        flips = sum(int((counts[n] - c).abs().sum()) for n, c in zip(layers, golden["counts"]))
        assert flips <= 10, flips


def test_what_a_checkpoint_stores_now_is_plain_and_rebuilds_the_configs_network():
    """``model_kwargs``: the network's keywords and the neuron as a dict of plain values, which
    ``torch.load(weights_only=True)`` reads back and ``resnet19`` (its ``arch``) takes as they are."""
    import io

    _, cfg = load_checkpoint(CHECKPOINT)
    kwargs = model_kwargs(cfg)
    assert kwargs == {
        "arch": "resnet19",  # the network's name; checkpoints without it are ResNet-19s
        "width": 0.0625,
        "in_channels": 1,
        "num_classes": 10,
        "timesteps": 2,
        "readout": "mean",
        "neuron": dataclasses.asdict(OLD_NEURON),
    }
    buffer = io.BytesIO()
    torch.save(kwargs, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == kwargs
    assert resnet19(**kwargs).lif1.spec == OLD_NEURON


def test_a_checkpoints_model_kwargs_of_either_version_say_the_config_fields_it_was_trained_as():
    """What a resume compares when a checkpoint has no config: the same fields from the old flat form and the
    new nested one."""
    from stbp.config import config_to_dict

    state = read_checkpoint(CHECKPOINT)
    cfg = load_checkpoint(CHECKPOINT)[1]
    expected = {k: v for k, v in config_to_dict(cfg)["model"].items() if k != "sync_bn"}  # DDP's, not stored
    assert model_config_fields(state["model_kwargs"]) == expected == model_config_fields(model_kwargs(cfg))
