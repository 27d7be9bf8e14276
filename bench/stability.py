"""How stable is the smoke sweep's answer (the best point, the working region in aa/v_th) under the seed noise?

Runs ``sweeps/smoke.yaml`` as it is but with every point trained 3 times (``search.repeats: 3``, seeds 0, 1, 2;
``scheduler: none``, as replicates need), then answers the sweep's question from the same points as a one-seed
sweep would (each seed alone), as two seeds would (each pair) and as all three do (the mean)::

    .venv/bin/python bench/stability.py [--repeats 3] [--work /tmp/stability]

Prints a Markdown table for BENCHMARKS.md. The 10 points are the ones TPE proposed from the means; a one-seed sweep
would have proposed others after its first trials, so the table compares answers over the same points.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_sweep(work: Path, repeats: int) -> Path:
    data = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    data.update(name="stability", scheduler="none")
    data["search"]["repeats"] = repeats
    data["mlflow"] = {"experiment": "stbp-stability", "registered_model": None}
    path = work / "stability.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    start = time.perf_counter()
    args = ["--sweep", str(path), "--storage", str(work / "ray"), "--tracking_uri", uri]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    subprocess.run([sys.executable, str(ROOT / "tune.py"), *args], cwd=work, env=env, check=True)
    print(f"sweep: {time.perf_counter() - start:.0f} s")
    return path


def answer(points, sweep) -> tuple:
    from stbp.sweep.analysis import RATIO, derived, working_region

    region = working_region(points, sweep)
    best = points[0]
    return best, region["ranges"].get(RATIO), region["trials"], derived(best.params).get(RATIO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/stbp-stability"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from stbp.sweep import load_sweep
    from stbp.sweep.record import SweepRecord, by_point, collect_rows

    path = run_sweep(args.work, args.repeats)
    sweep = load_sweep(path)
    record = SweepRecord(**json.loads((args.work / "ray" / "stability" / "mlflow_parent.json").read_text()))
    trials = collect_rows(record, sweep)
    print("| answer from | best point (v_th, aa; aa/v_th) | its val_acc | working region aa/v_th | points inside |")
    print("|---|---|---|---|---|")
    for k in range(1, args.repeats + 1):
        for seeds in itertools.combinations(range(args.repeats), k):
            chosen = [t for t in trials if int(t.tags.get("replicate", 0)) in seeds]
            points = by_point(chosen, sweep)
            best, ratio, inside, best_ratio = answer(points, sweep)
            std = f" ± {best.std['val_acc']:.1f}" if k > 1 else ""
            print(
                f"| seed{'s' if k > 1 else ''} {', '.join(map(str, seeds))} "
                f"| {best.params['v_th']:.2f}, {best.params['aa']:.2f}; {best_ratio:.2f} "
                f"| {best.value:.1f}{std} | {ratio[0]:.2f}–{ratio[1]:.2f} | {inside} of {len(points)} |"
            )


if __name__ == "__main__":
    main()
