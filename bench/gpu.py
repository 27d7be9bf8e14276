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

Then ResNet-34 (T=6, 224 px, bf16 autocast, channels_last) fed from disk (``--no-loader`` skips it): an ImageNet-like
folder of ``--loader-images`` JPEG files (bench/loader.py's), streamed by ``StreamedDataset`` with one decoding process
a CPU: images/s, ms per step and the data-wait fraction (seconds blocked on the next batch over the wall time, as the
trainer's ``data_wait``), beside the same model fed synthetic batches already on the device (the ceiling) before and
after, and the loader alone. ``--smoke`` runs it on a CPU at width 0.125 and 32 px::

    python bench/gpu.py --batches 128 --no-compile --no-cifar --skip-baselines   # one ResNet-19 row, then these
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common
import loader as streamed_bench
import models
import sj_model
import torch

EPOCH_IMAGES = 54_000  # MNIST train split after the 6,000-image validation hold-out
CIFAR_EPOCH_IMAGES = 45_000  # CIFAR-10 train split after the cifar10 preset's 5,000-image hold-out
IMAGENET_EPOCH_IMAGES = 1_281_167  # ILSVRC2012's training images
FED_ARCH, FED_TIMESTEPS = "resnet34", 6  # the tdBN paper's ImageNet network


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
    p.add_argument("--no-loader", action="store_true", help="skip ResNet-34 fed by the streamed loader")
    p.add_argument("--loader-images", type=int, help="JPEG files written for it (default 2000; smoke 24)")
    p.add_argument("--loader-batch", type=int, help="its batch, halved until it fits (default 64; smoke 4)")
    p.add_argument("--loader-steps", type=int, help="its timed steps per chunk (default 10; smoke 2)")
    p.add_argument("--loader-workers", type=int, help="its decoding processes (default: one a CPU)")
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
    args.loader_images = args.loader_images or (24 if small else 2000)
    args.loader_batch = args.loader_batch or (4 if small else 64)
    args.loader_steps = args.loader_steps or (2 if small else 10)
    args.loader_workers = args.loader_workers or len(os.sched_getaffinity(0))
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


def streamed_section(args, device: torch.device, start: float) -> dict:
    """:func:`run_streamed`'s record, or why not: it starts within 4 minutes past ``--budget-s`` (the CIFAR rows have
    2 of them) and its later phases within 3 more."""
    if time.monotonic() - start > args.budget_s + 240:
        return {"skipped": "time budget"}
    late = lambda: time.monotonic() - start > args.budget_s + 420
    log(f"{FED_ARCH}, T={FED_TIMESTEPS}, fed by the streamed loader ({args.loader_workers} workers)")
    return attempt({}, functools.partial(run_streamed, args, device, late), device)


def run_streamed(args, device: torch.device, late) -> dict:
    """ResNet-34 fed by :class:`~stbp.data.stream.StreamedDataset` from an ImageNet-like JPEG folder (written into a
    temporary folder, removed after), beside the same model fed synthetic on-device batches; phases after the first
    are skipped once ``late()``."""
    from stbp.data.folders import list_folder

    root = Path(tempfile.mkdtemp(prefix="stbp-gpu-loader-"))
    try:
        start = time.perf_counter()
        sizes = streamed_bench.SMOKE_SIZES if args.smoke else streamed_bench.IMAGENET_SIZES
        streamed_bench.write_folder(root, args.loader_images, 10, sizes, noise=6.0, procs=args.loader_workers)
        index = list_folder(root)
        data = {**streamed_bench.folder_stats(index), "write_s": time.perf_counter() - start}
        log(f"  wrote {data['train_images']} JPEGs ({data['mean_file_kb']:.0f} KB a file) in {data['write_s']:.0f} s")
        return {"data": data, **_fed(args, device, index, late)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fed(args, device: torch.device, index, late) -> dict:
    from stbp.core.model import build_network
    from stbp.data.stream import StreamedDataset

    size, workers = 32 if args.smoke else 224, args.loader_workers
    torch.manual_seed(0)
    net = build_network(FED_ARCH, args.width, timesteps=FED_TIMESTEPS).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    flops = _train_flops(net, size, device)
    batch, synthetic = _fit_batch(net, opt, args.loader_batch, size, device)
    step = lambda: _train(net, opt, *synthetic)
    if device.type == "cuda":
        peak, growth = common.cuda_peak_bytes(step, device)
    else:  # no allocator statistics on CPU: the autograd saved tensors stand in for both
        peak = growth = common.saved_tensor_bytes(net, step)
    # One epoch holds the streamed phase's steps (its first round of batches, one per worker, is warm-up)
    epoch_steps = args.warmup + workers + args.chunks * args.loader_steps + 1
    index = streamed_bench.repeated_index(index, epoch_steps * batch + 1)
    ds = StreamedDataset(index, device, spec=streamed_bench.SPEC, image_size=size, val_size=1, workers=workers)
    chunks = lambda feed, warmup: _chunks(net, opt, feed, warmup, args.loader_steps, args.chunks, device)
    out = {"arch": FED_ARCH, "timesteps": FED_TIMESTEPS, "width": args.width, "image_size": size, "batch": batch}
    out.update(workers=workers, train_gflops_per_image=flops / 1e9, steps_per_chunk=args.loader_steps)
    out["synthetic_before"] = chunks(lambda: synthetic, args.warmup)
    phases = {
        "streamed": lambda: chunks(ds.train_batches(0, batch, hflip=True).__next__, args.warmup + workers),
        "loader_only": lambda: _loader_only(ds, batch, workers, args.chunks * args.loader_steps, device),
        "synthetic_after": lambda: chunks(lambda: synthetic, 1),
    }
    for name, phase in phases.items():
        out[name] = {"skipped": "time budget"} if late() else phase()
    ceiling = [ms for k in ("synthetic_before", "synthetic_after") for ms in out[k].get("chunk_step_ms", [])]
    out["synthetic_step_ms"] = common.median(ceiling)
    out["synthetic_images_per_s"] = 1e3 * batch / out["synthetic_step_ms"]
    if "step_ms" in out["streamed"]:
        out["step_ms"] = out["streamed"]["step_ms"]
        out["images_per_s"] = 1e3 * batch / out["step_ms"]
        out["data_wait"] = out["streamed"]["data_wait"]
        out["fed_over_ceiling"] = out["images_per_s"] / out["synthetic_images_per_s"]
    out["rate_of"] = "streamed" if "images_per_s" in out else "synthetic (the streamed phase was skipped)"
    ips = out.get("images_per_s", out["synthetic_images_per_s"])  # what attempt() logs
    out.update(mfu=flops * ips / (args.peak_tflops * 1e12), epoch_s=IMAGENET_EPOCH_IMAGES / ips)
    out.update(peak_memory_gib=peak / 2**30, step_memory_gib=growth / 2**30, images_per_s=ips)
    return out


def _train(net, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    """A training step as ``stbp.train`` runs it (bf16 autocast, channels_last input), with no host sync."""
    from stbp.core.model import channels_last
    from stbp.train import train_step

    train_step(net, opt, channels_last(x), y, torch.bfloat16)


def _fit_batch(net, opt, batch: int, size: int, device: torch.device) -> tuple[int, tuple]:
    """The largest batch from ``batch`` down (halving) whose training step fits in the GPU's memory, with its
    synthetic normalised images (channels_last) and labels, on the device; its first step run."""
    while True:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        try:
            _train(net, opt, x, y)
            common.sync(device)
            return batch, (x, y)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        del x, y
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        log(f"  batch {batch} does not fit: trying {batch // 2}")
        batch //= 2


def _chunks(net, opt, feed, warmup: int, steps: int, chunks: int, device: torch.device) -> dict:
    """``warmup`` untimed steps, then ``chunks`` timed chunks of ``steps`` training steps on the batches ``feed()``
    returns (a device sync at each chunk's end only, as the trainer runs): ms per step (the median chunk's) and the
    fraction of the timed wall time spent in ``feed()``. That is host time, as the trainer's ``data_wait``: where the
    host runs ahead of the GPU (by up to what the launch queue holds) a wait may overlap queued work, so the ratio
    of images/s to the synthetic ceiling is the figure that says whether the loader keeps up."""
    for _ in range(warmup):
        _train(net, opt, *feed())
    per_step, waited, wall = [], 0.0, 0.0
    for _ in range(chunks):
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            x, y = feed()
            waited += time.perf_counter() - t
            _train(net, opt, x, y)
        common.sync(device)
        wall += time.perf_counter() - t0
        per_step.append((time.perf_counter() - t0) / steps)
    return {
        "step_ms": 1e3 * common.median(per_step),
        "chunk_step_ms": [1e3 * t for t in per_step],
        "data_wait": waited / wall,
    }


def _loader_only(ds, batch: int, skip: int, count: int, device: torch.device) -> dict:
    """Images/s out of ``ds.train_batches`` alone (decoded, on the device, normalised) after its first ``skip``
    batches (the workers' first round)."""
    batches = iter(ds.train_batches(1, batch, hflip=True))
    for _ in range(skip):
        next(batches)
    common.sync(device)
    t0 = time.perf_counter()
    for _ in range(count):
        next(batches)
    common.sync(device)
    return {"images_per_s": count * batch / (time.perf_counter() - t0), "batches": count}


def _train_flops(net, size: int, device: torch.device) -> float:
    """Analytic training FLOPs per image of ``net`` at ``size`` px: its conv and linear multiply-adds in one forward
    (as they run, time included), x2 FLOPs per MAC, x3 for forward + backward (as
    :func:`models.train_flops_per_image` for ResNet-19)."""
    macs = 0

    def hook(mod, args, out):
        nonlocal macs
        if isinstance(mod, torch.nn.Conv2d):
            macs += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs += out.numel() * mod.in_features

    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kinds)]
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last))
    net.train()
    for h in handles:
        h.remove()
    return 2.0 * 3.0 * macs


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
    print_streamed(report.get("streamed"))
    if "loader" in report:
        ld = report["loader"]
        print(
            f"\nloader on {report['device']}: {ld['images_per_s']:,.0f} img/s (batch {ld['batch']})"
            + (f", {ld['over_best_model']:.1f}x the fastest model" if "over_best_model" in ld else "")
        )


