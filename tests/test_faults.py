"""Faults a long run must survive: a rank killed mid-epoch, and a tracking server that goes away."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._dist import free_port
from tests._procs import cmdline, descendants, start_mlflow_server, stop_group, wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rank_killed_mid_epoch_restarts_and_resumes_into_the_same_mlflow_run(tmp_path, data_dir):
    # One restart is enough: the restarted ranks must not read the killed attempt's stale addresses from
    # torchrun's shared store (they did on a loaded machine before stbp.train.distributed keyed it by restart).
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    env = {**os.environ, "STBP_DATA_DIR": data_dir, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        str(REPO / "train_ddp.py"),
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--train_size",
        "4096",
        "--batch_size",
        "64",
        "--patience",
        "0",
        "--output_dir",
        str(out),
        "--tracking_uri",
        f"sqlite:///{db}",
        "--experiment",
        "faults",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        last = out / "checkpoints" / "last.pt"
        wait_for(last.exists, 300, "the first checkpoint", proc)
        time.sleep(1.0)  # into epoch 2
        workers = [p for p in descendants(proc.pid) if "train_ddp.py" in cmdline(p)]
        workers = [p for p in workers if "torch.distributed.run" not in cmdline(p)]
        assert len(workers) == 2, [cmdline(p) for p in workers]
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    assert "resumed from epoch 1" in output
    assert "failed to connect" not in output  # gloo's message when it dials a stale address
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["world_size"] == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1, "the restarted job must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc"))
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_tracking_server_lost_mid_run_loses_no_metrics(tmp_path, data_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stbp.config import build_config
    from stbp.train import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    server = {"proc": start_mlflow_server(tmp_path / "mlflow-server", port)}

    def chaos(epoch, metrics, checkpoint_dir):
        if epoch == 1:  # the server dies: epoch 2's records cannot be delivered
            stop_group(server["proc"])
        if epoch == 2:  # and comes back: what was kept is delivered before epoch 3's records
            server["proc"] = start_mlflow_server(tmp_path / "mlflow-server", port)

    cfg = build_config(
        preset="tiny",
        overrides=dict(
            data_dir=data_dir,
            output_dir=str(tmp_path / "out"),
            epochs=3,
            patience=0,
            train_size=256,
            tracking_uri=f"http://127.0.0.1:{port}",
            experiment="lost-server",
        ),
    )
    try:
        with pytest.warns(UserWarning, match="training goes on"):
            summary = train(cfg, callback=chaos)
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.get_run(summary["mlflow_run_id"])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))
    finally:
        stop_group(server["proc"])
    assert summary["epochs_run"] == 3
    assert steps == [1, 2, 3]
    assert run.info.status == "FINISHED"
    assert (tmp_path / "out" / "mlflow_pending.jsonl").exists()  # and the lost calls were recorded locally
