"""What a sweep trial costs beyond its training: ``tune.py`` against Optuna's own loop, on the same trials.

    python bench/sweep_overhead.py [--trials 24] [--concurrency 2] [--skip-smoke]
    python bench/sweep_overhead.py --workers 2 --trials 6 --concurrency 1 --skip-smoke   # DDP trials: tune.py only

Both sides run the same trials of the ``tiny`` preset (1 epoch of 64 images, the preset's 256 validation and 512
test images), v_th and aa drawn by Optuna's TPE, every trial recorded in the same kind of MLflow store (sqlite in
a fresh directory), on the same data:

- **tune.py**: the sweep as users run it (a local Ray cluster, ``--trials`` trials, ``--concurrency`` at a time,
  no scheduler), wall time of the whole command;
- **in-process Optuna**: ``optuna.create_study().optimize(objective)`` in one fresh process, ``objective`` calling
  :func:`stbp.train.train` with MLflow on, one trial at a time;

and prints trials per minute for each and their ratio. Then the smoke sweep (``sweeps/smoke.yaml``): its wall time
and the share of it spent training, ``sum of every trial's epoch_time_s / (wall time x max_concurrent)``.
Needs the real MNIST (``$STBP_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRIAL = {"preset": "tiny", "train_size": 64, "epochs": 1}
SPACE = {"v_th": {"type": "uniform", "low": 0.2, "high": 0.8}, "aa": {"type": "uniform", "low": 0.2, "high": 1.0}}

OPTUNA_LOOP = textwrap.dedent("""
    import sys, time
    t0 = time.perf_counter()
    import optuna
    from stbp.config import build_config
    from stbp.train import train
    uri, trials, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        cfg = build_config(preset="tiny", overrides=dict(
            train_size=64, epochs=1, v_th=trial.suggest_float("v_th", 0.2, 0.8), aa=trial.suggest_float("aa", 0.2, 1.0),
            tracking_uri=uri, experiment="overhead-optuna", output_dir=f"{out}/trial_{trial.number}"))
        return train(cfg)["best_val_acc"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    print(f"optuna loop: {trials} trials in {time.perf_counter() - t0:.1f} s", flush=True)
""")


def run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Wall seconds of ``cmd`` (its output to ``log``); raises if it fails."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return wall


def tune_sweep(work: Path, trials: int, concurrency: int, workers: int = 1) -> float:
    sweep = {
        "name": "overhead",
        "train": TRIAL,
        "space": SPACE,
        "scheduler": "none",
        "search": {"num_samples": trials, "max_concurrent": concurrency, "seed": 0},
        "resources": {"cpus": 1, "gpus": 0, "workers": workers},
        "mlflow": {"experiment": "overhead-tune"},
        "checkpoints": {"num_to_keep": 1},
    }
    path = work / "overhead.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return run(
        [
            sys.executable,
            str(ROOT / "tune.py"),
            "--sweep",
            str(path),
            "--tracking_uri",
            f"sqlite:///{work / 'mlflow.db'}",
            "--storage",
            str(work / "ray"),
        ],
        work,
        work / "tune.log",
    )


def optuna_loop(work: Path, trials: int) -> float:
    return run(
        [sys.executable, "-c", OPTUNA_LOOP, f"sqlite:///{work / 'mlflow.db'}", str(trials), str(work / "runs")],
        work,
        work / "optuna.log",
    )


def smoke_share(work: Path) -> dict:
    """The smoke sweep's wall time and the share of it (of both slots) spent in training epochs."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{work / 'mlflow.db'}"
    wall = run(
        [
            sys.executable,
            str(ROOT / "tune.py"),
            "--sweep",
            str(ROOT / "sweeps" / "smoke.yaml"),
            "--tracking_uri",
            db,
            "--storage",
            str(work / "ray"),
        ],
        work,
        work / "smoke.log",
    )
    sweep = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    client = MlflowClient(db)
    exp = client.get_experiment_by_name(sweep["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string="tags.ray_trial_id != ''")
    training = sum(m.value for r in runs for m in client.get_metric_history(r.info.run_id, "epoch_time_s"))
    slots = sweep["search"]["max_concurrent"]
    return {
        "wall_s": wall,
        "trials": len(runs),
        "training_s": training,
        "slots": slots,
        "training_share": training / (wall * slots),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--skip-smoke", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="DDP ranks per trial (> 1: tune.py only, timed alone)")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    result: dict = {"trials": args.trials, "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory(prefix="stbp-overhead-") as tmp:
        tune_dir, optuna_dir, smoke_dir = (Path(tmp) / d for d in ("tune", "optuna", "smoke"))
        for d in (tune_dir, optuna_dir, smoke_dir):
            d.mkdir()
        if args.workers > 1:  # Optuna's own loop has no DDP trials to set beside these
            wall = tune_sweep(tune_dir, args.trials, args.concurrency, args.workers)
            print(
                f"tune.py, {args.workers}-rank DDP trials: {args.trials} in {wall:.1f} s, {wall / args.trials:.2f} s "
                "per trial"
            )
            return 0
        result["optuna_s"] = optuna_loop(optuna_dir, args.trials)
        result["tune_s"] = tune_sweep(tune_dir, args.trials, args.concurrency)
        if not args.skip_smoke:
            result["smoke"] = smoke_share(smoke_dir)
    n = args.trials
    result["tune_s_per_trial"], result["optuna_s_per_trial"] = result["tune_s"] / n, result["optuna_s"] / n
    result["ratio"] = result["tune_s"] / result["optuna_s"]
    print(f"| side | {n} trials, wall s | s per trial | trials per minute |\n|---|---|---|---|")
    for side, key in (("tune.py", "tune_s"), ("in-process Optuna", "optuna_s")):
        print(f"| {side} | {result[key]:.1f} | {result[key] / n:.2f} | {60 * n / result[key]:.1f} |")
    print(f"\ntune.py / in-process Optuna: {result['ratio']:.2f}x the wall time per trial")
    if "smoke" in result:
        s = result["smoke"]
        print(
            f"smoke sweep: {s['trials']} trials in {s['wall_s']:.1f} s; training {s['training_s']:.1f} s of "
            f"{s['slots']} x {s['wall_s']:.1f} slot-seconds = {100 * s['training_share']:.0f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