def print_streamed(r: dict | None) -> None:
    if not r or "synthetic_before" not in r:
        if r:
            print(f"\n{FED_ARCH} fed by the streamed loader: {r.get('error') or r.get('skipped')}")
        return
    d = r["data"]
    print(
        f"\n{FED_ARCH}, T={r['timesteps']}, width {r['width']}, {r['image_size']} px, bf16, batch {r['batch']}, "
        f"{r['workers']} decoding workers; {d['train_images']} JPEGs, {d['mean_file_kb']:.0f} KB and "
        f"{d['mean_width']:.0f}x{d['mean_height']:.0f} px on average; {r['peak_memory_gib']:.1f} GiB peak:"
    )
    rows = []
    for name, label in (
        ("synthetic_before", "synthetic on-device batches (before)"),
        ("streamed", "StreamedDataset"),
        ("synthetic_after", "synthetic on-device batches (after)"),
        ("loader_only", "StreamedDataset alone, no model"),
    ):
        x = r[name]
        if "skipped" in x:
            rows.append({"fed by": label, "img/s": x["skipped"]})
            continue
        ips = x["images_per_s"] if "images_per_s" in x else 1e3 * r["batch"] / x["step_ms"]
        rows.append({"fed by": label, "img/s": ips, "step ms": x.get("step_ms", "-")})
        if "data_wait" in x:
            rows[-1]["data wait %"] = 100 * x["data_wait"]
    print(common.table(rows, ["fed by", "img/s", "step ms", "data wait %"]))
    if "fed_over_ceiling" in r:
        print(
            f"fed from disk at {100 * r['fed_over_ceiling']:.0f}% of the ceiling; MFU {100 * r['mfu']:.1f}%, "
            f"{r['epoch_s'] / 60:.0f} min an ImageNet epoch"
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
        common.write_json(report, args.out)

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
        common.write_json(report, args.out)

    if not args.no_loader:
        report["streamed"] = streamed_section(args, device, start)
        common.write_json(report, args.out)

    report["loader"] = bench_loader(device, max(args.batches), n_batches=5 if args.smoke else 50)
    best = max((r["images_per_s"] for r in report["runs"] if "images_per_s" in r), default=None)
    if best:
        report["loader"]["over_best_model"] = report["loader"]["images_per_s"] / best
    report["total_s"] = time.monotonic() - start
    common.write_json(report, args.out)
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


if __name__ == "__main__":
    sys.exit(main())
