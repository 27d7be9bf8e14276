"""Time to accuracy of the cpu preset and of each lever, side by side on the same data (BENCHMARKS.md).

    python bench/levers.py [--only NAME ...] [--seeds 0 1] [--out DIR] [-- --extra --train --flags]

Each variant is ``python train_ddp.py --preset cpu`` plus its overrides, run as its own process one after the other
(never two at once: on 2 cores a second run would halve both), on the full MNIST split (54,000 train / 6,000 val,
the 10,000 test images scored once at the end on the best-validation checkpoint). Printed per variant: test and
best validation accuracy, the whole command's wall time (start-up and data loading included) and the mean
training img/s. Results are appended as JSON lines to ``DIR/levers.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The cpu preset before the levers below: 3 epochs, batch 128, Adam 3e-3, cosine, no warm-up, plain cross-entropy,
#: no EMA. Each lever is measured alone on top of it; "cpu" is the preset as shipped.
BEFORE = [
    "--epochs",
    "3",
    "--batch_size",
    "128",
    "--lr",
    "3e-3",
    "--schedule",
    "cosine",
    "--warmup_epochs",
    "0",
    "--label_smoothing",
    "0",
    "--ema_decay",
    "0",
    "--loss",
    "ce",
    "--width",
    "0.125",
]
VARIANTS: dict[str, list[str]] = {
    "cpu": [],
    "before": BEFORE,
    "+warmup0.3": [*BEFORE, "--warmup_epochs", "0.3"],
    "+smoothing0.1": [*BEFORE, "--label_smoothing", "0.1"],
    "+ema0.999": [*BEFORE, "--ema_decay", "0.999"],
    "+all3": [*BEFORE, "--warmup_epochs", "0.3", "--label_smoothing", "0.1", "--ema_decay", "0.999"],
    "+tet": [*BEFORE, "--loss", "tet"],
    "+batch64": [*BEFORE, "--batch_size", "64"],
    "+batch256": [*BEFORE, "--batch_size", "256", "--lr", "5e-3"],
    "+4epochs": [*BEFORE, "--epochs", "4"],
    "width0.25_2epochs": [*BEFORE, "--width", "0.25", "--epochs", "2"],
}


def _metrics(run_dir: Path) -> list[dict]:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["metrics"]


def run(name: str, extra: list[str], seed: int, out: Path) -> dict:
    run_dir = out / f"{name}-s{seed}"
    cmd = [
        sys.executable,
        "train_ddp.py",
        "--preset",
        "cpu",
        *VARIANTS[name],
        *extra,
        "--seed",
        str(seed),
        "--output_dir",
        str(run_dir),
        "--resume",
        "never",
        "--mlflow",
        "false",
    ]
    t0 = time.perf_counter()
    log = (out / f"{name}-s{seed}.log").open("w")
    rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    wall = time.perf_counter() - t0
    row = {
        "variant": name,
        "seed": seed,
        "rc": rc,
        "wall_s": round(wall, 1),
        "command": " ".join(["python", *cmd[1:]]),
        "load": os.getloadavg()[0],
    }
    if rc == 0:
        s = json.loads((run_dir / "summary.json").read_text())
        history = _metrics(run_dir)
        row.update(
            test_acc=s["test_acc"],
            best_val_acc=s["best_val_acc"],
            best_epoch=s["best_epoch"],
            images_per_s=round(s["images_per_s"], 1),
            val_accs=[m["val_acc"] for m in history],
            val_time_s=round(sum(m["val_time_s"] for m in history), 1),
        )
    with (out / "levers.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/levers"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    print("| variant | seed | test acc | best val acc | wall | train img/s | validation time |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    for seed in args.seeds:
        for name in args.only:
            r = run(name, extra, seed, args.out)
            acc = f"{r['test_acc']:.2f}%" if "test_acc" in r else f"failed (rc {r['rc']})"
            val = f"{r.get('best_val_acc', float('nan')):.2f}%"
            print(
                f"| {name} | {seed} | {acc} | {val} | {r['wall_s'] / 60:.1f} min | {r.get('images_per_s', '-')} | "
                f"{r.get('val_time_s', '-')} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
