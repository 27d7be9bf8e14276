"""GPU benchmark: full ResNet-19, T=2, bf16 autocast + channels_last, eager and ``torch.compile``, on one GPU.

    python bench/gpu.py                  # H200: batch 128 and 256; under 5 minutes (a time budget skips the rest)
    python bench/gpu.py --smoke          # any machine, CPU included: tiny sizes, 1-2 steps, proves it runs

Then the CIFAR-10 preset (ResNet-19, 3x32x32 images, full width) at T=2 and T=4, in bf16 and fp32: images/s, the
seconds of one 45,000-image epoch and peak memory (``--no-cifar`` skips it).

Per run: images/s, ms per step, estimated MFU (analytic conv/linear FLOPs x2 x3 for forward + backward, against
``--peak-tflops``, 989 = H200 bf16 dense), projected seconds per MNIST epoch (54,000 images), peak memory of a
training step (``torch.cuda.max_memory_allocated``, or saved-tensor bytes on CPU) and, for the baselines, our
speed-up over them at the same batch. Also the loader (``DeviceDataset.train_batches``, synthetic MNIST-shaped
data) on the device. Needs only torch (and this repository); SpikingJelly is timed when importable. Results are
written as JSON after every run to ``$OUT/bench_gpu.json`` if ``$OUT`` is set, else ``./bench_gpu.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import common
import models
import sj_model
import torch

EPOCH_IMAGES = 54_000  # MNIST train split after the 6,000-image validation hold-out
CIFAR_EPOCH_IMAGES = 45_000  # CIFAR-10 train split after the cifar10 preset's 5,000-image hold-out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and batches, 1-2 steps; runs on CPU")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 128 256; smoke: 4)")
    p.add_argument("--width", type=float, help="channel width (default 1.0; smoke: 0.125)")
    p.add_argument("--timesteps", type=int, default=2)
    p.add_argument("--steps", type=int, help="timed steps per chunk (default 10; smoke: 1)")
    p.add_argument("--chunks", type=int, help="timed chunks, median taken (default 3; smoke: 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke: 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 preset's rows")
    p.add_argument("--skip-baselines", action="store_true", help="skip the reference structure and SpikingJelly")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip runs not started within this many seconds")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200: 989)")
    p.add_argument("--out", help="JSON path (default $OUT/bench_gpu.json, else ./bench_gpu.json)")
    args = p.parse_args(argv)
    small = args.smoke
    args.batches = args.batches or ([4] if small else [128, 256])
    args.width = args.width or (0.125 if small else 1.0)
    args.steps = args.steps or (1 if small else 10)
    args.chunks = args.chunks or (2 if small else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 3)
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "bench_gpu.json") if os.environ.get("OUT") else "bench_gpu.json"
    return args


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def plan(args) -> list[tuple[str, int, bool]]:
    """(model, batch, compiled) in order of importance: ours eager, the baselines, then the (slow to build)
    compiled runs, so that a time budget that runs out drops the least important."""
    runs = [("ours", b, False) for b in args.batches]
    if not args.skip_baselines:
        runs += [("ref", args.batches[0], False)]
        if sj_model.available():
            runs += [("sj", args.batches[0], False)]
        else:
            log(f"SpikingJelly not importable, skipped ({sj_model.INSTALL_HINT})")
    if not args.no_compile:
        runs += [("ours", b, True) for b in args.batches]
    return runs


def synthetic_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-shaped normalised images and labels (dense compute does not depend on the pixels)."""
    from stbp.data import normalize

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8, generator=g)
    return normalize(images).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)


def run_one(name: str, batch: int, compiled: bool, args, device: torch.device, flops: float) -> dict:
    net = models.build(name, args.width, args.timesteps, device)
    x, y = synthetic_batch(batch, device)
    fwd = torch.compile(net) if compiled else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)  # stbp.train's optimizer, default (foreach) kernels
    step = common.make_train_step(
        fwd, models.prepare_input(name, x), y, "bf16", before=models.before_step(name, net), optimizer=opt
    )
    return {"model": name, "batch": batch, "compiled": compiled, **timed(step, net, batch, args, device, flops)}


