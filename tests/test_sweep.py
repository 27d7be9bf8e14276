"""Sweeps end to end: tune.py starts its own local Ray cluster, trains real MNIST trials and records them in a
real MLflow server that the tests start; plus the pieces (MLflow record, report, checkpoints) on their own."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from stbp.config import build_config
from stbp.sweep import load_sweep, sweep_to_dict
from stbp.sweep.plots import plot_landscape
from stbp.sweep.record import (
    PARENT_TAG,
    TRIAL_TAG,
    SweepCallback,
    TrialRow,
    child_run,
    collect_rows,
    fail_child,
    open_sweep_record,
)
from stbp.sweep.report import best_config, format_table, importances
from stbp.sweep.trial import TrialPlan, restore_checkpoint, trial_config
from tests._dist import free_port
from tests._procs import cmdline, descendants, group_alive, start_mlflow_server, stop_group, wait_for

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"v_th": 0.4, "aa": 0.5}  # the reference point: learns within an epoch at lr 0.01
BAD = {"v_th": 3.0, "aa": 0.1}  # a threshold that silences the network: chance accuracy, stopped by ASHA
BAD2 = {"v_th": 2.8, "aa": 0.1}


def write_sweep(directory: Path, name: str, points, num_samples: int, resources: dict, **changes) -> Path:
    """The shipped smoke sweep made small and deterministic: the tiny preset on 1,024 images in batches of 8, one
    trial at a time; a learning, then a silent point. (The tiny network starts to learn after 50 to 100 steps: with
    the preset's 16 steps an epoch, the good point's first epoch ended at chance as often as not, level with the
    silent point that ASHA must stop there.) No model is registered unless ``changes`` says so."""
    data = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    data["name"] = name
    data["train"] = {"preset": "tiny", "lr": 0.01, "epochs": 2, "train_size": 1024, "batch_size": 8}
    data["space"] = {
        "v_th": {"type": "uniform", "low": 0.2, "high": 3.0},
        "aa": {"type": "uniform", "low": 0.1, "high": 1.0},
    }
    data["search"].update(num_samples=num_samples, max_concurrent=1, points_to_evaluate=points)
    data["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}  # stops the silent point at 1
    data["resources"] = resources
    data["mlflow"] = {"experiment": f"stbp-{name}", "registered_model": None}
    data.update(changes)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tune_env(data_dir: str) -> dict[str, str]:
    # Token auth (Ray >= 2.59) is off, as in CI; PYTHONUNBUFFERED keeps the log in order.
    return {**os.environ, "STBP_DATA_DIR": data_dir, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def start_tune(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tune.py"), *args],
        cwd=cwd,
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 - a file, not a pipe: a long log cannot block the child
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: what a SIGKILLed driver leaves behind can be found
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # let Ray shut down its cluster, then insist
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        pytest.fail(f"tune.py did not finish within {timeout}s; its output:\n{tail(log)}")
    return rc, log.read_text()


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text()[-chars:] if log.exists() else "(no output)"


def run_tune(args, cwd, env, log, timeout=900) -> tuple[int, str]:
    return finish(start_tune(args, cwd, env, log), log, timeout)


def children(client: MlflowClient, parent_id: str, exp_id: str):
    return client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")


def the_parent(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(f"stbp-{name}")
    assert exp is not None, f"no MLflow experiment stbp-{name}"
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`stbp.role` = 'sweep'")
    assert len(parents) == 1, f"expected one parent run, got {len(parents)}"
    return exp.experiment_id, parents[0]


def params_of(run) -> dict[str, float]:
    return {k: float(run.data.params[k]) for k in ("v_th", "aa")}


def epochs_logged(client, run, metric="val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))


# ----------------------------------------------------------------------------------------------------------
# A real MLflow tracking server for the end-to-end sweeps
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


# ----------------------------------------------------------------------------------------------------------
# End to end: a sweep interrupted by SIGINT after its first trials, then resumed
# ----------------------------------------------------------------------------------------------------------


def wait_for_closed_children(client, name, proc, log, count, timeout=600.0) -> None:
    """Until ``count`` child runs of sweep ``name`` are closed (FINISHED or KILLED)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"tune.py exited ({proc.returncode}) before {count} trials ended:\n{tail(log)}")
        exp = client.get_experiment_by_name(f"stbp-{name}")
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.{TRIAL_TAG} != ''")
            if sum(r.info.status in ("FINISHED", "KILLED") for r in runs) >= count:
                return
        time.sleep(1.0)
    pytest.fail(f"{count} trials did not end within {timeout}s:\n{tail(log)}")


@pytest.fixture(scope="module")
def resumed_sweep(mlflow_server, tmp_path_factory, data_dir):
    """3 trials (the good point, the silent point, one from TPE): SIGINT once the first two have ended,
    then ``--resume``. Returns what the tests look at."""
    work = tmp_path_factory.mktemp("sweep")
    path = write_sweep(work, "e2e", [GOOD, BAD], 3, {"cpus": 2, "gpus": 0, "workers": 1})
    args = ["--sweep", str(path), "--tracking_uri", mlflow_server, "--timesteps", "1"]
    env, client = tune_env(data_dir), MlflowClient(mlflow_server)

    first_log = work / "first.log"
    proc = start_tune(args, work, env, first_log)
    wait_for_closed_children(client, "e2e", proc, first_log, count=2)
    proc.send_signal(signal.SIGINT)
    first_rc, first_out = finish(proc, first_log, timeout=180)
    exp_id, parent = the_parent(client, "e2e")
    interrupted = {r.info.run_id: r for r in children(client, parent.info.run_id, exp_id)}
    parent_status_after_interrupt = client.get_run(parent.info.run_id).info.status

    second_rc, second_out = run_tune([*args, "--resume"], work, env, work / "second.log")
    return types.SimpleNamespace(
        client=client,
        work=work,
        exp_id=exp_id,
        parent_id=parent.info.run_id,
        first=(first_rc, first_out),
        second=(second_rc, second_out),
        interrupted=interrupted,
        parent_status_after_interrupt=parent_status_after_interrupt,
    )


