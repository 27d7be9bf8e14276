"""The streamed image loader (``stbp.data.stream``), measured on the CPU: decoding and augmentation against
torchvision's reference pipeline, peak memory against the data set's size, and the share of a training run spent
waiting for data::

    .venv/bin/python bench/loader.py                     # the whole benchmark (minutes on a quiet machine)
    .venv/bin/python bench/loader.py --workers 4 --images 2048 --data /tmp/imagenet-like
    OMP_NUM_THREADS=1 .venv/bin/python bench/loader.py --smoke    # tiny sizes, well under a minute: proves it runs

1. **Images/s at 224 px** with ``--workers`` decoding processes, batches of ``--batch``, the same images: the product's
   loader (``StreamedDataset.loader`` over a whole epoch's keys: uint8 ``[B, S, S, 3]`` batches, no normalisation)
   against torchvision's ``ImageFolder`` + ``RandomResizedCrop``/``RandomHorizontalFlip``/``PILToTensor`` in a
   ``DataLoader`` (``shuffle=True``, persistent workers): uint8 ``[B, 3, S, S]``, the same bytes. Also ours without
   scaled JPEG decoding (``scaled_decoding=False``: which lever pays) and evaluation-mode decoding (resize to S/0.875,
   centre crop) on both sides (``--no-eval`` skips it). Every configuration keeps its workers; one untimed pass each
   (worker start-up excluded), then ``--repeats`` timed passes in rotating order (A B C, B C A, ...): the median
   images/s and the ratios to torchvision (the median of each round's ratio beside the ratio of the medians).
2. **The data**: an ImageNet-like folder, written once into ``--data`` (a folder per parameter set, reused): real JPEG
   files (quality 90) at ImageNet's typical sizes (median 500x375; mean about 440x360 here, ImageNet's about 400x350),
   ``--classes`` classes, ``--images`` training images, noise ``--noise`` so that the files are photo-sized.
3. **Peak memory against the data set's size**: in a fresh process for each N in ``--memory-sizes``, a listing of N
   files (the real folder's files repeated, built in memory: no million files are written), the StreamedDataset over
   it and ``--memory-batches`` training batches with ``--workers`` workers; the peak RSS of the main process and of the
   largest worker (``getrusage``), the workers' private memory while they run, against N x 3 x S x S bytes (the
   images held in memory).
4. **The data-wait fraction of a training run**: ``stbp.train.train`` on the folder (ResNet-18, width 0.125, T=1, S
   px, batch 16, ``--train-steps`` steps, ``--workers`` workers): its ``data_wait`` and ``images_per_s`` per epoch.

Writes ``$OUT/bench_loader.json`` if ``$OUT`` is set, else ``./bench_loader.json`` (``--out``), and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import common
import numpy as np
from PIL import Image

from stbp.data.catalog import DATASETS
from stbp.data.folders import FolderIndex, list_folder
from stbp.data.images import class_image
from stbp.data.stream import EVAL_RESIZE, StreamedDataset

SPEC = DATASETS["imagefolder"]
#: (width, height) of the images written, in turn: ImageNet's typical sizes (its median is 500x375), a few large ones
#: and the small ones that bring its mean down.
IMAGENET_SIZES = (
    (500, 375), (500, 375), (375, 500), (500, 333), (500, 375), (640, 480), (400, 300), (500, 375), (333, 500),
    (800, 600), (1024, 768), (250, 188), (160, 120), (500, 375), (300, 225), (500, 400), (180, 135), (240, 320),
    (120, 90), (400, 267), (500, 375), (500, 375),
)  # fmt: skip
SMOKE_SIZES = ((64, 48), (48, 64), (72, 54))
IMAGE_BYTES = 3  # uint8 RGB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (24 images of 64x48, 64 px, 1 repeat, N <= 10k)")
    p.add_argument("--data", type=Path, help="cache folder of the written images (default: the temp dir's)")
    p.add_argument("--images", type=int, help="training images written (default 512; smoke 24)")
    p.add_argument("--classes", type=int, help="classes (default 8; smoke 3)")
    p.add_argument("--noise", type=float, default=6.0, help="pixel noise std of the images (sets the file sizes)")
    p.add_argument("--size", type=int, help="crop size S in pixels (default 224; smoke 64)")
    p.add_argument("--batch", type=int, help="images a batch (default 64; smoke 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes on each side")
    p.add_argument("--repeats", type=int, help="timed passes of each configuration (default 3; smoke 1)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation-mode rows")
    p.add_argument("--memory-sizes", type=int, nargs="+", help="files listed (default 1e3 1e4 1e5 1e6; smoke to 1e4)")
    p.add_argument("--memory-batches", type=int, help="training batches each memory run (default 20; smoke 3)")
    p.add_argument("--train-steps", type=int, help="training run's steps, batch 16 (default 30; smoke 2)")
    p.add_argument("--device", default="cpu", help="the training run's device (run.device)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--out", help="JSON path (default $OUT/bench_loader.json, else ./bench_loader.json)")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)  # one memory run, in a fresh process
    p.add_argument("--memory-root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    small = args.smoke
    defaults = {
        "images": (512, 24),
        "classes": (8, 3),
        "size": (224, 64),
        "batch": (64, 8),
        "repeats": (3, 1),
        "memory_sizes": ([1_000, 10_000, 100_000, 1_000_000], [1_000, 10_000]),
        "memory_batches": (20, 3),
        "train_steps": (30, 2),
    }
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    args.data = args.data or Path(tempfile.gettempdir()) / "stbp-bench-loader"
    if args.out is None:
        args.out = str(Path(os.environ["OUT"]) / "bench_loader.json") if os.environ.get("OUT") else "bench_loader.json"
    return args


def log(msg: str) -> None:
    print(f"[loader-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# The data: an ImageNet-like folder of JPEG files
# ----------------------------------------------------------------------------------------------------------


def _write_one(task: tuple) -> None:
    path, label, classes, size, noise, seed = task
    class_image(label, classes, size, np.random.default_rng(seed), noise).save(path, quality=90)


def write_folder(root: Path, images: int, classes: int, sizes, noise: float, seed: int = 0, procs=None) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG`` (``images`` in all, spread over ``classes``) and ``root/val/...`` (1/16
    as many, at least one a class): :func:`stbp.data.images.class_image` JPEGs at quality 90, ImageNet's names (so
    the listing's paths are as long as ImageNet's). Written by ``procs`` processes (default: one a CPU)."""
    tasks = []
    for split, count in (("train", images), ("val", max(classes, images // 16))):
        for label in range(classes):
            wnid = f"n{label:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count // classes + (label < count % classes)):
                size, image_seed = sizes[(i * classes + label) % len(sizes)], (seed, int(split == "val"), label, i)
                tasks.append((str(folder / f"{wnid}_{i}.JPEG"), label, classes, size, noise, image_seed))
    if len(tasks) < 64:
        for task in tasks:
            _write_one(task)
    else:
        with Pool(procs or os.cpu_count()) as pool:
            pool.map(_write_one, tasks, chunksize=16)
    return root


def folder_stats(index: FolderIndex) -> dict:
    """Mean file size (KB) and pixel size of the training files."""
    paths = [os.path.join(index.root, os.fsdecode(p)) for p in index.train_paths.tolist()]
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(img.size)
    return {
        "train_images": len(paths),
        "test_images": len(index.test_paths),
        "classes": len(index.classes),
        "mean_file_kb": statistics.mean(os.path.getsize(p) for p in paths) / 1e3,
        "mean_width": statistics.mean(w for w, _ in sizes),
        "mean_height": statistics.mean(h for _, h in sizes),
        "median_pixels": statistics.median(w * h for w, h in sizes),
    }


def cached_folder(args) -> Path:
    """The folder for these parameters under ``--data``: written once (its marker written last), then reused."""
    sizes = SMOKE_SIZES if args.smoke else IMAGENET_SIZES
    tag = "smoke" if args.smoke else "imagenet"
    root = args.data / f"{tag}-{args.images}i-{args.classes}c-noise{args.noise:g}"
    marker = root / "written.json"
    if marker.is_file():
        log(f"reusing the images in {root}")
        return root
    start = time.perf_counter()
    write_folder(root, args.images, args.classes, sizes, args.noise)
    marker.write_text(json.dumps({"images": args.images, "classes": args.classes, "noise": args.noise}) + "\n")
    log(f"wrote {args.images} training images to {root} in {time.perf_counter() - start:.1f} s")
    return root


def repeated_index(index: FolderIndex, n: int) -> FolderIndex:
    """A listing of ``n`` training files: ``index``'s repeated (the same numpy ``S`` arrays a real listing of ``n``
    files holds, without writing them)."""
    return FolderIndex(
        index.root,
        index.classes,
        np.resize(index.train_paths, n),
        np.resize(index.train_labels, n),
        index.test_paths,
        index.test_labels,
    )


# ----------------------------------------------------------------------------------------------------------
# 1. Decoding and augmentation: ours against torchvision's
# ----------------------------------------------------------------------------------------------------------


def ours(index: FolderIndex, args, train: bool, scaled: bool = True) -> tuple[Callable[[], int], object]:
    """A pass over the folder with the product's loader: a whole epoch of training keys (random resized crops and
    flips, a new epoch each pass) or, for evaluation, every training file as a test chunk (the centre crop)."""
    if not train:  # the training files as the test split: the evaluation crop of the same images
        index = FolderIndex(index.root, index.classes, *(index.train_paths, index.train_labels) * 2)
    ds = StreamedDataset(
        index, "cpu", spec=SPEC, image_size=args.size, val_size=1, workers=args.workers, scaled_decoding=scaled
    )
    epochs = itertools.count()
    n, b = len(index.test_paths), args.batch

    def run() -> int:
        if train:  # _Batches' training key: ("train", epoch, step, global_batch, world_size, rank, seed, hflip)
            epoch = next(epochs)
            keys = [("train", epoch, step, b, 1, 0, 0, True) for step in range(ds.num_train_steps(b))]
        else:
            keys = [("test", lo, min(lo + b, n)) for lo in range(0, n, b)]
        ds._plan.keys = keys
        return sum(len(labels) for _, labels in ds.loader)

    return run, ds


def torchvision_reference(root: Path, args, train: bool) -> tuple[Callable[[], int], object]:
    """A pass over ``root/train`` with torchvision's reference pipeline, uint8 out as ours."""
    import torch
    from torchvision import datasets, transforms

    if train:
        crop = [transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip()]
    else:
        crop = [transforms.Resize(round(args.size / EVAL_RESIZE)), transforms.CenterCrop(args.size)]
    data = datasets.ImageFolder(str(root / "train"), transform=transforms.Compose([*crop, transforms.PILToTensor()]))
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch, shuffle=train, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    return (lambda: sum(len(labels) for _, labels in loader)), loader


def bench_throughput(args, root: Path, index: FolderIndex) -> dict:
    """Images/s of each configuration (median of ``repeats`` passes, in rotating order after one untimed pass
    each) and the ratios of ours to torchvision's."""
    makers = {
        "ours": lambda: ours(index, args, train=True),
        "ours, no scaled decoding": lambda: ours(index, args, train=True, scaled=False),
        "torchvision": lambda: torchvision_reference(root, args, train=True),
    }
    if not args.no_eval:
        makers["ours, eval"] = lambda: ours(index, args, train=False)
        makers["torchvision, eval"] = lambda: torchvision_reference(root, args, train=False)
    passes, keep, counts = {}, [], {}
    for name, make in makers.items():
        run, owner = make()
        keep.append(owner)  # their workers live until the end of the timings
        passes[name] = lambda run=run, name=name: counts.__setitem__(name, run())
    times = common.alternate(passes, args.repeats, warmup=1)
    del keep, passes
    gc.collect()  # the loaders' workers end here
    rows = {
        name: {
            "images": counts[name],
            "images_per_s": counts[name] / common.median(t["wall"]),
            "pass_s": t["wall"],
        }
        for name, t in times.items()
    }
    rate = lambda name, r: rows[name]["images"] / rows[name]["pass_s"][r]
    ratios = {}
    for name, base in (
        ("ours", "torchvision"),
        ("ours, no scaled decoding", "torchvision"),
        ("ours", "ours, no scaled decoding"),
        ("ours, eval", "torchvision, eval"),
    ):
        if name in rows and base in rows:
            ratios[f"{name} / {base}"] = {
                "median_ratio": rows[name]["images_per_s"] / rows[base]["images_per_s"],
                "paired_ratio": statistics.median(rate(name, r) / rate(base, r) for r in range(args.repeats)),
            }
    return {"rows": rows, "ratios": ratios}


# ----------------------------------------------------------------------------------------------------------
# 3. Peak memory against the data set's size (one fresh process per size)
# ----------------------------------------------------------------------------------------------------------


def _rss_now() -> int:
    """This process's resident bytes now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident bytes since it started (``VmHWM``). Not ``getrusage(RUSAGE_SELF)``: its
    ``ru_maxrss`` survives ``exec``, so a child started by a large process reports that process's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return 1024 * int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _private_bytes(pid: int) -> int | None:
    """A process's private (unshared) resident bytes: what it adds to the machine's memory."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines[1:])}
    return 1024 * (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0))


def memory_child(args) -> dict:
    """One memory run (in its own process): the listing of ``--memory-child`` files, the StreamedDataset over it,
    ``--memory-batches`` training batches; resident bytes along the way, the peaks at the end."""
    base = _rss_now()
    n = args.memory_child
    index = repeated_index(list_folder(args.memory_root), n)
    after_index = _rss_now()
    ds = StreamedDataset(index, "cpu", spec=SPEC, image_size=args.size, val_size=max(1, n // 100), workers=args.workers)
    after_dataset = _rss_now()
    batches = ds.train_batches(0, args.batch, hflip=True)
    got = sum(len(y) for _, y in itertools.islice(batches, args.memory_batches))
    after_batches = _rss_now()
    private = [b for b in map(_private_bytes, _children()) if b is not None]
    peak_self = _peak_rss()
    del batches, ds
    gc.collect()  # the workers are joined here: their peaks reach RUSAGE_CHILDREN
    return {
        "files": n,
        "index_bytes": sum(getattr(index, k).nbytes for k in ("train_paths", "train_labels")),
        "path_width": index.train_paths.dtype.itemsize,
        "images": got,
        "base_rss": base,
        "after_index_rss": after_index,
        "after_dataset_rss": after_dataset,
        "after_batches_rss": after_batches,
        "peak_main_rss": peak_self,
        "peak_main_getrusage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "worker_private_max": max(private, default=None),
        "workers_seen": len(private),
        "in_memory_bytes": n * IMAGE_BYTES * args.size**2,
    }


def bench_memory(args, root: Path) -> list[dict]:
    rows = []
    for n in args.memory_sizes:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--memory-root", str(root)]
        cmd += ["--size", str(args.size), "--batch", str(args.batch), "--workers", str(args.workers)]
        cmd += ["--memory-batches", str(args.memory_batches)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            rows.append({"files": n, "error": proc.stderr[-2000:]})
            log(f"memory run for {n:,} files failed:\n{proc.stderr[-2000:]}")
            continue
        rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - start})
        r = rows[-1]
        log(f"{n:,} files: main peak {r['peak_main_rss'] / 2**20:,.0f} MiB, worker {r['peak_worker_rss'] / 2**20:,.0f}")
    ok = [r for r in rows if "error" not in r]
    if len(ok) >= 2:  # what one more file costs, from the smallest to the largest listing
        lo, hi = ok[0], ok[-1]
        for key in ("peak_main_rss", "after_dataset_rss", "peak_worker_rss"):
            hi[f"{key}_per_file"] = (hi[key] - lo[key]) / (hi["files"] - lo["files"])
    return rows


# ----------------------------------------------------------------------------------------------------------
# 4. The data-wait fraction of a training run
# ----------------------------------------------------------------------------------------------------------


def bench_training(args, root: Path, index: FolderIndex) -> dict:
    """``stbp.train.train`` on the folder (ResNet-18, width 0.125, T=1): images/s and the fraction of the epoch spent
    waiting for the next batch, as the trainer records them."""
    from stbp.config import build_config
    from stbp.train import train
    from stbp.train.checkpoint import read_checkpoint

    batch, val = min(16, args.batch), max(4, min(32, len(index.train_paths) // 8))
    train_size = min(args.train_steps * batch, len(index.train_paths) - val)
    out = Path(tempfile.mkdtemp(prefix="stbp-bench-loader-run-"))
    cli = ["--dataset", "imagefolder", "--data_dir", str(root), "--arch", "resnet18", "--width", "0.125"]
    cli += ["--timesteps", "1", "--image_size", str(args.size), "--train_size", str(train_size), "--epochs", "1"]
    cli += ["--batch_size", str(batch), "--val_size", str(val), "--test_size", str(min(32, len(index.test_paths)))]
    cli += ["--workers", str(args.workers), "--device", args.device, "--output_dir", str(out), "--no-mlflow"]
    try:
        cfg = build_config(preset="tiny", cli=cli)
        start = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - start
        metrics = read_checkpoint(out / "checkpoints" / "last.pt")["metrics"][-1]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": "build_config(preset='tiny', cli=[" + ", ".join(repr(c) for c in cli) + ", ...]); train(cfg)",
        "steps": train_size // batch,
        "batch": batch,
        "images_per_s": metrics["images_per_s"],
        "data_wait": metrics["data_wait"],
        "summary_images_per_s": summary["images_per_s"],
        "epoch_time_s": metrics.get("epoch_time_s"),
        "run_s": wall,
    }


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    d = report["data"]
    print(
        f"\ndata: {d['train_images']} training images, {d['classes']} classes, mean {d['mean_file_kb']:.0f} KB a file, "
        f"mean {d['mean_width']:.0f}x{d['mean_height']:.0f} px (median {d['median_pixels']:,.0f} pixels); "
        f"crops {report['args']['size']} px, batch {report['args']['batch']}, {report['args']['workers']} workers"
    )
    if "throughput" in report:
        t = report["throughput"]
        rows = [{"loader": n, "img/s": r["images_per_s"], "images a pass": r["images"]} for n, r in t["rows"].items()]
        print(common.table(rows, ["loader", "img/s", "images a pass"]))
        rows = [{"ratio": n, "of medians": r["median_ratio"], "median of paired": r["paired_ratio"]}
                for n, r in t["ratios"].items()]  # fmt: skip
        print(common.table(rows, ["ratio", "of medians", "median of paired"]))
    if "memory" in report:
        mib = lambda v: "-" if v is None else v / 2**20
        rows = [
            {
                "files": f"{r['files']:,}",
                "index MiB": mib(r.get("index_bytes")),
                "main peak MiB": mib(r.get("peak_main_rss")),
                "main after dataset MiB": mib(r.get("after_dataset_rss")),
                "worker peak MiB": mib(r.get("peak_worker_rss")),
                "worker private MiB": mib(r.get("worker_private_max")),
                "images in memory GiB": r["files"] * IMAGE_BYTES * report["args"]["size"] ** 2 / 2**30,
            }
            for r in report["memory"]
        ]
        print("\n" + common.table(rows, list(rows[0])))
        last = report["memory"][-1]
        if "peak_main_rss_per_file" in last:
            print(
                f"per file: main peak {last['peak_main_rss_per_file']:.0f} B, after the dataset "
                f"{last['after_dataset_rss_per_file']:.0f} B, worker peak {last['peak_worker_rss_per_file']:.0f} B"
            )
    if "train" in report:
        r = report["train"]
        print(
            f"\ntraining (ResNet-18 x0.125, T=1, {report['args']['size']} px, batch {r['batch']}, {r['steps']} steps): "
            f"{r['images_per_s']:.1f} img/s, waiting for data {100 * r['data_wait']:.1f}% of the epoch"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    root = cached_folder(args)
    index = list_folder(root)
    report = {"machine": common.machine_info(), "args": vars(args), "command": " ".join(sys.argv)}
    report["data"] = folder_stats(index)
    sections = [
        ("throughput", args.skip_throughput, lambda: bench_throughput(args, root, index)),
        ("memory", args.skip_memory, lambda: bench_memory(args, root)),
        ("train", args.skip_train, lambda: bench_training(args, root, index)),
    ]
    for name, skip, run in sections:
        if skip:
            continue
        log(name)
        report[name] = run()
        common.write_json(report, args.out)
    print_report(report)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