def run_cifar(timesteps: int, precision: str, batch: int, args, device: torch.device) -> dict:
    """The cifar10 preset's network (3x32x32 in, 10 classes) on synthetic CIFAR-shaped batches."""
    from stbp import resnet19

    net = resnet19(num_classes=10, in_channels=3, timesteps=timesteps, width=args.width)
    net = net.to(device, memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    step = common.make_train_step(net, x, y, precision)
    flops = models.train_flops_per_image(args.width, timesteps, in_channels=3, size=32)
    out = {
        "model": "ours (CIFAR-10)",
        "batch": batch,
        "timesteps": timesteps,
        "precision": precision,
        **timed(step, net, batch, args, device, flops),
    }
    out["epoch_s"] = CIFAR_EPOCH_IMAGES / out["images_per_s"]
    return out


def timed(step, net, batch: int, args, device: torch.device, flops: float) -> dict:
    """Step time (median of chunks), images/s, MFU, MNIST epoch seconds and peak memory of ``step``."""
    first = common.time_call(step)  # includes compilation when compiled
    for _ in range(max(0, args.warmup - 1)):
        step()
    if device.type == "cuda":
        peak, growth = common.cuda_peak_bytes(step, device)
    else:  # no allocator statistics on CPU: the autograd saved tensors stand in for both
        peak = growth = common.saved_tensor_bytes(net, step)

    def chunk() -> None:
        for _ in range(args.steps):
            step()

    times = [common.time_call(chunk) / args.steps for _ in range(args.chunks)]
    t = common.median(times)
    ips = batch / t
    return {
        "step_ms": 1e3 * t,
        "images_per_s": ips,
        "mfu": flops * ips / (args.peak_tflops * 1e12),
        "epoch_s": EPOCH_IMAGES / ips,
        "peak_memory_gib": peak / 2**30,
        "step_memory_gib": growth / 2**30,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "saved tensors",
        "first_step_s": first,
        "chunk_step_ms": [1e3 * s for s in times],
    }


def bench_loader(device: torch.device, batch: int, n_batches: int) -> dict:
    """Images/s out of ``DeviceDataset.train_batches`` (crop padding 4 + hflip) on ``device``."""
    from stbp.data import DatasetTensors, DeviceDataset

    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    labels = lambda n: torch.randint(0, 10, (n,), generator=g)
    data = DeviceDataset(DatasetTensors(rand(60000), labels(60000), rand(10000), labels(10000)), device)

    def consume() -> None:
        for x, _ in itertools.islice(data.train_batches(0, batch, padding=4, hflip=True), n_batches):
            x.sum()
        common.sync(device)

    consume()  # warm-up
    t = common.median(common.time_call(consume) for _ in range(3))
    return {"batch": batch, "images_per_s": batch * n_batches / t}


def summarise(results: list[dict]) -> None:
    ours = {(r["batch"], r["compiled"]): r for r in results if r.get("model") == "ours" and "images_per_s" in r}
    for r in results:
        if r.get("model") in ("ref", "sj") and "images_per_s" in r and (r["batch"], False) in ours:
            r["ours_speedup"] = ours[(r["batch"], False)]["images_per_s"] / r["images_per_s"]


def print_table(report: dict) -> None:
    rows = []
    for r in report["runs"]:
        label = models.LABELS[r["model"]] + (" + compile" if r.get("compiled") else "")
        if "images_per_s" not in r:
            rows.append({"model": label, "batch": r["batch"], "img/s": r.get("error") or r.get("skipped")})
            continue
        rows.append(
            {
                "model": label,
                "batch": r["batch"],
                "img/s": r["images_per_s"],
                "step ms": r["step_ms"],
                "MFU %": 100 * r["mfu"],
                "s/epoch": r["epoch_s"],
                "peak GiB": r["peak_memory_gib"],
                "step GiB": r["step_memory_gib"],
                "first step s": r["first_step_s"],
                "ours faster": f"{r['ours_speedup']:.2f}x" if "ours_speedup" in r else "-",
            }
        )
    print(
        common.table(
            rows,
            [
                "model",
                "batch",
                "img/s",
                "step ms",
                "MFU %",
                "s/epoch",
                "peak GiB",
                "step GiB",
                "first step s",
                "ours faster",
            ],
        )
    )
    cifar = [r for r in report.get("cifar10", []) if "images_per_s" in r]
    if cifar:
        print("\nCIFAR-10 preset (3x32x32, 45,000 images an epoch):")
        print(
            common.table(
                [
                    {
                        "T": r["timesteps"],
                        "precision": r["precision"],
                        "batch": r["batch"],
                        "img/s": r["images_per_s"],
                        "s/epoch": r["epoch_s"],
                        "MFU %": 100 * r["mfu"],
                        "peak GiB": r["peak_memory_gib"],
                    }
                    for r in cifar
                ],
                ["T", "precision", "batch", "img/s", "s/epoch", "MFU %", "peak GiB"],
            )
        )
    if "loader" in report:
        ld = report["loader"]
        print(
            f"\nloader on {report['device']}: {ld['images_per_s']:,.0f} img/s (batch {ld['batch']})"
            + (f", {ld['over_best_model']:.1f}x the fastest model" if "over_best_model" in ld else "")
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        log("no CUDA device: running anyway on CPU (use --smoke for a quick check)")
    torch.backends.cudnn.benchmark = True
    flops = models.train_flops_per_image(args.width, args.timesteps)
    report = {
        "machine": common.machine_info(device),
        "device": str(device),
        "args": vars(args),
        "train_gflops_per_image": flops / 1e9,
        "runs": [],
    }
    if device.type == "cuda":
        report["machine"]["cuda"] = torch.version.cuda
    log(
        f"{report['machine'].get('gpu', 'CPU')}: width {args.width}, T={args.timesteps}, "
        f"{flops / 1e9:.2f} training GFLOP/image; results -> {args.out}"
    )

    for name, batch, compiled in plan(args):
        entry = {"model": name, "batch": batch, "compiled": compiled}
        elapsed = time.monotonic() - start
        if elapsed > args.budget_s:
            entry["skipped"] = f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"
        else:
            log(f"{name} batch {batch}{' compiled' if compiled else ''}")
            entry = attempt(entry, functools.partial(run_one, name, batch, compiled, args, device, flops), device)
        report["runs"].append(entry)
        summarise(report["runs"])
        write(report, args.out)

    report["cifar10"] = []
    for timesteps, precision in [] if args.no_cifar else itertools.product((2, 4), ("bf16", "fp32")):
        entry = {"timesteps": timesteps, "precision": precision}
        if time.monotonic() - start > args.budget_s + 120:  # the CIFAR rows have 2 minutes of their own
            entry["skipped"] = "time budget"
        else:
            log(f"CIFAR-10 preset, T={timesteps}, {precision}")
            entry = attempt(
                entry, functools.partial(run_cifar, timesteps, precision, args.batches[0], args, device), device
            )
        report["cifar10"].append(entry)
        write(report, args.out)

    report["loader"] = bench_loader(device, max(args.batches), n_batches=5 if args.smoke else 50)
    best = max((r["images_per_s"] for r in report["runs"] if "images_per_s" in r), default=None)
    if best:
        report["loader"]["over_best_model"] = report["loader"]["images_per_s"] / best
    report["total_s"] = time.monotonic() - start
    write(report, args.out)
    print_table(report)
    log(f"done in {report['total_s']:.0f} s; wrote {args.out}")
    return 0


def attempt(entry: dict, run, device: torch.device) -> dict:
    """``run()``'s figures (logged), or ``entry`` with the error: one failing run (an OOM, a compile error) must not
    lose the others."""
    try:
        out = run()
    except Exception as e:
        traceback.print_exc()
        return {**entry, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log(
        f"  {out['images_per_s']:,.0f} img/s, MFU {100 * out['mfu']:.1f}%, {out['epoch_s']:.1f} s/epoch, "
        f"{out['peak_memory_gib']:.2f} GiB"
    )
    return out


def write(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
