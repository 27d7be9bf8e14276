"""The SLURM scripts against a real one-node SLURM (slurm/cluster.sh starts it when it is not up, and stops what
it started): a 2-task training job, the same job requeued mid-run (``scontrol requeue``, and the warning signal),
a 2-trial sweep job and a sweep job requeued mid-sweep. Two tasks on one node stand in for two nodes: two torchrun
agents meet at the rendezvous, two Ray nodes form the cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "slurm" / "cluster.sh"

pytestmark = pytest.mark.slow


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=900, **kwargs)


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = sh("sinfo", "-h", "-o", "%T", check=False)
    return out.returncode == 0 and out.stdout.strip().startswith(("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm():
    """A running one-node SLURM; started (and stopped after the module) by slurm/cluster.sh when it is not up."""
    started = False
    if not slurm_up():
        if os.geteuid() != 0:
            pytest.skip("no SLURM here, and starting one needs root")
        proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        started = True
    yield
    if started:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def submit(script: str, tmp_path: Path, args: list[str], sbatch: list[str] = (), env: dict | None = None) -> str:
    """``sbatch`` the script from the repository root with 2 tasks on the node; the job id."""
    log = tmp_path / "job.out"
    base = {**os.environ, "STBP_PYTHON": str(ROOT / ".venv" / "bin" / "python"), "RAY_AUTH_MODE": "disabled"}
    cmd = ["sbatch", "--parsable", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}"]
    proc = sh(*cmd, *sbatch, str(ROOT / "slurm" / script), *args, cwd=ROOT, env={**base, **(env or {})})
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    out = sh("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_state(job_id: str, states: set[str], timeout: float, log: Path) -> dict[str, str]:
    """Wait until the job is in one of ``states`` for 3 s (a job being requeued passes through FAILED); a requeued
    job held for its BeginTime is released after 5 s."""
    deadline = time.monotonic() + timeout
    since = held_since = None
    while time.monotonic() < deadline:
        info = job(job_id)
        if info.get("JobState") in states:
            since = since or time.monotonic()
            if time.monotonic() - since >= 3:
                return info
        else:
            since = None
        held = info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
        held_since = (held_since or time.monotonic()) if held else None
        if held and time.monotonic() - held_since >= 5:  # sooner, slurmd may still refuse the revoked credential
            sh("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} not {states} in {timeout} s: {job(job_id)}\n{log.read_text()[-4000:]}")


def wait_while_running(done, what: str, job_id: str, timeout: float, log: Path) -> None:
    """Wait until ``done()`` while the job is pending or running; cancel it and fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline or job(job_id).get("JobState") not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job_id])
            text = log.read_text()[-4000:] if log.exists() else ""
            raise AssertionError(f"{what} did not happen: {job(job_id)}\n{text}")
        time.sleep(0.5)


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def training(tmp_path: Path, data_dir: str, epochs: int) -> tuple[dict[str, str], list[str]]:
    env = {"STBP_DATA_DIR": data_dir, "STBP_OUTPUT_DIR": str(tmp_path / "out")}
    env["STBP_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--preset", "tiny", "--epochs", str(epochs), "--train_size", "1024", "--val_size", "128"]
    args += ["--test_size", "200", "--batch_size", "32", "--log_interval", "4", "--experiment", "slurm-train"]
    return env, args


def test_a_two_task_training_job_trains_one_run_with_its_checkpoints(slurm, tmp_path, data_dir):
    env, args = training(tmp_path, data_dir, epochs=2)
    job_id = submit("train.sbatch", tmp_path, args, ["--wait"], env)
    info = job(job_id)
    log = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "2 torchrun agent(s) x 1 rank(s)" in log and f"output: {tmp_path / 'out'}" in log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs_run"]) == (2, 2)
    assert (tmp_path / "out" / "checkpoints" / "best.pt").exists()
    _, runs = mlflow_runs(env["STBP_TRACKING_URI"], "slurm-train")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["slurm_job_id"] == job_id and runs[0].data.tags["slurm_requeues"] == "0"