@pytest.mark.slow
def test_sigint_stops_the_sweep_and_resume_completes_it(resumed_sweep):
    rc, out = resumed_sweep.first
    assert rc == 130, f"the interrupted driver should exit 130:\n{out[-6000:]}"
    assert "--resume" in out
    assert resumed_sweep.parent_status_after_interrupt == "KILLED"
    rc, out = resumed_sweep.second
    assert rc == 0, f"the resumed sweep failed:\n{out[-6000:]}"


@pytest.mark.slow
def test_resume_reruns_no_finished_trial_and_duplicates_no_run(resumed_sweep):
    s = resumed_sweep
    runs = children(s.client, s.parent_id, s.exp_id)
    assert len(runs) == 3, [r.data.tags.get(TRIAL_TAG) for r in runs]  # exactly num_samples children
    assert len({r.data.tags[TRIAL_TAG] for r in runs}) == 3
    _, parent = the_parent(s.client, "e2e")  # still one parent
    assert parent.info.run_id == s.parent_id
    _, resumed_out = s.second
    for run_id, before in s.interrupted.items():
        if before.info.status == "FINISHED":
            assert f"stbp_trial_{before.data.tags[TRIAL_TAG]} started" not in resumed_out
            after = s.client.get_run(run_id)
            assert after.info.status == "FINISHED"
            assert epochs_logged(s.client, after) == [1, 2]  # trained once, not again


@pytest.mark.slow
def test_each_trial_is_a_nested_child_with_params_epoch_metrics_and_checkpoints(resumed_sweep):
    s = resumed_sweep
    for run in children(s.client, s.parent_id, s.exp_id):
        assert run.data.tags[PARENT_TAG] == s.parent_id
        params = run.data.params
        assert {"v_th", "aa", "width", "epochs", "lr", "timesteps"} <= set(params)  # the whole config
        assert params["width"] == "0.0625" and params["timesteps"] == "1" and params["lr"] == "0.01"
        steps = epochs_logged(s.client, run)
        assert steps == list(range(1, len(steps) + 1)) and steps, f"per-epoch val_acc steps: {steps}"
        assert epochs_logged(s.client, run, "train_loss") == steps
        ckpts = {a.path for a in s.client.list_artifacts(run.info.run_id, "checkpoints")}
        assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= ckpts
        assert run.info.status in ("FINISHED", "KILLED"), run.info.status


@pytest.mark.slow
def test_finished_and_early_stopped_trials_are_closed_with_their_status(resumed_sweep):
    s = resumed_sweep
    by_point = {tuple(params_of(r).values()): r for r in children(s.client, s.parent_id, s.exp_id)}
    good, bad = by_point[tuple(GOOD.values())], by_point[tuple(BAD.values())]
    assert good.info.status == "FINISHED" and "test_acc" in good.data.metrics
    assert good.data.tags.get("stopped_early") is None
    assert bad.info.status == "KILLED" and bad.data.tags.get("stopped_early") == "true"
    assert epochs_logged(s.client, bad) == [1]  # ASHA stopped it at its first rung
    assert "test_acc" not in bad.data.metrics


