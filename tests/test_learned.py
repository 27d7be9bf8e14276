"""Learned neurons (learn_tau, learn_v_th, aa_mode, v_th_granularity) and the firing-rate penalty, against oracles:
the gradients against autograd through the plain loop in float64 and against hand-derived closed forms, tdBN's
target against the threshold, the penalty against its formula and the rates against the firing-rate monitor;
then in training: the defaults bit-identical to the code before these options, resume, DDP and the records."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stbp import LIF, resnet19
from stbp.config import ConfigError, build_config
from stbp.core.learned import learned_neurons
from stbp.core.monitor import FiringRateMonitor
from stbp.core.neuron import lif_fused
from stbp.core.tdbn import TdBN
from stbp.train import LossOptions, train, train_step
from stbp.train.checkpoint import read_checkpoint
from tests._dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def drive(shape=(4, 3, 5, 2, 2), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 1.6 - 0.3).requires_grad_(True)


# ---------------------------------------------------------------- the neuron's gradients


@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("aa_mode", ["fixed", "relative"])
def test_fused_lif_learns_v_th_and_tau_as_autograd_through_the_plain_loop(granularity, aa_mode):
    """Spikes and the input's gradient bit for bit; the threshold's and time constant's gradients to float64
    rounding (they are sums taken in another order)."""
    results = []
    for fast in (True, False):
        lif = LIF(v_th=0.5, aa=0.3, tau=0.4, fast=fast, learn_tau=True, learn_v_th=True, v_th_granularity=granularity,
                  aa_mode=aa_mode, channels=5).double()  # fmt: skip
        with torch.no_grad():  # thresholds away from their start, so that aa_mode matters
            lif.log_v_th.add_(torch.linspace(-0.3, 0.3, lif.log_v_th.numel()).view(lif.log_v_th.shape).double())
        x = drive()
        out = lif(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * weights).sum().backward()
        results.append((out, x.grad, lif.log_v_th.grad, lif.tau_logit.grad))
    (o1, gx1, gv1, gt1), (o2, gx2, gv2, gt2) = results
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    assert gv1.abs().sum() > 0 and gt1.abs() > 0  # the oracle is not comparing zeros
    torch.testing.assert_close(gv1, gv2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt1, gt2, rtol=1e-12, atol=1e-12)


def test_threshold_and_decay_gradients_match_the_closed_forms_of_two_steps():
    """T = 2, one neuron: u0 = x0, u1 = tau*u0*(1 - o0) + x1, loss = o0 + 2*o1. With s = 1[|u - v| < aa] / (2aa):
    dL/dv = -(s0*(1 - 2*tau*u0*s1) + 2*s1) (o0's gradient gets the reset path), dL/dtau = 2*s1*u0*(1 - o0)."""
    v, aa, tau = 0.5, 0.4, 0.25
    for x0, x1 in [(0.3, 0.6), (0.7, 0.2), (0.45, 0.55)]:
        u0 = x0
        o0 = float(u0 > v)
        u1 = tau * u0 * (1 - o0) + x1
        s0, s1 = (float(abs(u - v) < aa) / (2 * aa) for u in (u0, u1))
        grad_o0 = 1 - 2 * tau * u0 * s1
        expected_v = -(s0 * grad_o0 + 2 * s1)
        expected_tau = 2 * s1 * u0 * (1 - o0)
        v_th = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        x = torch.tensor([[x0], [x1]], dtype=torch.float64, requires_grad=True)
        out = lif_fused(x, v_th, aa, t)
        (out[0] + 2 * out[1]).sum().backward()
        assert v_th.grad.item() == pytest.approx(expected_v, abs=1e-12)
        assert t.grad.item() == pytest.approx(expected_tau, abs=1e-12)


def test_relative_aa_moves_the_window_with_the_learned_threshold():
    """A threshold learned to twice its start: 'relative' doubles the half-width (and halves the height)."""
    lif = LIF(v_th=0.5, aa=0.2, tau=0.5, learn_v_th=True, aa_mode="relative")
    with torch.no_grad():
        lif.log_v_th.fill_(math.log(1.0))
    grads = []
    for value in (0.65, 0.9, 1.35, 1.45):  # one step each (T = 1)
        x = torch.tensor([[value]], requires_grad=True)
        lif(x).sum().backward()
        grads.append(x.grad.item())
    # window |u - 1.0| < 0.4, height 1 / 0.8
    assert grads == pytest.approx([1.25, 1.25, 1.25, 0.0]) and grads[0] == pytest.approx(1 / (2 * 0.4))
    fixed = LIF(v_th=0.5, aa=0.2, tau=0.5, learn_v_th=True, aa_mode="fixed")
    with torch.no_grad():
        fixed.log_v_th.fill_(0.0)
    x = torch.tensor([[0.65]], requires_grad=True)
    fixed(x).sum().backward()
    assert x.grad.item() == 0.0  # |0.65 - 1| > 0.2


def test_the_parametrisations_keep_tau_in_0_1_and_v_th_positive():
    lif = LIF(v_th=0.4, aa=0.5, tau=0.25, learn_tau=True, learn_v_th=True)
    assert lif.decay().item() == pytest.approx(0.25) and lif.threshold().item() == pytest.approx(0.4)
    with torch.no_grad():
        lif.tau_logit.fill_(60.0)
        lif.log_v_th.fill_(-60.0)
    assert 0 < lif.decay().item() <= 1 and lif.threshold().item() > 0
    with pytest.raises(ValueError, match="tau < 1"):
        LIF(tau=1.0, learn_tau=True)
    with pytest.raises(ConfigError, match="model.tau must be < 1 with learn_tau.*1.0"):
        train(build_config(preset="tiny", overrides=dict(learn_tau=True, tau=1.0, mlflow=False)))


# ---------------------------------------------------------------- tdBN and the penalty


def test_tdbn_normalises_to_alpha_times_the_learned_threshold_per_channel():
    bn = TdBN(3, alpha=0.5).double()
    v = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64) * 5 + 2
    y = bn(x, v)
    std = y.transpose(0, 1).flatten(1).std(1, unbiased=False)
    torch.testing.assert_close(std, 0.5 * v.detach(), rtol=1e-4, atol=1e-6)
    # the target is a function of v: d(sum of y * w)/dv_c = 0.5 * sum over channel c of x_hat * w
    w = torch.randn_like(y)
    (y * w).sum().backward()
    x_hat = (y / (0.5 * v.view(3, 1, 1))).detach()  # bias 0, weight 1
    torch.testing.assert_close(v.grad, 0.5 * (x_hat * w).sum((0, 2, 3)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bn(x, 0.4), bn(x, torch.tensor(0.4, dtype=torch.float64)), rtol=0, atol=0)


def test_the_models_rates_are_the_monitors_and_the_penalty_is_its_formula():
    torch.manual_seed(0)
    model = resnet19(width=0.0625, learn_v_th=True, learn_tau=True, v_th_granularity="channel")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with FiringRateMonitor(model) as monitor:
        logits, rates = model(x, rates=True)
        expected = monitor.rates()
    assert rates.shape == (len(expected),) and rates.requires_grad
    expected = torch.tensor(list(expected.values()), dtype=torch.float64)
    torch.testing.assert_close(rates.double(), expected, rtol=1e-6, atol=1e-7)
    target, weight = 0.05, 3.0
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(logits, y) + weight * ((rates - target) ** 2).sum()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got, _ = train_step(model, opt, x, y, loss=LossOptions(rate_weight=weight, rate_target=target))
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("log_v_th"))


