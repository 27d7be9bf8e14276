"""The training recipe's levers: label smoothing against a hand computation, the weight EMA against its formula and
through a training run (best.pt holds the averaged weights, resume continues it exactly), fractional warm-up."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stbp.config import ConfigError, build_config
from stbp.train import LossOptions, tet_loss, train, train_step
from stbp.train.checkpoint import read_checkpoint
from stbp.train.recipe import WeightEMA, lr_at


def hand_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """Mean over images of -sum_c q_c log softmax(z)_c, q = (1 - eps) one-hot(y) + eps / C."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        q = [eps / len(row) + (1 - eps) * (c == y) for c in range(len(row))]
        total -= sum(qc * (v - log_z) for qc, v in zip(q, row))
    return total / len(labels)


class _Fixed(nn.Module):
    """Returns preset logits (and per-step outputs) whatever the input, so the step's loss is known."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs = nn.Parameter(outputs.clone())

    def forward(self, x, per_step=False):
        return self.outputs if per_step else self.outputs.mean(0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_label_smoothing_loss_equals_the_hand_computation(eps):
    torch.manual_seed(0)
    outputs, labels = torch.randn(2, 5, 10, dtype=torch.float64), torch.tensor([0, 3, 9, 3, 1])
    model = _Fixed(outputs)
    loss, _ = train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        torch.zeros(5, 1),
        labels,
        loss=LossOptions(label_smoothing=eps),
    )
    expected = hand_smoothed_ce(outputs.mean(0), labels, eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the step computes the loss in fp32
    # TET smooths every step's cross-entropy: with lamb = 0 it is the mean of the steps' smoothed losses.
    per_step = [hand_smoothed_ce(outputs[t], labels, eps) for t in range(2)]
    assert tet_loss(outputs, labels, 0.0, 1.0, label_smoothing=eps).item() == pytest.approx(sum(per_step) / 2)


def test_weight_ema_follows_its_formula_and_copies_integer_buffers():
    model = nn.BatchNorm1d(3)  # a weight, a bias, float running statistics and an integer counter
    ema = WeightEMA(model, decay=0.9)
    expected = model.weight.detach().clone()
    for n in range(1, 40):
        with torch.no_grad():
            model.weight.add_(float(n))
            model.num_batches_tracked += 1
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # the warm-up, then the decay
        expected = d * expected + (1 - d) * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected, rtol=1e-6, atol=1e-5)
    assert int(ema.module.num_batches_tracked) == int(model.num_batches_tracked) == 39
    assert not any(p.requires_grad for p in ema.module.parameters())


def tiny(tmp_path, data_dir, **overrides):
    base = dict(
        data_dir=data_dir,
        output_dir=str(tmp_path / "out"),
        mlflow=False,
        train_size=256,
        val_size=128,
        batch_size=32,
        patience=0,
        test_size=256,
    )
    return build_config(preset="tiny", overrides={**base, **overrides})


@pytest.mark.slow
def test_ema_training_scores_and_saves_the_averaged_weights_and_resumes_exactly(tmp_path, data_dir):
    from stbp.train.evaluate import evaluate_checkpoint

    full = train(tiny(tmp_path / "a", data_dir, epochs=2, ema_decay=0.9))
    train(tiny(tmp_path / "b", data_dir, epochs=1, ema_decay=0.9))
    train(tiny(tmp_path / "b", data_dir, epochs=2, ema_decay=0.9))
    a, b = (read_checkpoint(tmp_path / d / "out" / "checkpoints" / "last.pt") for d in "ab")
    assert a["ema_updates"] == b["ema_updates"] == 2 * 8  # 256 images / 32 a step, two epochs
    for key in ("model", "train_model"):  # the EMA and the trained weights both continue exactly
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    differ = [n for n, v in a["model"].items() if v.is_floating_point() and not torch.equal(v, a["train_model"][n])]
    assert differ, "the EMA's weights should differ from the trained ones"
    # best.pt scores like the run's summary: it holds the weights that evaluation used.
    best = Path(full["output_dir"]) / "checkpoints" / "best.pt"
    assert evaluate_checkpoint(best, data_dir=data_dir, limit=256)["test_acc"] == pytest.approx(full["test_acc"])


def test_warm_up_may_be_fractional_and_the_new_options_are_validated():
    cfg = build_config(overrides=dict(schedule="cosine", warmup_epochs=0.5, lr=1.0, epochs=2))
    assert lr_at(cfg, 0.25) == pytest.approx(0.5, abs=1e-2)
    assert lr_at(cfg, 0.5) == pytest.approx(1.0) and lr_at(cfg, 1.25) == pytest.approx(0.5)
    assert build_config(cli=["--label_smoothing", "0.1", "--ema_decay", "0.999"]).optim.ema_decay == 0.999
    for key, value, message in [
        ("label_smoothing", 1.0, "optim.label_smoothing: input should be less than 1, got 1.0"),
        ("ema_decay", -0.1, "optim.ema_decay: input should be greater than or equal to 0"),
        ("ema_decay", "high", "optim.ema_decay: input should be a valid number, got .high."),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_config(overrides={key: value})
