"""TET (Deng et al. 2022) as ``loss: tet``: the loss against a hand computation, the per-step outputs it reads,
its options' validation, and a training run on MNIST and on CIFAR-format files."""

from __future__ import annotations

import math

import pytest
import torch

from stbp import resnet19
from stbp.config import ConfigError, build_config
from stbp.train import tet_loss, train


def hand_tet(outputs: torch.Tensor, labels: torch.Tensor, lamb: float, phi: float) -> float:
    """(1 - lamb) x mean over steps t and images n of -log softmax(O[t, n])[y_n] + lamb x mean of (O - phi)^2."""
    steps, n, classes = outputs.shape
    o = outputs.tolist()
    ce = 0.0
    for t in range(steps):
        for i in range(n):
            log_z = math.log(sum(math.exp(v) for v in o[t][i]))
            ce += log_z - o[t][i][int(labels[i])]
    mse = sum((v - phi) ** 2 for step in o for row in step for v in row)
    return (1 - lamb) * ce / (steps * n) + lamb * mse / (steps * n * classes)


@pytest.mark.parametrize(("lamb", "phi"), [(0.0, 1.0), (1e-3, 1.0), (0.3, 0.5)])
def test_tet_loss_equals_the_hand_computation(lamb, phi):
    gen = torch.Generator().manual_seed(3)
    outputs = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    assert tet_loss(outputs, labels, lamb, phi).item() == pytest.approx(hand_tet(outputs, labels, lamb, phi), rel=1e-12)


def test_tet_differs_from_the_cross_entropy_of_the_mean_output():
    outputs = torch.tensor([[[4.0, 0.0]], [[-4.0, 0.0]]])  # T=2: right at t=0, wrong at t=1; the mean is a tie
    labels = torch.tensor([0])
    mean_ce = torch.nn.functional.cross_entropy(outputs.mean(0), labels).item()
    assert mean_ce == pytest.approx(math.log(2))
    assert tet_loss(outputs, labels, 0.0, 1.0).item() == pytest.approx(
        0.5 * (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(4)))
    )


def test_the_per_step_outputs_average_to_the_models_output():
    model = resnet19(width=0.0625, timesteps=3).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        steps = model(images, per_step=True)
        assert steps.shape == (3, 2, 10)
        torch.testing.assert_close(steps.mean(0), model(images))


def test_tet_options_are_validated():
    cfg = build_config(cli=["--loss", "tet", "--tet_lambda", "0.05"])
    assert (cfg.optim.loss, cfg.optim.tet_lambda, cfg.optim.tet_phi) == ("tet", 0.05, 1.0)
    with pytest.raises(ConfigError, match="optim.loss: input should be 'ce' or 'tet', got 'mse'"):
        build_config(cli=["--loss", "mse"])
    with pytest.raises(ConfigError, match="optim.tet_lambda: input should be less than 1, got 1.0"):
        build_config(cli=["--tet_lambda", "1"])


def test_training_with_tet_runs_on_mnist_and_cifar(tmp_path, data_dir):
    from tests._datasets import make_cifar

    base = dict(output_dir=str(tmp_path / "ce"), mlflow=False, train_size=256, val_size=128, batch_size=32)
    train(build_config(preset="tiny", overrides={**base, "data_dir": data_dir}))
    tet = train(
        build_config(
            preset="tiny", overrides={**base, "data_dir": data_dir, "loss": "tet", "output_dir": str(tmp_path / "tet")}
        )
    )
    from stbp.train.checkpoint import read_checkpoint

    ce_state, tet_state = (read_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("ce", "tet"))
    assert math.isfinite(tet["test_acc"]) and math.isfinite(tet_state["metrics"][0]["train_loss"])
    assert tet_state["metrics"][0]["train_loss"] != ce_state["metrics"][0]["train_loss"]  # another loss...
    assert not torch.equal(tet_state["model"]["fc2.weight"], ce_state["model"]["fc2.weight"])  # ...another model
    root = make_cifar(tmp_path / "data", "cifar10")
    cifar = train(
        build_config(
            preset="tiny",
            overrides={
                **base,
                "data_dir": str(root),
                "dataset": "cifar10",
                "train_size": 0,
                "val_size": 64,
                "loss": "tet",
                "output_dir": str(tmp_path / "cifar"),
            },
        )
    )
    assert cifar["epochs_run"] == 1 and math.isfinite(cifar["test_acc"])