# ---------------------------------------------------------------- training


def tiny(tmp_path: Path, data_dir: str, **overrides):
    base = dict(data_dir=data_dir, output_dir=str(tmp_path / "out"), mlflow=False, train_size=256, val_size=128)
    return build_config(preset="tiny", overrides={**base, "batch_size": 32, "test_size": 200, **overrides})


LEARN = dict(learn_v_th=True, learn_tau=True, v_th_granularity="channel", aa_mode="relative", rate_weight=0.5)

#: How tests/fixtures/three_steps_before_learned_neurons.pt was made, with OMP_NUM_THREADS=1 (sys.argv[1]: the
#: MNIST directory, sys.argv[2]: the file), by the package as it was before learned neurons (and the golden
#: tensors' torch added as "torch"). The test below runs the same steps in-process.
SNAPSHOT = """
import sys, torch
from stbp.config import build_config
from stbp.data import load_dataset, normalize
from stbp.core.model import resnet19
from stbp.train import train_step
cfg = build_config(preset="tiny", overrides=dict(mlflow=False))
torch.manual_seed(0)
model = resnet19(width=0.0625)
opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
data = load_dataset("mnist", sys.argv[1])
losses = []
for i in range(3):
    x = normalize(data.train_images[i * 16 : (i + 1) * 16])
    losses.append(train_step(model, opt, x, data.train_labels[i * 16 : (i + 1) * 16])[0])
torch.save({"losses": torch.stack(losses), "model": model.state_dict()}, sys.argv[2])
"""
GOLDEN_STEPS = ROOT / "tests" / "fixtures" / "three_steps_before_learned_neurons.pt"


