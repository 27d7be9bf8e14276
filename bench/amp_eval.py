"""bf16 autocast against fp32 on one trained checkpoint: test accuracy of each, and how often they agree.

    python bench/amp_eval.py runs/cpu/checkpoints/best.pt [--device cpu|cuda] [--limit N] [--batch 500]

The same weights and the same test images, so the difference is bf16's numerics alone (the LIF integrates its
membrane in fp32 either way; the convolutions, linear layers and their inputs run in bf16). Needs only torch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stbp.data import load_dataset, normalize  # noqa: E402
from stbp.train.checkpoint import load_checkpoint  # noqa: E402


@torch.no_grad()
def predictions(model, images: torch.Tensor, batch: int, amp: bool) -> tuple[torch.Tensor, float]:
    """Predicted classes for ``images`` and the seconds it took."""
    out = []
    start = time.perf_counter()
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        for x in images.split(batch):
            out.append(model(normalize(x).contiguous(memory_format=torch.channels_last)).float().argmax(1))
    preds = torch.cat(out)
    if preds.is_cuda:
        torch.cuda.synchronize()
    return preds, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, help="first N test images only")
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    model, cfg = load_checkpoint(args.checkpoint, map_location=args.device)
    model = model.to(args.device, memory_format=torch.channels_last).eval()
    mnist = load_dataset("mnist", cfg.data.data_dir, download=False)
    images = mnist.test_images[: args.limit].to(args.device)
    labels = mnist.test_labels[: args.limit].to(args.device)
    fp32, t32 = predictions(model, images, args.batch, amp=False)
    bf16, t16 = predictions(model, images, args.batch, amp=True)
    n = labels.numel()
    acc32 = 100.0 * (fp32 == labels).sum().item() / n
    acc16 = 100.0 * (bf16 == labels).sum().item() / n
    agree = (fp32 == bf16).sum().item()
    print(f"{args.checkpoint}: {n} test images on {args.device}")
    print(
        f"fp32 {acc32:.2f}% ({t32:.1f} s), bf16 autocast {acc16:.2f}% ({t16:.1f} s); "
        f"predictions differ on {n - agree} images ({100.0 * (n - agree) / n:.2f}%)"
    )


if __name__ == "__main__":
    main()
