"""NIR export (stbp.core.nir_graph, python -m stbp.export): the graph read back by SpikingJelly 2.0's importer (and
snnTorch's) fires every spike the project's model fires, in float64, for plain, learned-neuron, downsampling, event,
max-pool and spiking-readout networks; a trained checkpoint exported by the command and read where ``stbp`` cannot be
imported agrees on real MNIST."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stbp.core.model import resnet18, resnet19
from stbp.core.neuron import LIF
from stbp.core.tdbn import TdBN

nir = pytest.importorskip("nir")
pytest.importorskip("spikingjelly")

from stbp.core.nir_graph import NIRExportError, lif_names, spikingjelly_run, to_nir  # noqa: E402
from tests._procs import WITHOUT_STBP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_stbp1_learned.pt"


def lively(model, x: torch.Tensor, seed: int = 0):
    """``model`` in float64 and eval mode, its tdBN affines spread and its running statistics those of ``x`` (so
    that every layer fires)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TdBN):
                m.weight.copy_(1 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.momentum = 1.0  # running statistics := this batch's
        model.train()
        model(x)
    return model.eval()


@torch.no_grad()
def project_spikes(model, x) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The model's per-step output ``[T, N, K]`` and every LIF's spikes ``[T, N, ...]`` by NIR node name."""
    spikes, handles = {}, []
    modules = dict(model.named_modules())
    for path, node in lif_names(model).items():
        record = lambda m, a, out, node=node: spikes.__setitem__(node, (out[0] if isinstance(out, tuple) else out))
        handles.append(modules[path].register_forward_hook(record))
    out = model(x, per_step=True)
    for h in handles:
        h.remove()
    return out.numpy(), {k: v.numpy() for k, v in spikes.items()}


def steps(x: torch.Tensor, timesteps: int) -> np.ndarray:
    """The model's input as NIR's importers take it, ``[T, N, C, H, W]``."""
    seq = x.transpose(0, 1) if x.dim() == 5 else x.unsqueeze(0).expand(timesteps, *x.shape)
    return seq.contiguous().numpy()


def assert_same_spikes(model, x, tmp_path, input_shape) -> dict[str, np.ndarray]:
    """Export, read through SpikingJelly, and require every spike identical and every layer firing."""
    path = tmp_path / "model.nir"
    nir.write(str(path), to_nir(model, input_shape))
    out, spikes = project_spikes(model, x)
    sj_out, sj_spikes = spikingjelly_run(str(path), steps(x, model.timesteps), full=True)
    assert sorted(set(sj_spikes) - {"maxpool"}) == sorted(spikes)  # the max pool's LIF: checked on its own
    silent = [name for name, s in spikes.items() if not s.any()]
    assert not silent, f"layers that never fire test nothing: {silent}"
    for name, s in spikes.items():
        assert np.array_equal(sj_spikes[name].reshape(s.shape), s), name
    np.testing.assert_allclose(sj_out, out, rtol=0, atol=1e-12)
    return spikes


def test_a_plain_resnet19_fires_every_spike_it_fires_in_spikingjelly(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    model = lively(resnet19(width=0.0625, timesteps=2), x)
    assert_same_spikes(model, x, tmp_path, (1, 28, 28))


def test_learned_per_channel_thresholds_and_tau_are_folded_exactly(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    model = resnet19(width=0.0625, timesteps=3, learn_v_th=True, v_th_granularity="channel", learn_tau=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LIF):
                m.log_v_th.add_(0.3 * torch.randn_like(m.log_v_th))  # thresholds from ~0.3 to ~0.6, channel by channel
                m.tau_logit.add_(0.8 * torch.randn_like(m.tau_logit))
    model = lively(model, x)
    taus = {float(m.decay().detach()) for m in model.modules() if isinstance(m, LIF)}
    assert len(taus) > 10
    graph = to_nir(model, (1, 28, 28))
    assert any(name.endswith("_shortcut") and graph.nodes[name].weight.shape[-1] == 1 for name in graph.nodes)
    assert_same_spikes(model, x, tmp_path, (1, 28, 28))


def test_downsampling_blocks_export_their_1x1_shortcut(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    model = lively(resnet19(width=0.0625, timesteps=2), x)
    graph = to_nir(model, (1, 16, 16))
    shortcut = graph.nodes["stages_1_0_shortcut"]
    assert tuple(shortcut.weight.shape[-2:]) == (1, 1) and tuple(shortcut.stride) == (2, 2)
    assert ("stages_1_0_shortcut", "stages_1_0_lif2") in graph.edges
    assert ("stages_1_0_conv2", "stages_1_0_lif2") in graph.edges
    assert ("stages_0_1_lif2", "stages_0_2_lif2") in graph.edges  # an identity shortcut: the spikes themselves
    assert_same_spikes(model, x, tmp_path, (1, 16, 16))


def test_an_event_model_takes_a_new_frame_each_step(tmp_path):
    torch.manual_seed(3)
    counts = torch.poisson(torch.full((4, 3, 2, 20, 20), 0.7, dtype=torch.float64))
    x = torch.log1p(counts)  # [N, T, 2, H, W], as stbp.data.event_input makes them
    model = lively(resnet19(width=0.0625, timesteps=3, in_channels=2), x)
    assert_same_spikes(model, x, tmp_path, (2, 20, 20))


def test_the_imagenet_stem_max_pool_and_a_spiking_readout_are_exact(tmp_path):
    torch.manual_seed(4)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model = lively(resnet18(width=0.125, timesteps=2, num_classes=10, readout="spikes"), x)
    graph = to_nir(model, (3, 32, 32))
    assert {"maxpool_sum", "maxpool", "lif_out"} <= set(graph.nodes)
    assert_same_spikes(model, x, tmp_path, (3, 32, 32))
    # the pooled spikes themselves: what the project's blocks see after its max pool
    lif1 = torch.from_numpy(project_spikes(model, x)[1]["lif1"])  # [T, N, C, H, W]
    pooled = model.maxpool(lif1.flatten(0, 1))
    _, sj = spikingjelly_run(str(tmp_path / "model.nir"), steps(x, 2), full=True)
    assert np.array_equal(sj["maxpool"].reshape(pooled.shape), pooled.numpy())


def test_a_membrane_exactly_at_the_threshold_fires_in_neither(tmp_path):
    """The project fires on ``u > v_th``, SpikingJelly on ``u >= stored``: the threshold is stored as the next float
    above ``v_th``, so a tie at ``v_th`` fires in neither, and one float above it fires in both."""
    from stbp.core.nir_graph import _lif

    lif = LIF(v_th=0.4)
    nodes = {
        "input": nir.Input({"input": np.array([3])}),
        "fc": nir.Affine(np.eye(3), np.zeros(3)),
        "lif": _lif(lif, (3,), 0.4),
        "output": nir.Output({"output": np.array([3])}),
    }
    path = tmp_path / "tie.nir"
    nir.write(str(path), nir.NIRGraph(nodes, [("input", "fc"), ("fc", "lif"), ("lif", "output")]))
    x = np.array([[[0.4, np.nextafter(0.4, 1), 0.3]]])  # [T=1, N=1, 3]
    out, _ = spikingjelly_run(str(path), x)
    assert out.tolist() == lif(torch.from_numpy(x)).tolist() == [[[0.0, 1.0, 0.0]]]


def test_snntorch_reads_the_same_network(tmp_path):
    """snnTorch 1.0's importer on the whole ResNet (residual sums included). Its spikes are float32 and its layers
    float32: run in float64 with the inputs of its convolutions and linear layers cast up (0s and 1s, exact)."""
    from snntorch import utils
    from snntorch.import_nir import import_from_nir

    torch.manual_seed(5)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    model = lively(resnet19(width=0.0625, timesteps=2), x)
    path = tmp_path / "model.nir"
    nir.write(str(path), to_nir(model, (1, 28, 28)))
    net = import_from_nir(nir.read(str(path))).double()
    spikes: dict[str, list] = {}
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: tuple(a.double() for a in args))
        if type(m).__name__ == "Leaky":
            m.register_forward_hook(lambda mod, a, out, name=name: spikes.setdefault(name, []).append(out))
    utils.reset(net)
    with torch.no_grad():
        out = torch.stack([net(x)[0] for _ in range(model.timesteps)])
    ref, ref_spikes = project_spikes(model, x)
    for name, s in ref_spikes.items():
        got = torch.stack([o[0] if isinstance(o, tuple) else o for o in spikes[name]]).double().numpy()
        assert np.array_equal(got.reshape(s.shape), s), name
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


def test_what_nir_cannot_say_exactly_is_refused():
    model = resnet19(width=0.0625)
    with pytest.raises(NIRExportError, match="training mode"):
        to_nir(model.train(), (1, 28, 28))
    model = resnet18(width=0.0625, num_classes=10).eval()
    model.maxpool.ceil_mode = True
    with pytest.raises(NIRExportError, match="max pool"):
        to_nir(model, (3, 32, 32))
    with pytest.raises(NIRExportError, match="SpikingResNet"):
        to_nir(torch.nn.Linear(2, 2), (1, 2, 2))


def test_the_core_loads_without_nir():
    code = "import sys, stbp.core.nir_graph, stbp.train.export\n"
    code += "print(sorted(set(sys.modules) & {'nir', 'spikingjelly', 'snntorch'}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_nir_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    from stbp.train.export import main

    monkeypatch.setitem(sys.modules, "nir", None)
    assert main([str(FIXTURE), str(tmp_path / "m.nir")]) == 2
    assert "pip install -e '.[nir]'" in capsys.readouterr().err


def test_the_command_checks_a_checkpoint_against_spikingjelly(tmp_path, data_dir, capsys):
    """``--verify`` on the committed learned-neuron checkpoint (per-channel thresholds, learned tau), on MNIST."""
    from stbp.train.export import main

    path = tmp_path / "m.nir"
    assert main([str(FIXTURE), str(path), "--data_dir", data_dir, "--verify", "--samples", "20"]) == 0
    out = capsys.readouterr().out
    assert "argmax agreement 100.00%" in out and "max |logit difference| 0" in out and "identical" in out
    assert "encoding: direct" in out and "mean: [0.1307]" in out
    assert main(["--verify", str(path), str(FIXTURE), "--data_dir", data_dir, "--samples", "20"]) == 0
    assert "identical" in capsys.readouterr().out


#: Runs in a process where importing stbp fails: reads the graph with SpikingJelly (spikingjelly_run's own source,
#: which imports nothing of stbp) on the inputs of an .npz, writes the output and spike counts.
READ_WITHOUT_STBP = """
import json, sys
from typing import Any
import numpy as np
try:
    import stbp
    raise SystemExit("stbp was importable")
except ImportError:
    pass
{source}
path, inputs, out = sys.argv[1:4]
y, spikes = spikingjelly_run(path, np.load(inputs)["x"])
np.save(out + ".npy", y)
json.dump(spikes, open(out + ".json", "w"))
"""


@pytest.mark.slow
def test_a_trained_checkpoint_exported_by_the_command_agrees_on_mnist(tmp_path, data_dir):
    from stbp.config import build_config
    from stbp.data import load_dataset, model_input
    from stbp.data.catalog import DATASETS
    from stbp.train import train
    from stbp.train.checkpoint import load_checkpoint

    overrides = dict(
        data_dir=data_dir, output_dir=str(tmp_path / "out"), mlflow=False, train_size=2048, epochs=1, lr=0.01
    )
    train(build_config(preset="tiny", overrides={**overrides, "val_size": 256, "batch_size": 32}))
    checkpoint, path = tmp_path / "out" / "checkpoints" / "best.pt", tmp_path / "model.nir"
    done = subprocess.run([sys.executable, "-m", "stbp.export", str(checkpoint), str(path)], cwd=ROOT, text=True,
                          capture_output=True, check=True)  # fmt: skip
    assert "direct" in done.stdout and "0.1307" in done.stdout and "timesteps: 2" in done.stdout
    model, cfg = load_checkpoint(checkpoint)
    model = model.double()
    data = load_dataset("mnist", data_dir)
    x, y = model_input(data.test_images[:1000], DATASETS["mnist"]).double(), data.test_labels[:1000].numpy()
    np.savez(tmp_path / "inputs.npz", x=steps(x, 2))
    script = (
        "from __future__ import annotations\n"
        + WITHOUT_STBP
        + READ_WITHOUT_STBP.format(source=inspect.getsource(spikingjelly_run))
    )
    args = [str(path), str(tmp_path / "inputs.npz"), str(tmp_path / "sj")]
    subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, check=True, capture_output=True, text=True)
    sj_logits = np.load(tmp_path / "sj.npy").mean(0)
    sj_spikes = json.loads((tmp_path / "sj.json").read_text())
    out, spikes = project_spikes(model, x)
    logits = out.mean(0)
    assert {k: float(v.sum()) for k, v in spikes.items()} == sj_spikes
    assert (logits.argmax(1) == sj_logits.argmax(1)).all()
    assert np.abs(logits - sj_logits).max() < 1e-12
    assert (logits.argmax(1) == y).mean() > 0.2  # trained (chance: 0.1): the agreement is of a network that classifies


@pytest.mark.slow
def test_a_registered_version_carries_its_nir_graph(tmp_path):
    """register_model (``--register_model``) adds ``model.nir`` to the version's files: the graph of the model."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    from stbp.config import build_config
    from stbp.core.model import build_network
    from stbp.tracking.registry import register_model
    from stbp.train.checkpoint import model_kwargs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config(preset="tiny", overrides=dict(output_dir=str(tmp_path / "out"), mlflow=False))
    torch.manual_seed(6)
    model = build_network(**model_kwargs(cfg)).eval()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("nir")).info.run_id
    found = register_model(model, cfg, uri, run_id, "stbp-nir")
    import mlflow.pytorch

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        files = Path(download_artifacts(artifact_uri=found["model_uri"], dst_path=str(tmp_path / "dl")))
        loaded = mlflow.pytorch.load_model(found["model_uri"])  # the extra file leaves the model as it was
    finally:
        mlflow.set_tracking_uri(previous)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    (path,) = files.rglob("model.nir")
    graph = nir.read(str(path))
    expected = to_nir(model, (1, 28, 28))
    assert set(graph.nodes) == set(expected.nodes) and sorted(graph.edges) == sorted(expected.edges)
    np.testing.assert_array_equal(graph.nodes["stages_1_0_conv2"].weight, expected.nodes["stages_1_0_conv2"].weight)
    assert graph.metadata["timesteps"] == 2 and "direct" in str(graph.metadata["encoding"])