def load_golden(path: Path) -> dict:
    """A fixture of golden tensors; its ``"torch"`` (the version that wrote it) is a TorchVersion."""
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(path, weights_only=True)


def test_with_every_option_off_training_is_bit_identical_to_the_code_before_them(mnist):
    """Three optimiser steps of the default model (:data:`SNAPSHOT`, run here in-process on one thread) give the
    losses and weights that the package as it was before learned neurons gave, bit for bit. The golden tensors
    were written by torch ``golden["torch"]``: under another torch build the bits may differ (other kernels), so
    there the comparison falls back to ``assert_close(rtol=1e-5, atol=1e-6)``."""
    from stbp.data import normalize

    golden = load_golden(GOLDEN_STEPS)
    same = torch.equal if str(golden["torch"]) == torch.__version__ else _close
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = build_config(preset="tiny", overrides=dict(mlflow=False))
        torch.manual_seed(0)
        model = resnet19(width=0.0625)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
        losses = []
        for i in range(3):
            x = normalize(mnist.train_images[i * 16 : (i + 1) * 16])
            losses.append(train_step(model, opt, x, mnist.train_labels[i * 16 : (i + 1) * 16])[0])
    finally:
        torch.set_num_threads(threads)
    assert same(torch.stack(losses).detach(), golden["losses"])
    state = model.state_dict()
    assert state.keys() == golden["model"].keys()
    for key, value in golden["model"].items():
        assert same(state[key], value), key


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return True


