"""Screenshots of a sweep in the MLflow UI (the README's "Comparing trials" pictures), taken with headless Chromium.

    mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --host 127.0.0.1 --port 5000 &
    python bench/ui_screenshots.py --tracking_uri http://127.0.0.1:5000 --experiment stbp-smoke --out docs/

For the newest sweep (parent run) of the experiment it writes ``<prefix>_runs.png`` (the runs table with the sweep's
trials nested under it), ``<prefix>_compare.png`` (the compare page of all its trials: the parallel-coordinates
plot of the swept parameters against the first metric) and ``<prefix>_trial.png`` (the best trial's metric charts),
and copies the sweep's report pictures (landscape, slices, Pareto front) beside them. Debian: ``apt-get install
chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def shoot(url: str, path: Path, width: int, height: int, budget_ms: int = 20000) -> Path:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:  # a fresh browser: what a new user sees
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    print(f"{path}  <-  {url}")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking_uri", required=True, help="an MLflow server (http://...), as the UI is served")
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--sweep", default=None, help="the sweep (parent run name; default: the newest)")
    p.add_argument("--prefix", default=None, help="file name prefix (default: the sweep's name)")
    args = p.parse_args()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {args.tracking_uri}")
    parents = client.search_runs([exp.experiment_id], "tags.`stbp.role` = 'sweep'", order_by=["start_time DESC"])
    parents = [r for r in parents if args.sweep in (None, r.info.run_name)]
    if not parents:
        raise SystemExit(f"no sweep {args.sweep or ''} in {args.experiment!r}")
    parent = parents[0]
    prefix = args.prefix or parent.info.run_name
    ui = args.tracking_uri.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    shoot(f"{ui}/#/experiments/{exp.experiment_id}/runs", args.out / f"{prefix}_runs.png", 1500, 900)
    shoot(parent.data.tags["compare_trials_url"], args.out / f"{prefix}_compare.png", 1500, 1100)
    if "best_run_id" in parent.data.tags:
        shoot(
            f"{ui}/#/experiments/{exp.experiment_id}/runs/{parent.data.tags['best_run_id']}/model-metrics",
            args.out / f"{prefix}_trial.png",
            1500,
            1000,
        )
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(client.download_artifacts(parent.info.run_id, "report", tmp))
        for name in ("landscape.png", "slices.png", "pareto.png"):
            if (report / name).is_file():
                shutil.copyfile(report / name, args.out / f"{prefix}_{name}")
                print(args.out / f"{prefix}_{name}")


if __name__ == "__main__":
    main()
