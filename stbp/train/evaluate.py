"""Evaluation: loss, accuracy and the firing rate of every spiking layer, for training and for a checkpoint (on the
test set of the data set it was trained on).

    python -m stbp.evaluate CHECKPOINT [--data_dir DIR] [--batch_size N] [--device cpu|cuda] [--chart PNG]

Unlike the reference's ``test.py`` (one sample, module-global counters), :func:`evaluate` runs over a whole split
with a :class:`~stbp.core.monitor.FiringRateMonitor`, sums over ranks before dividing, and is the one evaluation that
training (validation every epoch, test at the end) and this command share.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..core.learned import learned_neurons
from ..core.model import channels_last
from ..core.monitor import FiringRateMonitor, firing_rate_chart, spike_cost
from ..data import DataFormatError, DataNotFoundError, FrameSettings, load_dataset, model_input
from ..data.catalog import DATASETS
from ..data.folders import folder_index
from ..data.stream import StreamedDataset, default_workers
from .checkpoint import CheckpointError, load_checkpoint
from .distributed import DistEnv, all_reduce_sum

__all__ = ["evaluate", "evaluate_checkpoint", "main"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    split: str,
    *,
    amp: torch.dtype | None = None,
    env: DistEnv | None = None,
    firing_rates: bool = False,
) -> dict[str, float]:
    """``{split}_loss``, ``{split}_acc`` (%) of ``model`` over ``batches`` of normalised ``(x, y)`` on its device
    and, with ``firing_rates``, its spike cost per image (``spikes_per_image``, ``sops_per_image``,
    ``energy_uj_per_image``: :mod:`stbp.core.monitor`), the mean ``firing_rate`` of all spiking neurons and
    ``firing_rate/<layer>``. Sums and counts are reduced over the ranks of ``env``; one host sync in all."""
    model.eval()
    dev = next(model.parameters()).device
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    correct = torch.zeros((), device=dev, dtype=torch.float64)
    count = 0
    # The monitor's hooks live only for this evaluation, never during training steps.
    with FiringRateMonitor(model) if firing_rates else contextlib.nullcontext() as monitor:
        for x, y in batches:
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(channels_last(x)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += y.shape[0]
    parts = [loss_sum, correct, torch.tensor(float(count), device=dev, dtype=torch.float64)]
    if monitor is not None:
        spikes, counts = monitor.totals()
        spikes = torch.zeros(len(counts), device=dev, dtype=torch.float64) if spikes is None else spikes.double()
        parts += [monitor.cost_totals(spikes), spikes, torch.tensor(counts, device=dev, dtype=torch.float64)]
    totals = torch.cat([p.reshape(-1) for p in parts])
    totals = (all_reduce_sum(totals, env) if env is not None else totals).tolist()  # the one sync
    n = totals[2]
    out = {f"{split}_loss": totals[0] / n, f"{split}_acc": 100.0 * totals[1] / n}
    if monitor is not None:
        k = len(monitor.names)
        out.update(spike_cost(*totals[3:6], images=n))
        spikes, counts = totals[6 : 6 + k], totals[6 + k :]
        out["firing_rate"] = sum(spikes) / sum(counts) if sum(counts) else 0.0
        for name, s, c in zip(monitor.names, spikes, counts):
            out[f"firing_rate/{name}"] = s / c if c else 0.0
    return out


def _test_batches(cfg, root, batch_size: int, device: str, limit: int | None):
    """The test set of the data set ``cfg`` trained on (and its frames, or classes and image size), in batches on
    ``device`` (the first ``limit`` images; of an image folder, ``limit`` spread over it), and its ``split_hash``."""
    spec = DATASETS[cfg.data.dataset]
    if spec.streamed:
        index = folder_index(spec.name, root, cfg.data.classes)
        size = cfg.data.image_size or spec.size
        data = StreamedDataset(index, device, spec=spec, image_size=size, val_size=1, test_size=limit or 0,
                               workers=default_workers() if cfg.data.workers is None else cfg.data.workers)  # fmt: skip
        return data.eval_batches("test", batch_size), index.identity
    frames = FrameSettings.of(cfg) if spec.events else None
    data = load_dataset(spec.name, root, download=cfg.data.download, frames=frames)
    images, labels = data.test_images[:limit].to(device), data.test_labels[:limit].to(device)
    batches = zip(images.split(batch_size), labels.split(batch_size))
    return ((model_input(x, spec), y) for x, y in batches), data.split_hash


def evaluate_checkpoint(
    path, data_dir=None, batch_size: int = 1000, device: str = "cpu", limit: int | None = None
) -> dict[str, Any]:
    """Test accuracy, loss and per-layer firing rates of a checkpoint (``limit``: first N test images only), and its
    learned neuron parameters (``learned_neurons``, :func:`stbp.core.learned.learned_neurons`) when it has any."""
    model, cfg = load_checkpoint(path, map_location=device)
    model = model.to(device, memory_format=torch.channels_last)
    root = data_dir if data_dir is not None else cfg.data.data_dir
    batches, split_hash = _test_batches(cfg, root, batch_size, device, limit)
    result = evaluate(model, batches, "test", firing_rates=True)
    rates = {k.removeprefix("firing_rate/"): v for k, v in result.items() if k.startswith("firing_rate/")}
    split = {"split_hash": split_hash} if split_hash else {}
    learned = {"learned_neurons": values} if (values := learned_neurons(model)) else {}
    return {**{k: v for k, v in result.items() if "/" not in k}, **split, "firing_rates": rates, **learned}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stbp.evaluate",
        description="The test accuracy, loss, spike cost and per-layer firing rates of a checkpoint, on the test set "
        "of the data set it was trained on.",
    )
    p.add_argument("checkpoint", help="a checkpoint file, e.g. runs/cpu/checkpoints/best.pt")
    p.add_argument("--data_dir", "--data-dir", default=None, help="data root (default: $STBP_DATA_DIR, else ./data)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=1000, help="evaluation batch (default 1000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--chart", default=None, help="firing-rate chart PNG (default: beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.batch_size, args.device)
    except (CheckpointError, ConfigError, DataNotFoundError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = f"  (split {result['split_hash']})" if "split_hash" in result else ""
    print(f"test accuracy {result['test_acc']:.2f}%  test loss {result['test_loss']:.4f}{split}")
    print(
        f"spike cost per image: {result['spikes_per_image']:,.0f} spikes, {result['sops_per_image']:,.0f} "
        f"synaptic operations, {result['energy_uj_per_image']:.3f} uJ (45 nm estimate; stbp/core/monitor.py)"
    )
    print(f"mean firing rate {result['firing_rate']:.4f}; per spiking layer:")
    width = max(len(n) for n in result["firing_rates"])
    for name, rate in result["firing_rates"].items():
        print(f"  {name:<{width}}  {rate:.4f}  {'#' * round(rate * 100)}")
    if learned := result.get("learned_neurons"):
        print("learned neurons per spiking layer (v_th: mean over channels [min, max] where per channel):")
        for name, v in learned.items():
            spread = f" [{v['v_th_min']:.4f}, {v['v_th_max']:.4f}]" if "v_th_min" in v else ""
            print(f"  {name:<{width}}  v_th {v['v_th']:.4f}{spread}  tau {v['tau']:.4f}")
    chart = Path(args.chart) if args.chart else Path(args.checkpoint).with_suffix(".firing_rates.png")
    if firing_rate_chart(result["firing_rates"], chart) is not None:
        print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