@pytest.mark.parametrize("how", ["scontrol requeue", "warning signal"])
def test_a_requeued_training_job_resumes_into_the_same_run_and_ends_with_its_epochs(slurm, tmp_path, data_dir, how):
    env, args = training(tmp_path, data_dir, epochs=4)
    job_id = submit("train.sbatch", tmp_path, args, env=env)
    log = tmp_path / "job.out"
    last = tmp_path / "out" / "checkpoints" / "last.pt"
    wait_while_running(last.exists, f"{last} appearing (epoch 1 done)", job_id, 300, log)
    if how == "scontrol requeue":
        sh("scontrol", "requeue", job_id)
    else:  # what --signal=B:USR1@120 sends before the time limit
        time.sleep(3)
        sh("scancel", "--signal=USR1", "--batch", job_id)
    info = wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "requeued 1 times" in text and "[stbp] resumed from epoch" in text
    if how == "warning signal":  # saved where it stopped, within the epoch
        assert "requeueing job" in text and re.search(r"resumed from epoch \d+, step \d+ of epoch", text), text[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["epochs_run"] == 4
    client, runs = mlflow_runs(env["STBP_TRACKING_URI"], "slurm-train")
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"], [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["slurm_requeues"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]


def sweep_file(tmp_path: Path, trials: int, epochs: int) -> Path:
    data = {
        "name": "slurm_sweep",
        "train": {"preset": "tiny", "train_size": 512, "val_size": 128, "test_size": 200, "epochs": epochs},
        "space": {"v_th": {"type": "choice", "values": [0.3, 0.4, 0.5][:trials]}},
        "search": {"sampler": "grid", "num_samples": trials, "max_concurrent": 2},
        "scheduler": "none",
        "resources": {"cpus": 1, "gpus": 0, "workers": 1},
        "mlflow": {"experiment": "slurm-sweep", "registered_model": None},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sweep_env(tmp_path: Path, data_dir: str) -> dict[str, str]:
    from tests._dist import free_port

    return {
        "STBP_DATA_DIR": data_dir,
        "STBP_SWEEP_DIR": str(tmp_path / "store"),
        "STBP_HEAD_ADDRESS": "127.0.0.1",
        "STBP_RAY_PORT": str(free_port()),
        "STBP_MLFLOW_PORT": str(free_port()),
    }


def sweep_records(tmp_path: Path):
    """The parent and child runs in the job's MLflow store (read from its sqlite file)."""
    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "slurm-sweep")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_a_sweep_job_runs_its_trials_on_the_allocations_ray_cluster(slurm, tmp_path, data_dir):
    env = sweep_env(tmp_path, data_dir)
    job_id = submit("tune.sbatch", tmp_path, ["--sweep", str(sweep_file(tmp_path, 2, 1))], ["--wait"], env)
    info, log = job(job_id), (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-5000:]
    assert "with 2 node(s)" in log and "Best point" in log
    parents, children = sweep_records(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["v_th"] for c in children} == {"0.3", "0.4"}


def test_a_requeued_sweep_job_ends_with_exactly_its_trials(slurm, tmp_path, data_dir):
    env = sweep_env(tmp_path, data_dir)
    job_id = submit("tune.sbatch", tmp_path, ["--sweep", str(sweep_file(tmp_path, 3, 2))], env=env)
    log = tmp_path / "job.out"
    checkpoints = (tmp_path / "store" / "ray").glob
    under_way = lambda: any(checkpoints("slurm_sweep*/trial_*/checkpoint_*"))  # noqa: E731
    wait_while_running(under_way, "a trial's first checkpoint", job_id, 300, log)
    sh("scancel", "--signal=USR1", "--batch", job_id)
    info = wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 900, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-6000:]
    assert "requeued 1 times" in text and "Best point" in text
    parents, children = sweep_records(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.params["v_th"] for c in children) == ["0.3", "0.4", "0.5"]  # no trial twice
    assert all(c.info.status == "FINISHED" for c in children)


def test_a_failing_job_says_why_and_sbatch_wait_returns_its_status(slurm, tmp_path, data_dir):
    """A job that fails (a bad training option, named in the log; an MLflow server that does not answer or an
    output directory that cannot be made, refused before training starts) ends FAILED, and ``sbatch --wait``
    returns its exit status."""
    from tests._dist import free_port

    env, args = training(tmp_path, data_dir, epochs=1)
    base = {**os.environ, "STBP_PYTHON": str(ROOT / ".venv" / "bin" / "python"), **env}
    down = {**base, "STBP_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    for name, extra, environment, expected in (
        ("bad-option", ["--v_th", "-1"], base, "model.v_th"),
        ("no-server", [], down, "does not answer (STBP_TRACKING_URI)"),
        ("no-directory", [], {**base, "STBP_OUTPUT_DIR": "/proc/stbp-runs"}, "cannot create the output directory"),
    ):
        log = tmp_path / f"{name}.out"
        cmd = ["sbatch", "--wait", "--ntasks=1", "--cpus-per-task=1", f"--output={log}", "slurm/train.sbatch"]
        proc = sh(*cmd, *args, *extra, check=False, cwd=ROOT, env=environment)
        text = log.read_text()
        status = int(job(proc.stdout.split()[-1])["ExitCode"].split(":")[0])
        assert proc.returncode == status != 0 and expected in text, (name, proc.stderr, text[-2000:])
        if name != "bad-option":  # checked before anything started
            assert "torchrun agent" not in text
