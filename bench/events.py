"""Events to frames, measured: how fast each data set's official files are read and integrated into frames, and how
long the ``nmnist_cpu`` preset takes an epoch on full-size N-MNIST-shaped data::

    .venv/bin/python bench/events.py throughput [--repeats 3] [--work /tmp/events-bench]
    .venv/bin/python bench/events.py nmnist-cpu [--work /tmp/nmnist-full]

The files are written in the official formats by vectorised twins of the bit-exact writers in
``stbp/data/events/writers.py`` (those write one event at a time, too slow for millions), with events per sample of the
real sets' order: N-MNIST 4,000 over 300 ms, a DVS128 Gesture gesture 250,000 over 6 s, a CIFAR10-DVS recording
200,000 over 1.3 s. The product's readers check every event they read, so a wrong writer fails here, loudly.
Prints Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stbp.data.events import (  # noqa: E402
    CIFAR10_DVS_CLASSES,
    event_splits,
    find_cifar10_dvs,
    integrate_samples,
    sample_events,
)
from stbp.data.events.writers import AEDAT2_HEADER, AEDAT31_HEADER, class_events, write_gesture_labels  # noqa: E402

# events per sample, duration (us); frame settings as the GPU presets use them
SHAPES = {"nmnist": (4_000, 300_000), "dvs_gesture": (250_000, 6_000_000), "cifar10_dvs": (200_000, 1_300_000)}
FRAMES = {
    "nmnist": {"T": 10, "split": "count", "size": None},
    "dvs_gesture": {"T": 16, "split": "count", "size": 64},
    "cifar10_dvs": {"T": 10, "split": "count", "size": 48},
}
FULL = {"nmnist": 70_000, "dvs_gesture": 1_464, "cifar10_dvs": 10_000}  # samples in the whole data set


def nmnist_bytes(ev: np.ndarray) -> bytes:
    t = ev["t"].astype(np.int64)
    cols = [ev["x"], ev["y"], (ev["p"].astype(np.int64) << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF]
    return np.stack([np.asarray(c, np.uint8) for c in cols], axis=1).tobytes()


def aedat31_bytes(ev: np.ndarray, per_packet: int = 4096) -> bytes:
    """Polarity packets (type 1) of ``per_packet`` events; timestamps stay below 2**31 (no overflow)."""
    assert ev["t"].max() < 2**31
    out = [AEDAT31_HEADER]
    for i in range(0, len(ev), per_packet):
        chunk = ev[i : i + per_packet]
        n = len(chunk)
        out.append(np.array([1, 1], "<i2").tobytes() + np.array([8, 4, 0, n, n, n], "<i4").tobytes())
        body = np.empty((n, 2), "<u4")
        body[:, 0] = 1 | chunk["p"].astype(np.uint32) << 1 | chunk["y"].astype(np.uint32) << 2
        body[:, 0] |= chunk["x"].astype(np.uint32) << 17
        body[:, 1] = chunk["t"]
        out.append(body.tobytes())
    return b"".join(out)


def aedat2_bytes(ev: np.ndarray) -> bytes:
    body = np.empty((len(ev), 2), ">u4")
    body[:, 0] = ev["p"].astype(np.uint32) | ev["x"].astype(np.uint32) << 1 | (127 - ev["y"].astype(np.uint32)) << 8
    body[:, 1] = ev["t"]
    return AEDAT2_HEADER + body.tobytes()


def write_nmnist(root: Path, per_digit: dict[str, int]) -> None:
    n, span = SHAPES["nmnist"]
    for split, count in per_digit.items():
        for digit in range(10):
            folder = root / "NMNIST" / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                ev = class_events(digit, (34, 34), n, 0, span, seed=k * 10 + digit)
                (folder / f"{k * 10 + digit + 1:05d}.bin").write_bytes(nmnist_bytes(ev))


def write_dvs_gesture(root: Path, users: int) -> None:
    n, span = SHAPES["dvs_gesture"]
    folder = root / "DVSGesture" / "DvsGesture"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"user{u:02d}_lab" for u in range(1, users + 1)]
    for u, name in enumerate(names):
        parts, rows = [], []
        for label in range(11):
            start = 1_000 + label * span
            parts.append(class_events(label, (128, 128), n, start, span, seed=u * 100 + label))
            rows.append((label + 1, start, start + span))
        (folder / f"{name}.aedat").write_bytes(aedat31_bytes(np.concatenate(parts)))
        write_gesture_labels(folder / f"{name}_labels.csv", rows)
    (folder / "trials_to_train.txt").write_text("".join(f"{n}.aedat\n" for n in names[:-1]))
    (folder / "trials_to_test.txt").write_text(f"{names[-1]}.aedat\n")


def write_cifar10_dvs(root: Path, per_class: int) -> None:
    n, span = SHAPES["cifar10_dvs"]
    for label, name in enumerate(CIFAR10_DVS_CLASSES):
        folder = root / "CIFAR10DVS" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ev = class_events(label, (128, 128), n, 0, span, seed=label * 1000 + i)
            (folder / f"cifar10_{name}_{i}.aedat").write_bytes(aedat2_bytes(ev))


def median_s(repeats: int, fn, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(work: Path, repeats: int) -> None:
    writers = {
        "nmnist": lambda: write_nmnist(work, {"Train": 100, "Test": 20}),
        "dvs_gesture": lambda: write_dvs_gesture(work, users=4),
        "cifar10_dvs": lambda: write_cifar10_dvs(work, per_class=10),
    }
    print("| data set | events a sample | frames | samples | read | read + integrate | whole set, extrapolated |")
    print("|---|---|---|---|---|---|---|")
    for name, write in writers.items():
        write()
        # all the files (CIFAR10-DVS's split needs 100 a class, which a few cannot give)
        samples = find_cifar10_dvs(work) if name == "cifar10_dvs" else sum(event_splits(name, work), [])
        events = SHAPES[name][0] * len(samples)
        read = median_s(repeats, lambda ss: [None for _ in sample_events(ss)], samples)
        settings = {"dataset": name, **FRAMES[name]}
        both = median_s(repeats, integrate_samples, samples, settings)
        f = FRAMES[name]
        size = "sensor" if f["size"] is None else f"{f['size']}x{f['size']}"
        per_sample_ms = 1e3 * both / len(samples)
        print(
            f"| {name} | {SHAPES[name][0]:,} | T={f['T']}, {size} | {len(samples)} "
            f"| {events / read / 1e6:.0f} M events/s | {events / both / 1e6:.0f} M events/s, "
            f"{per_sample_ms:.2f} ms a sample | {FULL[name]:,} samples: {FULL[name] * per_sample_ms / 1e3:.0f} s |"
        )


def nmnist_cpu(work: Path) -> None:
    """Full-size N-MNIST-shaped files (60,000 / 10,000), then ``train_ddp.py --preset nmnist_cpu`` on them."""
    if not (work / "NMNIST" / "Test").exists():
        start = time.perf_counter()
        write_nmnist(work, {"Train": 6_000, "Test": 1_000})
        print(f"wrote 70,000 files in {time.perf_counter() - start:.0f} s")
    out = work / "run"
    cmd = [sys.executable, "train_ddp.py", "--preset", "nmnist_cpu", "--data_dir", str(work)]
    cmd += ["--output_dir", str(out), "--no-mlflow", "--resume", "never"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    total = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    import torch

    history = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["metrics"]
    times = [m["epoch_time_s"] for m in history]
    print(f"command: {' '.join(cmd)}")
    print(f"epoch times (s): {[round(t, 1) for t in times]}; whole run {total:.0f} s (frame cache included)")
    print(f"test accuracy {summary.get('test_acc')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "nmnist-cpu"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path("/tmp") / ("events-bench" if args.what == "throughput" else "nmnist-full")
    work.mkdir(parents=True, exist_ok=True)
    throughput(work, args.repeats) if args.what == "throughput" else nmnist_cpu(work)


if __name__ == "__main__":
    main()
