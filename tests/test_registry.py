"""``--register_model NAME``: best.pt in the MLflow Model Registry (local sqlite store), loadable by name without
this package, scoring like best.pt. (The sweep's registration runs against a real server in test_sweep.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stbp.config import build_config
from stbp.data import load_dataset, normalize
from stbp.train import train
from stbp.train.evaluate import evaluate_checkpoint
from tests._procs import WITHOUT_STBP

ROOT = Path(__file__).resolve().parents[1]


def registry_accuracy(model_uri: str, tracking_uri: str, data_dir: str, n: int, workdir: Path | None = None) -> float:
    """Test accuracy of a registered model on the first ``n`` MNIST test images, loaded in a fresh process where
    importing stbp fails: the registered model needs only torch and MLflow."""
    code = (
        WITHOUT_STBP
        + f"""
import mlflow, mlflow.pytorch, sys, torch
mlflow.set_tracking_uri({tracking_uri!r})
model = mlflow.pytorch.load_model({model_uri!r})
data = torch.load(sys.argv[1])
with torch.no_grad():
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(data["x"].split(100), data["y"].split(100)))
print("ACC", 100.0 * correct / len(data["y"]))
"""
    )
    mnist = load_dataset("mnist", data_dir)
    batch = (workdir or Path(tracking_uri.removeprefix("sqlite:///")).parent) / "batch.pt"
    torch.save({"x": normalize(mnist.test_images[:n], (0.1307,), (0.3081,)), "y": mnist.test_labels[:n]}, batch)
    out = subprocess.run(
        [sys.executable, "-c", code, str(batch)], capture_output=True, text=True, timeout=300, cwd=batch.parent
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split("ACC")[-1])


@pytest.mark.slow
def test_register_model_puts_best_pt_in_the_registry_and_it_scores_like_best_pt(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config(
        preset="tiny",
        overrides=dict(
            data_dir=data_dir,
            output_dir=str(tmp_path / "out"),
            train_size=2048,
            val_size=128,
            batch_size=32,
            epochs=1,
            lr=0.005,
            tracking_uri=uri,
            test_size=400,
            register_model="stbp-unit",
        ),
    )
    summary = train(cfg)
    assert summary["registered_model"] == "models:/stbp-unit/1"
    best = evaluate_checkpoint(tmp_path / "out" / "checkpoints" / "best.pt", data_dir=data_dir, limit=400)
    assert best["test_acc"] > 30  # it learned something, so equal accuracies mean something
    assert registry_accuracy("models:/stbp-unit/latest", uri, data_dir, 400) == best["test_acc"]
    from mlflow.tracking import MlflowClient

    version = MlflowClient(uri).get_model_version("stbp-unit", "1")
    assert version.run_id == summary["mlflow_run_id"] and "normalised with mean [0.1307]" in version.description


@pytest.mark.slow
def test_mlflows_scoring_server_answers_with_the_logits_of_best_pt(tmp_path, data_dir):
    """`mlflow models serve -m models:/NAME/1 --env-manager local`: a REST query on test images gets the logits
    that best.pt's model (one with learned thresholds and time constants) gives for them."""
    import json
    import os
    import urllib.request

    from stbp import load_checkpoint
    from tests._dist import free_port
    from tests._procs import http_status, start, stop_group, wait_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config(
        preset="tiny",
        overrides=dict(
            data_dir=data_dir,
            output_dir=str(tmp_path / "out"),
            train_size=512,
            val_size=128,
            test_size=128,
            tracking_uri=uri,
            register_model="stbp-served",
            # learned neurons export and serve like weights
            learn_v_th=True,
            learn_tau=True,
            v_th_granularity="channel",
        ),
    )
    train(cfg)
    images = normalize(load_dataset("mnist", data_dir).test_images[:8], (0.1307,), (0.3081,))
    model, _ = load_checkpoint(tmp_path / "out" / "checkpoints" / "best.pt")
    with torch.no_grad():
        expected = model.eval()(images)
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the server execs uvicorn from the environment's bin
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = bin_dir / "mlflow"
    args = ["models", "serve", "-m", "models:/stbp-served/1", "--env-manager", "local"]
    proc = start([mlflow_cli, *args, "--host", "127.0.0.1", "--port", port], tmp_path / "serve.log", env=env)
    try:
        health = f"http://127.0.0.1:{port}/ping"
        wait_for(lambda: http_status(health) == 200, 180, "the scoring server", proc, logs=[tmp_path / "serve.log"])
        body = json.dumps({"inputs": images.tolist()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop_group(proc)
    torch.testing.assert_close(torch.tensor(answer["predictions"]), expected, rtol=1e-5, atol=1e-5)
