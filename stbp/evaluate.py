"""Evaluate a checkpoint on the MNIST test set: accuracy and the mean firing rate of every spiking layer.

    python -m stbp.evaluate CHECKPOINT [--data_dir DIR] [--batch_size N] [--device cpu|cuda] [--chart PNG]

Unlike the reference's ``test.py`` (one sample, module-global counters) this runs over the whole test set with a
:class:`~stbp.monitor.FiringRateMonitor` and writes the per-layer chart next to the checkpoint by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_checkpoint
from .data import DataNotFoundError, load_mnist, normalize
from .monitor import FiringRateMonitor

__all__ = ["evaluate_checkpoint", "main"]


@torch.no_grad()
def evaluate_checkpoint(path, data_dir=None, batch_size: int = 1000, device: str = "cpu",
                        limit: int | None = None) -> dict[str, Any]:
    """Test accuracy, loss and per-layer firing rates of a checkpoint (``limit``: first N test images only)."""
    model, cfg = load_checkpoint(path, map_location=device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    mnist = load_mnist(data_dir if data_dir is not None else cfg.data.data_dir, download=cfg.data.download)
    images, labels = mnist.test_images[:limit].to(device), mnist.test_labels[:limit].to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    with FiringRateMonitor(model) as monitor:
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            logits = model(normalize(x).contiguous(memory_format=torch.channels_last)).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
        rates = monitor.rates()
    n = labels.numel()
    return {"test_acc": 100.0 * correct.item() / n, "test_loss": loss.item() / n, "firing_rates": rates}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stbp.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data_dir", "--data-dir", default=None)
    p.add_argument("--batch_size", "--batch-size", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chart", default=None, help="firing-rate chart PNG (default: beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.batch_size, args.device)
    except (CheckpointError, DataNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"test accuracy {result['test_acc']:.2f}%  test loss {result['test_loss']:.4f}")
    width = max(len(n) for n in result["firing_rates"])
    for name, rate in result["firing_rates"].items():
        print(f"  {name:<{width}}  {rate:.4f}  {'#' * round(rate * 100)}")
    from .train import _firing_rate_chart

    chart = Path(args.chart) if args.chart else Path(args.checkpoint).with_suffix(".firing_rates.png")
    if _firing_rate_chart(result["firing_rates"], chart) is not None:
        print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