@pytest.mark.slow
def test_learned_neurons_train_resume_exactly_and_are_recorded(tmp_path, data_dir):
    full = train(tiny(tmp_path / "a", data_dir, epochs=2, patience=0, **LEARN))
    train(tiny(tmp_path / "b", data_dir, epochs=1, patience=0, **LEARN))
    resumed = train(tiny(tmp_path / "b", data_dir, epochs=2, patience=0, **LEARN))
    a, b = (read_checkpoint(tmp_path / d / "out" / "checkpoints" / "last.pt") for d in "ab")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    learned = full["learned_neurons"]
    assert set(learned) == set(resumed["learned_neurons"]) == set(full["firing_rates"])  # every spiking layer
    for layer, values in learned.items():
        assert resumed["learned_neurons"][layer] == pytest.approx(values, abs=1e-6)
    assert any(abs(v["v_th"] - 0.4) > 1e-4 for v in learned.values())  # the thresholds moved
    assert any(abs(v["tau"] - 0.25) > 1e-4 for v in learned.values())
    out = Path(full["output_dir"])
    rows = (out / "neurons.csv").read_text().splitlines()
    assert rows[0] == "epoch,layer,v_th,v_th_min,v_th_max,tau" and len(rows) == 1 + 2 * len(learned)
    last = {r.split(",")[1]: r.split(",") for r in rows[-len(learned) :]}
    model = resnet19(**a["model_kwargs"])
    model.load_state_dict(a["model"])
    for layer, values in learned_neurons(model).items():  # the table's last epoch is the saved model's
        assert float(last[layer][2]) == pytest.approx(values["v_th"]) and float(last[layer][5]) == pytest.approx(
            values["tau"]
        )
    assert json.loads((out / "summary.json").read_text())["learned_neurons"] == learned
    final = learned_neurons(model).values()  # last.pt's; the means are MLflow metrics every epoch
    assert a["metrics"][-1]["v_th_mean"] == pytest.approx(sum(v["v_th"] for v in final) / len(final))
    assert a["metrics"][-1]["tau_mean"] == pytest.approx(sum(v["tau"] for v in final) / len(final))
    proc = subprocess.run([sys.executable, "-m", "stbp.train.evaluate", str(out / "checkpoints" / "best.pt"),
                           "--data_dir", data_dir, "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    layer, values = next(iter(learned.items()))
    assert f"{layer}" in proc.stdout and f"v_th {values['v_th']:.4f}" in proc.stdout
    assert f"tau {values['tau']:.4f}" in proc.stdout


def test_learned_neurons_are_not_decayed_and_the_defaults_have_no_extra_group():
    from stbp.train.recipe import build_optimizer

    cfg = build_config(preset="tiny", overrides=dict(weight_decay=0.1, mlflow=False))
    plain = build_optimizer(cfg, resnet19(width=0.0625))
    assert len(plain.param_groups) == 1
    learned = build_optimizer(cfg, resnet19(width=0.0625, learn_v_th=True, learn_tau=True))
    weights, neurons = learned.param_groups
    layers = sum(isinstance(m, LIF) for m in resnet19(width=0.0625).modules())
    assert (weights["weight_decay"], neurons["weight_decay"]) == (0.1, 0.0) and len(neurons["params"]) == 2 * layers


def _ddp_learned(rank, world, xs, ys, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from stbp import convert_sync_tdbn

    torch.manual_seed(0)
    model = convert_sync_tdbn(resnet19(width=0.0625, learn_v_th=True, learn_tau=True, v_th_granularity="channel"))
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
    for x, y in zip(xs, ys):
        train_step(
            ddp, opt, x.chunk(world)[rank], y.chunk(world)[rank], loss=LossOptions(rate_weight=1.0, rate_target=0.1)
        )
    torch.save(model.state_dict(), f"{out}.{rank}")


@pytest.mark.slow
def test_under_ddp_the_learned_neurons_stay_identical_across_ranks(tmp_path, mnist):
    from stbp.data import normalize

    xs = [normalize(mnist.train_images[i * 16 : (i + 1) * 16]) for i in range(3)]
    ys = [mnist.train_labels[i * 16 : (i + 1) * 16] for i in range(3)]
    run_ranks(_ddp_learned, 2, xs, ys, str(tmp_path / "ddp.pt"))
    states = [torch.load(tmp_path / f"ddp.pt.{r}", weights_only=True) for r in range(2)]
    keys = [k for k in states[0] if k.endswith(("log_v_th", "tau_logit"))]
    assert len(keys) == 2 * sum(isinstance(m, LIF) for m in resnet19(width=0.0625).modules())
    for key in keys:
        assert torch.equal(states[0][key], states[1][key]), key
    start = resnet19(width=0.0625, learn_v_th=True, learn_tau=True, v_th_granularity="channel").state_dict()
    assert any(not torch.equal(states[0][k], start[k]) for k in keys)  # and they did learn


@pytest.mark.slow
def test_torch_compile_trains_learned_neurons_like_eager():
    """dynamo traces the fused LIF with tensor thresholds and time constants (aot_eager: the same graphs, run by
    aten; inductor's C++ codegen would cost minutes of CI)."""
    import copy

    torch.manual_seed(0)
    eager = resnet19(width=0.0625, learn_v_th=True, learn_tau=True, v_th_granularity="channel", aa_mode="relative")
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for model, params in ((eager, eager.parameters()), (compiled, twin.parameters())):
        opt = torch.optim.SGD(params, lr=0.5)
        for _ in range(2):
            train_step(model, opt, x, y, loss=LossOptions(rate_weight=1.0, rate_target=0.1))
    moved = 0
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        moved += name.endswith(("log_v_th", "tau_logit"))
    assert moved and not torch.equal(eager.lif1.log_v_th, torch.full_like(eager.lif1.log_v_th, math.log(0.4)))