@pytest.mark.slow
def test_parent_records_the_best_trial_and_the_report(resumed_sweep, tmp_path):
    s = resumed_sweep
    parent = s.client.get_run(s.parent_id)
    runs = children(s.client, s.parent_id, s.exp_id)
    best = max(runs, key=lambda r: max(m.value for m in s.client.get_metric_history(r.info.run_id, "val_acc")))
    best_value = max(m.value for m in s.client.get_metric_history(best.info.run_id, "val_acc"))
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best_value)
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert float(parent.data.params["best.v_th"]) == pytest.approx(float(best.data.params["v_th"]))
    assert {k: parent.data.tags[k] for k in ("searcher", "sampler", "scheduler")} == {
        "searcher": "optuna",
        "sampler": "tpe",
        "scheduler": "asha",
    }
    assert {a.path for a in s.client.list_artifacts(s.parent_id, "sweep")} == {
        "sweep/e2e.yaml",
        "sweep/sweep.yaml",
    }
    report = {a.path for a in s.client.list_artifacts(s.parent_id, "report")}
    assert {"report/trials.csv", "report/landscape.png", "report/best_config.yaml"} <= report
    local = Path(s.client.download_artifacts(s.parent_id, "report", str(tmp_path)))
    assert len((local / "trials.csv").read_text().strip().splitlines()) == 1 + 3
    assert (local / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    cfg = build_config(yaml_path=local / "best_config.yaml")  # what `train_ddp.py --config` reads
    assert cfg.model.v_th == pytest.approx(float(best.data.params["v_th"]))
    assert cfg.model.width == 0.0625 and cfg.model.timesteps == 1 and cfg.run.epochs == 2
    assert cfg.tracking.run_id is None and cfg.run.output_dir == "runs/e2e-best"


@pytest.mark.slow
def test_terminal_shows_the_ranked_trials_and_the_mlflow_link(resumed_sweep):
    _, out = resumed_sweep.second
    assert "rank  point" in out and "best val_acc" in out and "stopped early" in out and "finished" in out
    assert f"/#/experiments/{resumed_sweep.exp_id}/runs" in out
    assert "train_ddp.py --config" in out


# ----------------------------------------------------------------------------------------------------------
# End to end: a multi-objective sweep (accuracy against synaptic operations), run twice
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_sweeps(mlflow_server, tmp_path_factory, data_dir):
    """The same sweep file run twice in one directory, made multi-objective by one option: two sweeps, two parent
    runs, two versions of the registered model."""
    work = tmp_path_factory.mktemp("multi")
    path = write_sweep(
        work, "multi", [GOOD, BAD], 3, {"cpus": 2, "gpus": 0, "workers": 1}, mlflow={"experiment": "stbp-multi"}
    )  # registered_model: the default, stbp-{name}
    args = [
        "--sweep",
        str(path),
        "--tracking_uri",
        mlflow_server,
        "--metric",
        "val_acc,sops_per_image",
        "--epochs",
        "1",
        "--train_size",
        "1024",
        "--batch_size",
        "32",
        "--lr",
        "0.005",
        "--test_size",
        "256",
    ]
    env, client = tune_env(data_dir), MlflowClient(mlflow_server)
    runs = [run_tune(args, work, env, work / f"run{i}.log") for i in (1, 2)]
    exp = client.get_experiment_by_name("stbp-multi")
    parents = client.search_runs(
        [exp.experiment_id], filter_string="tags.`stbp.role` = 'sweep'", order_by=["attributes.start_time ASC"]
    )
    return types.SimpleNamespace(client=client, work=work, exp_id=exp.experiment_id, runs=runs, parents=parents)


@pytest.mark.slow
def test_running_a_sweep_twice_makes_two_sweeps_and_two_parent_runs(multi_sweeps):
    s = multi_sweeps
    for rc, out in s.runs:
        assert rc == 0, out[-6000:]
    assert "ASHA (which ranks trials by one) is off" in s.runs[0][1]
    assert "starting sweep 'multi-2'" in s.runs[1][1]
    assert [p.info.run_name for p in s.parents] == ["multi", "multi-2"]
    assert all(p.info.status == "FINISHED" and p.data.tags["metric"] == "val_acc,sops_per_image" for p in s.parents)
    assert (s.work / "ray_results" / "multi").is_dir() and (s.work / "ray_results" / "multi-2").is_dir()
    assert len(children(s.client, s.parents[0].info.run_id, s.exp_id)) == 3  # the first is untouched


@pytest.mark.slow
def test_a_multi_objective_sweep_ends_with_the_pareto_front_tagged_and_drawn(multi_sweeps, tmp_path):
    s = multi_sweeps
    parent = s.parents[0]
    runs = children(s.client, parent.info.run_id, s.exp_id)
    report = {a.path for a in s.client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/pareto.csv", "report/pareto.png", "report/slices.png", "report/sensitivity.json"} <= report
    local = Path(s.client.download_artifacts(parent.info.run_id, "report", str(tmp_path)))
    import csv

    with open(local / "pareto.csv") as f:
        front = {row["run_id"] for row in csv.DictReader(f)}
    tagged = {r.info.run_id for r in runs if r.data.tags.get("pareto_optimal") == "true"}
    assert front and tagged == front and all(r.data.tags.get("pareto_optimal") in ("true", "false") for r in runs)
    # The front, by its definition, on what MLflow recorded: no trial is better in both metrics.
    last = {r.info.run_id: (r.data.metrics["val_acc"], r.data.metrics["sops_per_image"]) for r in runs}
    for run_id in front:
        acc, sops = last[run_id]
        assert not any(a >= acc and c <= sops and (a, c) != (acc, sops) for a, c in last.values())
    assert parent.data.tags["pareto_trials"] and (local / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_trial_s_parameters_are_its_config_without_paths_and_its_spike_cost_is_logged(multi_sweeps):
    s = multi_sweeps
    for run in children(s.client, s.parents[0].info.run_id, s.exp_id):
        params, tags = run.data.params, run.data.tags
        assert {"v_th", "aa", "width", "lr"} <= set(params)
        assert not {"output_dir", "data_dir", "run_name", "run_id", "tracking_uri", "experiment"} & set(params)
        assert not [v for v in params.values() if "/" in v], params  # no path among them
        assert Path(tags["output_dir"]).is_dir() and tags["mlflow.parentRunId"] == s.parents[0].info.run_id
        assert {"spikes_per_image", "sops_per_image", "energy_uj_per_image", "firing_rate"} <= set(run.data.metrics)
        assert not [k for k in run.data.metrics if "/" in k]  # per-layer rates: a table, not 18 charts first
        assert "firing_rates.csv" in {a.path for a in s.client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_the_compare_link_is_printed_and_tagged_with_every_trial(multi_sweeps):
    from urllib.parse import unquote

    s = multi_sweeps
    for (_, out), parent in zip(s.runs, s.parents):
        url = unquote(parent.data.tags["compare_trials_url"])
        ids = [r.info.run_id for r in children(s.client, parent.info.run_id, s.exp_id)]
        assert url.startswith(f"{s.client.tracking_uri}/#/compare-runs?runs=[") and all(i in url for i in ids)
        assert f'experiments=["{s.exp_id}"]' in url and parent.data.tags["compare_trials_url"] in out
        assert f"/#/experiments/{s.exp_id}/runs" in out and "Where it works:" in out and "aa/v_th" in out


@pytest.mark.slow
def test_the_best_trial_is_registered_and_loads_by_name_scoring_like_best_pt(multi_sweeps, data_dir):
    from stbp.train.evaluate import evaluate_checkpoint
    from tests.test_registry import registry_accuracy

    s = multi_sweeps
    versions = s.client.search_model_versions("name = 'stbp-multi'")
    assert sorted(v.version for v in versions) == ["1", "2"]  # one per sweep, under the file's name
    parent = s.client.get_run(s.parents[1].info.run_id)
    best = s.client.get_run(parent.data.tags["best_run_id"])
    assert parent.data.tags["registered_model"] == "models:/stbp-multi/2"
    assert {v.run_id for v in versions if v.version == "2"} == {best.info.run_id}
    expected = evaluate_checkpoint(
        Path(best.data.tags["output_dir"]) / "checkpoints" / "best.pt", data_dir=data_dir, limit=500
    )["test_acc"]
    assert (
        registry_accuracy("models:/stbp-multi/latest", s.client.tracking_uri, data_dir, 500, workdir=s.work) == expected
    )


# ----------------------------------------------------------------------------------------------------------
# Faults: a trial killed mid-epoch, a diverging trial, and a driver SIGKILLed mid-sweep, then resumed
# ----------------------------------------------------------------------------------------------------------

KILLED = {"v_th": 0.4, "aa": 0.5, "lr": 0.01}  # its process is SIGKILLed in epoch 2: retried from epoch 1
DIVERGES = {"v_th": 0.4, "aa": 0.5, "lr": 1e36}  # weights overflow: NaN at step 2; FAILED, not retried
CUT = {"v_th": 0.5, "aa": 0.6, "lr": 0.01}  # running when the driver is SIGKILLed: resumed by --resume


def write_fault_sweep(directory: Path) -> Path:
    data = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    data.update(name="faults", scheduler={"type": "none"}, failures={"max_failures": 1})
    data["train"] = {"preset": "tiny", "epochs": 3, "lr": 0.01, "train_size": 1536}  # epochs of a few seconds
    data["space"] = {
        "v_th": {"type": "uniform", "low": 0.2, "high": 0.8},
        "aa": {"type": "uniform", "low": 0.2, "high": 1.0},
    }
    data["space"]["lr"] = {"type": "loguniform", "low": 1e-3, "high": 1e36}
    data["search"].update(num_samples=3, max_concurrent=1, points_to_evaluate=[KILLED, DIVERGES, CUT])
    data["resources"] = {"cpus": 2, "gpus": 0, "workers": 1}
    data["mlflow"] = {"experiment": "stbp-faults", "registered_model": None}
    path = directory / "faults.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def child_at(client, exp_id, point):
    for run in client.search_runs([exp_id], filter_string=f"tags.{TRIAL_TAG} != ''"):
        if all(float(run.data.params.get(k, "nan")) == pytest.approx(v) for k, v in point.items()):
            return run
    return None


def ray_checkpoint(work: Path, run) -> Path:
    """The first checkpoint Tune persisted for the trial of ``run`` (its epoch 1)."""
    return work / "ray_results" / "faults" / f"trial_{run.data.tags[TRIAL_TAG]}" / "checkpoint_000000"


@pytest.fixture(scope="module")
def faulted_sweep(mlflow_server, tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("faults")
    args = ["--sweep", str(write_fault_sweep(work)), "--tracking_uri", mlflow_server, "--timesteps", "1"]
    env, client = tune_env(data_dir), MlflowClient(mlflow_server)
    first_log = work / "first.log"
    proc = start_tune(args, work, env, first_log)
    try:
        exp = lambda: client.get_experiment_by_name("stbp-faults")  # noqa: E731
        found = lambda point: exp() and child_at(client, exp().experiment_id, point)  # noqa: E731
        # 1. The first trial's process, SIGKILLed once Tune holds its epoch-1 checkpoint (into epoch 2).
        wait_for(lambda: found(KILLED) and ray_checkpoint(work, found(KILLED)).is_dir(), 300, "epoch 1", proc)
        time.sleep(1.0)
        trials = [p for p in descendants(proc.pid) if "ImplicitFunc" in cmdline(p)]
        assert len(trials) == 1, [cmdline(p) for p in descendants(proc.pid)]
        os.kill(trials[0], signal.SIGKILL)
        # 2. The driver, SIGKILLed while the third trial runs (after its first checkpoint).
        wait_for(lambda: found(CUT) and ray_checkpoint(work, found(CUT)).is_dir(), 400, "the third trial", proc)
        cut_before = found(CUT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # Ray's processes share the driver's fate: none is left running on its own.
        wait_for(lambda: not group_alive(proc.pid), 90, "the driver's Ray processes to exit")
    finally:
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    exp_id, parent = the_parent(client, "faults")
    parent_status_after_kill = parent.info.status
    second_rc, second_out = run_tune([*args, "--resume"], work, env, work / "second.log", timeout=900)
    return types.SimpleNamespace(
        client=client,
        exp_id=exp_id,
        parent_id=parent.info.run_id,
        parent_status_after_kill=parent_status_after_kill,
        cut_before=cut_before,
        first=first_log.read_text(),
        second=(second_rc, second_out),
    )


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint_into_the_same_run(faulted_sweep):
    s = faulted_sweep
    run = child_at(s.client, s.exp_id, KILLED)
    assert run.info.status == "FINISHED"
    assert epochs_logged(s.client, run) == [1, 2, 3]  # epoch 1 not trained (or logged) twice
    assert "resumed from epoch 1" in s.first


@pytest.mark.slow
def test_a_diverged_trial_is_failed_with_its_reason_once_and_the_sweep_goes_on(faulted_sweep):
    s = faulted_sweep
    run = child_at(s.client, s.exp_id, DIVERGES)
    assert run.info.status == "FAILED"
    assert "NaN/Inf at epoch 1" in run.data.tags["error"] and "lr 1e+36" in run.data.tags["error"]
    assert (s.first + s.second[1]).count("diverged, not retried") == 1  # max_failures=1 did not rerun it
    assert s.client.get_run(s.parent_id).data.tags["best_run_id"] != run.info.run_id


@pytest.mark.slow
def test_a_sigkilled_driver_is_resumed_with_every_trial_once(faulted_sweep):
    s = faulted_sweep
    rc, out = s.second
    assert rc == 0, out[-6000:]
    assert s.parent_status_after_kill == "RUNNING"  # nobody could close it: --resume takes it over
    exp_id, parent = the_parent(s.client, "faults")
    assert parent.info.run_id == s.parent_id and parent.info.status == "FINISHED"
    runs = children(s.client, s.parent_id, s.exp_id)
    assert sorted(r.data.tags[TRIAL_TAG] for r in runs) == sorted({r.data.tags[TRIAL_TAG] for r in runs})
    assert len(runs) == 3
    cut = child_at(s.client, s.exp_id, CUT)
    assert cut.info.run_id == s.cut_before.info.run_id and cut.info.status == "FINISHED"
    assert sorted(set(epochs_logged(s.client, cut))) == [1, 2, 3]
    assert "resumed from epoch" in out  # from its checkpoint, not from scratch


# ----------------------------------------------------------------------------------------------------------
# DDP trials: two Ray Train workers per trial; a stopped trial frees them for the next one
# ----------------------------------------------------------------------------------------------------------


def test_ray_default_is_a_dependency_so_stopped_ddp_trials_free_their_workers():
    # Ray Train V2 frees a stopped trial's workers through the state API, which ray[tune] alone lacks.
    deps = " ".join(__import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert "ray[default" in deps.replace(" ", "")
    assert importlib.util.find_spec("aiohttp") is not None  # the dashboard that serves the state API


@pytest.mark.slow
def test_ddp_trials_train_on_two_ranks_and_a_stopped_one_frees_its_workers(mlflow_server, tmp_path, data_dir):
    # The machine fits one 2-worker trial: the third trial can only start once the stopped second one's
    # workers are freed.
    path = write_sweep(tmp_path, "ddp", [GOOD, BAD, BAD2], 3, {"cpus": 1, "gpus": 0, "workers": 2})
    # 2,048 images: on 512, two ranks of 16 images (tdBN statistics per rank) leave the good point at chance
    # after its first epoch (no better than the silent points), and ASHA rightly stops nothing.
    args = ["--sweep", str(path), "--tracking_uri", mlflow_server, "--timesteps", "1", "--train_size", "2048"]
    args += ["--batch_size", "16"]  # 128 steps of 8 a rank: the good point learns within its first epoch
    # A stray cluster address in the environment must neither be joined nor mislead Ray Train's cleanup.
    env = {**tune_env(data_dir), "RAY_ADDRESS": "127.0.0.1:9"}
    rc, out = run_tune(args, tmp_path, env, tmp_path / "ddp.log", timeout=900)
    assert rc == 0, out[-6000:]
    client = MlflowClient(mlflow_server)
    exp_id, parent = the_parent(client, "ddp")
    runs = {tuple(params_of(r).values()): r for r in children(client, parent.info.run_id, exp_id)}
    assert len(runs) == 3
    good = runs[tuple(GOOD.values())]
    assert good.info.status == "FINISHED"
    for run in runs.values():
        assert run.data.tags["world_size"] == "2"  # logged by train() on rank 0 of the process group
        assert epochs_logged(client, run)
    summary = Path(client.download_artifacts(good.info.run_id, "summary.json", str(tmp_path)))
    assert yaml.safe_load(summary.read_text())["world_size"] == 2
    for point in (BAD, BAD2):
        run = runs[tuple(point.values())]
        assert run.info.status == "KILLED" and run.data.tags.get("stopped_early") == "true"


# ----------------------------------------------------------------------------------------------------------
# A reused worker: the second trial runs in the first one's process and must train exactly as a fresh one did
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_reused_worker_gives_a_trial_the_result_of_a_fresh_one(mlflow_server, tmp_path, data_dir):
    path = write_sweep(tmp_path, "reuse", [GOOD, GOOD], 2, {"cpus": 2, "gpus": 0, "workers": 1})
    path.write_text(path.read_text().replace("scheduler:\n  type: asha", "scheduler:\n  type: none"))
    assert "type: none" in path.read_text()  # both trials run to their end
    args = ["--sweep", str(path), "--tracking_uri", mlflow_server, "--timesteps", "1"]
    rc, out = run_tune(args, tmp_path, tune_env(data_dir), tmp_path / "reuse.log", timeout=900)
    assert rc == 0, out[-6000:]
    client = MlflowClient(mlflow_server)
    exp_id, parent = the_parent(client, "reuse")
    first, second = sorted(children(client, parent.info.run_id, exp_id), key=lambda r: r.info.start_time)
    assert first.data.tags["worker_pid"] == second.data.tags["worker_pid"]  # one process served both trials
    assert first.data.tags[TRIAL_TAG] != second.data.tags[TRIAL_TAG]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "sops_per_image"):
        histories = [
            [(m.step, m.value) for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
            for r in (first, second)
        ]
        assert histories[0] == histories[1] and len(histories[0]) == 2, key
    assert first.data.metrics["test_acc"] == second.data.metrics["test_acc"]
    assert first.info.status == second.info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------------------
# The pieces, without Ray
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def sweep(tmp_path):
    return load_sweep(ROOT / "sweeps" / "smoke.yaml")


@pytest.fixture
def record(tmp_path, sweep):
    resolved = tmp_path / "sweep.yaml"
    resolved.write_text(yaml.safe_dump(sweep_to_dict(sweep), sort_keys=False))
    return open_sweep_record(sweep, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ray" / "smoke", resolved)


def fake_trial(trial_id, status="TERMINATED", config=None, error=None):
    return types.SimpleNamespace(trial_id=trial_id, status=status, config=config or {}, get_error=lambda: error)


def test_the_parent_run_is_found_again_not_duplicated(tmp_path, sweep, record):
    again = open_sweep_record(sweep, record.tracking_uri, tmp_path / "ray" / "smoke", tmp_path / "sweep.yaml")
    assert again == record
    client = record.client()
    assert len(client.search_runs([record.experiment_id])) == 1
    assert client.get_run(record.parent_run_id).info.status == "RUNNING"


def test_a_trials_child_run_is_found_again_by_its_ray_trial_id(record):
    first = child_run(record, "abc", "trial_abc", {"v_th": 0.4, "aa": 0.5})
    again = child_run(record, "abc", "trial_abc", {"v_th": 0.4, "aa": 0.5})
    other = child_run(record, "def", "trial_def", {"v_th": 0.6, "aa": 0.5})
    assert first == again != other
    run = record.client().get_run(first)
    assert run.data.tags[PARENT_TAG] == record.parent_run_id and run.data.tags[TRIAL_TAG] == "abc"
    assert run.data.params == {"v_th": "0.4", "aa": "0.5"}


def test_callback_closes_stopped_failed_and_interrupted_trials_but_not_finished_ones(record):
    client, cb = record.client(), SweepCallback(record)
    finished = child_run(record, "fin", "t", {})
    client.set_terminated(finished, "FINISHED")  # what train() does on success
    stopped = child_run(record, "stop", "t", {})
    interrupted = child_run(record, "int", "t", {})
    cb.on_trial_complete(0, [], fake_trial("fin"))
    cb.on_trial_complete(0, [], fake_trial("stop"))
    cb.on_trial_error(0, [], fake_trial("err", "ERROR", {"v_th": 0.3}, error="Traceback...\nTrainingDiverged: NaN"))
    cb.on_experiment_end([fake_trial("int", "RUNNING")])
    assert client.get_run(finished).info.status == "FINISHED"
    assert "stopped_early" not in client.get_run(finished).data.tags
    run = client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags["stopped_early"] == "true"
    run = client.get_run(interrupted)
    assert run.info.status == "KILLED" and "stopped_early" not in run.data.tags
    failed = [r for r in client.search_runs([record.experiment_id]) if r.data.tags.get(TRIAL_TAG) == "err"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"  # created: it failed before training
    assert failed[0].data.tags["error"].endswith("TrainingDiverged: NaN")
    assert failed[0].data.params["v_th"] == "0.3"
    # A resumed, formerly failed trial loses its stale error.
    child_run(record, "err", "t", {})
    assert "error" not in client.get_run(failed[0].info.run_id).data.tags


def test_rows_rank_trials_by_their_best_metric_over_epochs(record, sweep):
    client = record.client()
    for trial_id, values in (("a", [10.0, 30.0, 20.0]), ("b", [25.0]), ("c", [])):
        run_id = child_run(record, trial_id, trial_id, {"v_th": 0.5, "aa": 0.5})
        for step, v in enumerate(values, 1):
            client.log_metric(run_id, "val_acc", v, step=step)
    rows = collect_rows(record, sweep)
    assert [(r.trial_id, r.value, r.epochs) for r in rows] == [("a", 30.0, 3), ("b", 25.0, 1), ("c", None, 0)]
    assert rows[0].params == {"v_th": 0.5, "aa": 0.5}
    table = format_table(rows, sweep)
    assert table.splitlines()[0].split() == [
        "rank",
        "point",
        "v_th",
        "aa",
        "aa/v_th",  # the derived coordinate
        "best",
        "val_acc",
        "sops_per_image",  # the spike cost of the last epoch
        "epochs",
        "status",
    ]
    assert table.splitlines()[2].split()[:6] == ["1", "a", "0.5", "0.5", "1", "30"]


def test_a_diverged_trial_is_failed_with_its_reason_and_never_ranked_best(record, sweep):
    client = record.client()
    diverged = child_run(record, "div", "trial_div", {"v_th": 0.5, "aa": 0.5})
    client.log_metric(diverged, "val_acc", 90.0, step=1)  # a good first epoch, then NaN
    healthy = child_run(record, "ok", "trial_ok", {"v_th": 0.4, "aa": 0.5})
    client.log_metric(healthy, "val_acc", 60.0, step=1)
    client.set_terminated(healthy, "FINISHED")
    fail_child(record, diverged, "TrainingDiverged: loss became NaN/Inf at epoch 2, step 3 (lr 1e+20)")
    run = client.get_run(diverged)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("TrainingDiverged: loss became NaN")
    rows = collect_rows(record, sweep)
    assert [(r.trial_id, r.value, r.outcome) for r in rows] == [("ok", 60.0, "finished"), ("div", 90.0, "failed")]


def test_a_ddp_trial_that_diverged_is_told_apart_from_one_that_crashed():
    # How Ray Train 2.60 hands a failed run back to the trial: the ranks' exceptions, wrapped with their
    # tracebacks, through pickle. This pins the assumption _diverged_rank makes about Ray's wrapper.
    import pickle

    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from stbp.sweep.trial import diverged_rank
    from stbp.train import TrainingDiverged

    nan = TrainingDiverged("loss became NaN/Inf at epoch 2, step 5 (lr 1)", epoch=2, step=5, lr=1.0)
    diverged = WorkerGroupError("failed", {r: UserExceptionWithTraceback(nan, "Traceback ...") for r in (0, 1)})
    found = diverged_rank(pickle.loads(pickle.dumps(diverged)))
    assert isinstance(found, TrainingDiverged) and (found.epoch, found.step) == (2, 5)
    crashed = WorkerGroupError("failed", {1: UserExceptionWithTraceback(RuntimeError("CUDA out of memory"), "")})
    assert diverged_rank(pickle.loads(pickle.dumps(crashed))) is None


def rows_for(n: int) -> list[TrialRow]:
    rows = [
        TrialRow(str(i), f"r{i}", {"v_th": 0.2 + 0.05 * i, "aa": 0.3 + 0.02 * i}, "FINISHED", 10.0 + i, 2)
        for i in range(n)
    ]
    return sorted(rows, key=lambda r: -r.value)


def test_landscape_plot_and_importances(tmp_path, sweep):
    rows = rows_for(6) + [TrialRow("x", "rx", {"v_th": 0.5, "aa": 0.5}, "FAILED", None, 0)]
    assert plot_landscape(rows, sweep, tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    scores = importances(rows, sweep)
    assert set(scores) == {"v_th", "aa"} and sum(scores.values()) == pytest.approx(1.0)
    assert importances(rows_for(3), sweep) is None  # too few trials to say


def test_best_config_is_ready_for_train_ddp(tmp_path, sweep, record):
    from stbp.config import save_yaml

    row = rows_for(1)[0]
    save_yaml(best_config(sweep, row, record), tmp_path / "best.yaml")
    cfg = build_config(yaml_path=tmp_path / "best.yaml")
    assert (cfg.model.v_th, cfg.model.aa) == (row.params["v_th"], row.params["aa"])
    assert cfg.run.epochs == sweep.train.run.epochs and cfg.model.width == sweep.train.model.width
    assert cfg.tracking.tracking_uri == record.tracking_uri and cfg.tracking.run_id is None


def test_a_trials_config_points_its_outputs_and_run_at_the_trial(tmp_path, sweep, record):
    from stbp.sweep.spec import Resources

    plan = TrialPlan(sweep.train, str(tmp_path), record, Resources(), 1, "/data/mnist", sweep.metric)
    cfg = trial_config(plan, {"v_th": 0.7, "aa": 0.9}, tmp_path / "trial_x", "RUNID", "trial_x")
    assert (cfg.model.v_th, cfg.model.aa) == (0.7, 0.9)
    assert cfg.run.output_dir == str(tmp_path / "trial_x" / "train") and cfg.run.resume == "auto"
    assert cfg.tracking.run_id == "RUNID" and cfg.tracking.tracking_uri == record.tracking_uri
    assert cfg.data.data_dir == "/data/mnist" and cfg.tracking.mlflow is True


def test_a_restored_ray_checkpoint_replaces_the_trials_last_checkpoint(tmp_path, sweep):
    from ray.tune import Checkpoint

    source = tmp_path / "ray_ckpt"
    source.mkdir()
    torch.save({"epoch": 3}, source / "last.pt")
    torch.save({"epoch": 2}, source / "best.pt")
    out = tmp_path / "train" / "checkpoints"
    out.mkdir(parents=True)
    torch.save({"epoch": 4}, out / "last.pt")  # written after the checkpoint Ray knows of
    torch.save({"epoch": 4}, out / "last.prev.pt")
    cfg = build_config("tiny", overrides={"output_dir": str(tmp_path / "train")})
    restore_checkpoint(Checkpoint.from_directory(str(source)), cfg)
    assert torch.load(out / "last.pt")["epoch"] == 3 and torch.load(out / "best.pt")["epoch"] == 2
    assert not (out / "last.prev.pt").exists()
    restore_checkpoint(None, cfg)  # a first attempt: nothing to restore
    assert torch.load(out / "last.pt")["epoch"] == 3


# ----------------------------------------------------------------------------------------------------------
# End to end: every point trained twice (search.repeats), the report on the points' means
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repeated_sweep(mlflow_server, tmp_path_factory, data_dir):
    """2 points (the learning one, the silent one) x 2 replicates, one epoch each, no ASHA."""
    work = tmp_path_factory.mktemp("repeats")
    path = write_sweep(work, "reps", [GOOD, BAD], 2, {"cpus": 2, "gpus": 0, "workers": 1}, scheduler="none")
    data = yaml.safe_load(path.read_text())
    data["search"]["repeats"] = 2
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    args = ["--sweep", str(path), "--tracking_uri", mlflow_server, "--epochs", "1", "--timesteps", "1"]
    rc, out = run_tune(args, work, tune_env(data_dir), work / "reps.log")
    client = MlflowClient(mlflow_server)
    exp_id, parent = the_parent(client, "reps")
    runs = children(client, parent.info.run_id, exp_id)
    return types.SimpleNamespace(client=client, work=work, rc=rc, out=out, parent=parent, runs=runs)


def best_of(client, run, metric="val_acc") -> float:
    return max(m.value for m in client.get_metric_history(run.info.run_id, metric))


@pytest.mark.slow
def test_every_point_trains_once_per_replicate_with_its_own_seed_and_a_readable_name(repeated_sweep):
    s = repeated_sweep
    assert s.rc == 0, s.out[-6000:]
    assert len(s.runs) == 4 and "2 points x 2 replicates" in s.out
    by_name = {r.info.run_name: r for r in s.runs}
    assert set(by_name) == {
        "reps-01 v_th=0.4 aa=0.5 #1",
        "reps-01 v_th=0.4 aa=0.5 #2",
        "reps-02 v_th=3 aa=0.1 #1",
        "reps-02 v_th=3 aa=0.1 #2",
    }
    for name, run in by_name.items():
        point, replicate = name.split()[0].split("-")[1], int(name[-1]) - 1
        assert (run.data.tags["point"], run.data.tags["replicate"]) == (point, str(replicate))
        assert run.data.params["seed"] == str(replicate)  # the tiny preset's seed 0, then 1
        assert "__point__" not in run.data.params and "__trial_index__" not in run.data.params


@pytest.mark.slow
def test_each_replicate_carries_its_points_mean_and_std_and_the_report_ranks_the_means(repeated_sweep, tmp_path):
    s = repeated_sweep
    means = {}
    for point in ("01", "02"):
        reps = [r for r in s.runs if r.data.tags["point"] == point]
        values = [best_of(s.client, r) for r in reps]
        mean = sum(values) / 2
        std = abs(values[0] - values[1]) / 2**0.5  # the sample standard deviation of two values
        means[point] = mean
        for r in reps:
            got = s.client.get_run(r.info.run_id).data.metrics
            assert (got["val_acc_mean"], got["val_acc_std"], got["replicates"]) == (
                pytest.approx(mean),
                pytest.approx(std),
                2,
            )
    parent = s.client.get_run(s.parent.info.run_id)
    assert parent.data.metrics["best_val_acc"] == pytest.approx(max(means.values()))
    local = Path(s.client.download_artifacts(s.parent.info.run_id, "report", str(tmp_path)))
    import csv

    with open(local / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["point"], t["n"]) for t in table] == [("01", "2"), ("02", "2")]
    assert [float(t["best_val_acc"]) for t in table] == [pytest.approx(means["01"]), pytest.approx(means["02"])]


# ----------------------------------------------------------------------------------------------------------
# The MLflow UI a user opens on that sweep, in a real headless Chromium
# ----------------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_the_runs_table_lists_the_trials_under_their_parent(repeated_sweep, mlflow_server, browser, tmp_path):
    s = repeated_sweep
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{mlflow_server}/#/experiments/{s.parent.info.experiment_id}/runs")
    parent = page.get_by_text("reps", exact=True).first
    parent.wait_for(timeout=60_000)
    row = page.locator('[role="row"]', has=parent)
    row.locator("button").first.click()  # the parent's expander
    names = sorted(r.info.run_name for r in s.runs)
    cells = [page.get_by_text(name, exact=True) for name in names]
    for cell in cells:
        cell.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "runs.png"))
    top = parent.bounding_box()
    for cell in cells:  # below the parent, indented under it
        box = cell.bounding_box()
        assert box["y"] > top["y"] and box["x"] > top["x"], (box, top)


@pytest.mark.slow
def test_the_compare_page_plots_v_th_and_aa_against_val_acc(repeated_sweep, mlflow_server, browser, tmp_path):
    s = repeated_sweep
    parent = s.client.get_run(s.parent.info.run_id)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(parent.data.tags["compare_trials_url"])
    page.get_by_text(f"Comparing {len(s.runs)} Runs").wait_for(timeout=60_000)
    plot = page.locator(".js-plotly-plot").first  # the parallel coordinates plot, drawn by plotly
    plot.wait_for(timeout=30_000)
    page.screenshot(path=str(tmp_path / "compare.png"))
    axes = set(plot.locator("text").all_text_contents())  # SVG text: its content, not inner text
    assert {"v_th", "aa", "val_acc"} <= axes, axes
    assert all(page.get_by_text(r.info.run_name, exact=True).count() for r in s.runs)
