"""Training end to end: torchrun DDP, exact resume, DDP equivalence, checkpoints, MLflow records, errors."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stbp import LIF, load_checkpoint, resnet19
from stbp.config import ConfigError, build_config
from stbp.data import DataNotFoundError
from stbp.train import TrainingDiverged, train
from stbp.train.checkpoint import CheckpointError, read_checkpoint
from stbp.train.recipe import lr_at
from tests._dist import free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path, data_dir, **overrides):
    base = dict(
        data_dir=data_dir, output_dir=str(tmp_path / "out"), mlflow=False, train_size=256, val_size=128, batch_size=32
    )
    return build_config(preset="tiny", overrides={**base, **overrides})


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, data_dir):
    full = train(tiny(tmp_path / "a", data_dir, epochs=2, patience=0))
    first = train(tiny(tmp_path / "b", data_dir, epochs=1, patience=0))
    resumed = train(tiny(tmp_path / "b", data_dir, epochs=2, patience=0))  # resume=auto by default
    assert (first["epochs_run"], resumed["epochs_run"], full["epochs_run"]) == (1, 2, 2)
    a = read_checkpoint(tmp_path / "a" / "out" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "out" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    timings = ("epoch_time_s", "images_per_s", "val_time_s", "data_wait")  # clocks, not results
    assert b["metrics"][0] == pytest.approx(a["metrics"][0] | {k: b["metrics"][0][k] for k in timings})


@pytest.mark.slow
def test_a_stop_file_saves_mid_epoch_and_the_resume_continues_exactly(tmp_path, data_dir, monkeypatch):
    """The file appears at the second log interval of epoch 1 (step 6 of 8): last.pt holds that step, the command
    exits 3, and the same command ends where an uninterrupted run ends, weights and epoch metrics alike."""
    from stbp.train import loop as training

    stop = tmp_path / "b" / "STOP"
    checks = []
    real = training.Trainer._stop_requested

    def appears_at_second_check(self):
        checks.append(1)
        if len(checks) == 2:
            stop.parent.mkdir(parents=True, exist_ok=True)
            stop.touch()
        return real(self)

    full = train(tiny(tmp_path / "a", data_dir, epochs=2, patience=0, log_interval=3))
    cfg = tiny(tmp_path / "b", data_dir, epochs=2, patience=0, log_interval=3, stop_file=str(stop))
    monkeypatch.setattr(training.Trainer, "_stop_requested", appears_at_second_check)
    with pytest.raises(training.Preempted) as info:
        train(cfg)
    assert (info.value.epoch, info.value.step) == (0, 6) and not stop.exists()
    saved = read_checkpoint(tmp_path / "b" / "out" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"], saved["partial"][2]) == (0, 6, 6 * 32)
    monkeypatch.setattr(training.Trainer, "_stop_requested", real)
    resumed = train(cfg)
    assert resumed["epochs_run"] == full["epochs_run"] == 2
    a = read_checkpoint(tmp_path / "a" / "out" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "out" / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)
    for epoch_a, epoch_b in zip(a["metrics"], b["metrics"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert epoch_b[key] == pytest.approx(epoch_a[key], rel=1e-6), key


@pytest.mark.slow
def test_an_epoch_saved_but_not_yet_logged_when_the_run_died_is_logged_on_resume(tmp_path, data_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    from stbp.tracking.publishing import Publisher

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, data_dir, epochs=2, patience=0, mlflow=True, tracking_uri=db, experiment="catch-up")
    real = Publisher.epoch

    def dies_before_logging(self, *args):  # between writing last.pt and logging the epoch to MLflow
        raise SystemExit("killed")

    monkeypatch.setattr(Publisher, "epoch", dies_before_logging)
    with pytest.raises(SystemExit):
        train(cfg)
    assert read_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(Publisher, "epoch", real)
    summary = train(cfg)
    history = MlflowClient(db).get_metric_history(summary["mlflow_run_id"], "val_acc")
    assert [m.step for m in history] == [1, 2]


def test_checkpoints_load_safely_and_rebuild_the_model(tmp_path, data_dir):
    summary = train(tiny(tmp_path, data_dir, epochs=1, v_th=0.3, aa=0.6))
    ckpt = Path(summary["output_dir"]) / "checkpoints"
    for name in ("last.pt", "best.pt"):
        state = torch.load(ckpt / name, weights_only=True)
        assert {"model", "optimizer", "epoch", "early_stopping", "rng", "config", "metrics"} <= set(state)
    model, cfg = load_checkpoint(ckpt / "best.pt")
    assert (cfg.model.v_th, cfg.model.aa) == (0.3, 0.6)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert lifs and all(lif.spec.v_th == 0.3 and lif.threshold() == 0.3 for lif in lifs)
    written = json.loads((Path(summary["output_dir"]) / "summary.json").read_text())
    assert {"test_acc", "best_val_acc", "epochs_run", "images_per_s", "world_size", "mlflow_run_id"} <= set(written)
    # The model rebuilt from best.pt gives the summary's test accuracy (independent evaluation path).
    from stbp.train.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(ckpt / "best.pt", data_dir=data_dir, limit=cfg.data.test_size)
    assert result["test_acc"] == pytest.approx(written["test_acc"], abs=1e-9)
    assert set(result["firing_rates"]) == set(written["firing_rates"])


@pytest.mark.slow
def test_compile_trains_like_eager_and_warns_on_cpu(tmp_path, data_dir, monkeypatch):
    """``compile=true`` end to end: dynamo traces the whole step (our autograd Functions included) and training
    matches eager. The backend is ``aot_eager`` (the same graphs, run by aten) because inductor's C++ codegen
    costs minutes of CI; on a CPU the run warns that compile is for CUDA (inductor measured 5-6x slower here)."""
    eager = train(tiny(tmp_path / "eager", data_dir, epochs=1))
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    with pytest.warns(UserWarning, match="compile=true on a CPU"):
        compiled = train(tiny(tmp_path / "compiled", data_dir, epochs=1, compile=True))
    ours, theirs = (
        read_checkpoint(Path(s["output_dir"]) / "checkpoints" / "last.pt")["metrics"][0] for s in (compiled, eager)
    )
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert (compiled["test_acc"], compiled["test_loss"]) == pytest.approx((eager["test_acc"], eager["test_loss"]))
    model, _ = load_checkpoint(Path(compiled["output_dir"]) / "checkpoints" / "best.pt")  # no _orig_mod. keys
    reference, _ = load_checkpoint(Path(eager["output_dir"]) / "checkpoints" / "best.pt")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, data_dir):
    train(tiny(tmp_path, data_dir, epochs=2, patience=0))
    ckpt = tmp_path / "out" / "checkpoints"
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="falling back"):
        summary = train(tiny(tmp_path, data_dir, epochs=3, patience=0))
    assert summary["epochs_run"] == 3  # epoch 1 from last.prev.pt, then epochs 2 and 3 again


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"v_th": 0.3}, "model.v_th 0.4 -> 0.3"),
        ({"width": 0.125}, "model.width 0.0625 -> 0.125"),
        ({"lr": 0.01, "seed": 3}, "optim.lr 0.001 -> 0.01, run.seed 0 -> 3"),
        ({"label_smoothing": 0.1}, "optim.label_smoothing"),
        ({"train_size": 128}, "data.train_size 256 -> 128"),
    ],
)
def test_a_resume_that_would_train_another_experiment_is_refused(tmp_path, data_dir, change, named):
    train(tiny(tmp_path, data_dir, epochs=1))
    before = (tmp_path / "out" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError) as info:
        train(tiny(tmp_path, data_dir, epochs=2, **change))
    message = str(info.value)
    assert named in message and "--output_dir" in message and "--resume never" in message
    assert (tmp_path / "out" / "checkpoints" / "last.pt").read_bytes() == before  # nothing trained or written


def test_a_resume_may_change_what_continuing_a_run_means(tmp_path, data_dir):
    train(tiny(tmp_path, data_dir, epochs=1))
    more = {"epochs": 2, "patience": 2, "log_interval": 2, "eval_batch_size": 64, "test_size": 256, "fast_lif": False}
    assert train(tiny(tmp_path, data_dir, **more))["epochs_run"] == 2
    fresh = train(tiny(tmp_path, data_dir, epochs=1, v_th=0.3, resume="never"))  # the way out: start over
    assert fresh["epochs_run"] == 1


def test_divergence_stops_with_epoch_step_and_lr(tmp_path, data_dir):
    cfg = tiny(tmp_path, data_dir, optimizer="sgd", lr=1e37, momentum=0.0, log_interval=1, schedule="none")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+ \(lr 1e\+37\)") as info:
        train(cfg)
    exc = info.value
    assert (exc.epoch, exc.lr) == (1, 1e37) and f"step {exc.step} " in str(exc)
    again = pickle.loads(pickle.dumps(exc))  # as Ray carries it from a DDP rank to its trial
    assert (type(again), str(again), again.epoch, again.step) == (TrainingDiverged, str(exc), 1, exc.step)


def test_missing_data_offline_is_refused_before_training(tmp_path):
    cfg = tiny(tmp_path, str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataNotFoundError, match="nowhere"):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_more_ranks_than_batches_is_refused(tmp_path, data_dir):
    with pytest.raises(ValueError, match="batch"):
        train(tiny(tmp_path, data_dir, train_size=16, batch_size=32))


def test_lr_schedules():
    step = build_config(preset="seed")
    assert lr_at(step, 0) == 1e-3 and lr_at(step, 9.99) == 1e-3 and lr_at(step, 10.0) == pytest.approx(1e-4)
    cos = build_config(overrides=dict(schedule="cosine", epochs=4, lr=1.0))
    assert lr_at(cos, 0) == 1.0 and lr_at(cos, 2) == pytest.approx(0.5) and lr_at(cos, 4) == pytest.approx(0)
    warm = build_config(overrides=dict(schedule="none", warmup_epochs=2, lr=1.0))
    assert lr_at(warm, 1) == pytest.approx(0.5, abs=1e-3) and lr_at(warm, 3) == 1.0


def _ddp_rank(rank, world, xs, ys, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from stbp import convert_sync_tdbn

    torch.manual_seed(0)
    model = convert_sync_tdbn(resnet19(width=0.0625))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for x, y in zip(xs, ys):
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), out)


@pytest.mark.slow
def test_ddp_two_ranks_of_batch_b_equal_one_rank_of_batch_2b(tmp_path, mnist):
    from stbp.data import normalize

    xs = [normalize(mnist.train_images[i * 16 : (i + 1) * 16]) for i in range(3)]
    ys = [mnist.train_labels[i * 16 : (i + 1) * 16] for i in range(3)]
    run_ranks(_ddp_rank, 2, xs, ys, str(tmp_path / "ddp.pt"))
    torch.manual_seed(0)
    model = resnet19(width=0.0625)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        moved += key.endswith("weight")
    assert moved > 10


@pytest.mark.slow
def test_torchrun_two_ranks_trains_one_epoch_and_records_mlflow_run(tmp_path, data_dir):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "STBP_DATA_DIR": data_dir, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--nnodes=1",
        str(REPO / "train_ddp.py"),
        "--preset",
        "tiny",
        "--output_dir",
        str(tmp_path / "out"),
        "--tracking_uri",
        f"sqlite:///{db}",
        "--experiment",
        "ddp-test",
        "--epochs",
        "1",
        "--train_size",
        "512",
        "--batch_size",
        "64",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 1  # only rank 0 prints
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    assert (tmp_path / "out" / "checkpoints" / "best.pt").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ddp-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # one run, from rank 0 only
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["v_th"] == "0.4" and run.data.params["batch_size"] == "64"
    assert run.data.tags["world_size"] == "2"
    assert {"train_loss", "val_acc", "lr", "images_per_s", "test_acc", "sops_per_image"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("firing_rate/")]  # per layer: the table below
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "summary.json", "firing_rates.png", "firing_rates.csv"} <= artifacts
    table = Path(client.download_artifacts(run.info.run_id, "firing_rates.csv", str(tmp_path))).read_text()
    assert table.splitlines()[0].startswith("epoch,lif1,") and len(table.splitlines()) == 2  # one epoch
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/last.pt", "checkpoints/best.pt"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vth", "0.3"], "did you mean 'v_th'"),
        (["--v_th", "-1"], "model.v_th: input should be greater than 0, got -1.0"),
        (["--aa", "0"], "model.aa: input should be greater than 0"),
        (["--tau", "1.5"], "tau"),
        (["--timesteps", "0"], "timesteps"),
        (["--batch_size", "abc"], "run.batch_size: input should be a valid integer"),
        (["--preset", "nope"], "nope"),
    ],
)
def test_bad_command_lines_are_refused_with_a_clear_message(argv, message, capsys):
    sys.path.insert(0, str(REPO))
    import train_ddp

    assert train_ddp.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unreachable_tracking_server_is_refused_before_training(tmp_path, data_dir):
    from stbp.tracking import TrackingError

    cfg = tiny(tmp_path, data_dir, mlflow=True, tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match="unreachable"):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_config_yaml_file_drives_training(tmp_path, data_dir):
    (tmp_path / "c.yaml").write_text("preset: tiny\nmodel:\n  v_th: 0.35\nrun:\n  epochs: 1\n")
    cfg = build_config(
        yaml_path=tmp_path / "c.yaml", overrides=dict(mlflow=False, data_dir=data_dir, output_dir=str(tmp_path / "o"))
    )
    assert cfg.model.v_th == 0.35 and cfg.model.width == 0.0625
    with pytest.raises(ConfigError):
        build_config(yaml_path=tmp_path / "c.yaml", overrides={"bogus": 1})


def test_no_preset_means_the_hardware_preset_and_the_first_line_says_so(capsys, monkeypatch, tmp_path):
    sys.path.insert(0, str(REPO))
    import train_ddp

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert train_ddp.parse_args([]).preset == "cpu"
    assert capsys.readouterr().out.startswith("[stbp] preset 'cpu' (no GPU here); --preset NAME chooses another")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert train_ddp.parse_args(["--epochs", "2"]).preset == "seed"
    assert "preset 'seed' (the reference's setting, on 8 GPU(s))" in capsys.readouterr().out
    assert train_ddp.parse_args(["--preset", "tiny"]).preset == "tiny"
    (tmp_path / "c.yaml").write_text("preset: gpu\nepochs: 2\n")
    assert train_ddp.parse_args(["--config", str(tmp_path / "c.yaml")]).preset == "gpu"
    assert capsys.readouterr().out == ""  # a preset that was chosen is not announced
    monkeypatch.setenv("RANK", "1")
    assert train_ddp.parse_args([]).preset == "seed" and capsys.readouterr().out == ""  # only rank 0 talks


def test_a_log_shows_progress_with_an_eta_and_the_last_line_where_the_outputs_are(
    tmp_path, data_dir, capsys, monkeypatch
):
    import re

    from stbp.train.progress import Progress

    monkeypatch.setattr(Progress, "EVERY_S", 0.0)  # every sync point; a log gets one every 30 s
    train(tiny(tmp_path, data_dir, epochs=2, log_interval=2, patience=0))  # 8 steps an epoch
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if "steps)" in line]
    pattern = (
        r"\[stbp\] (\d+)% of epoch ([12]) of 2 \((\d)/8 steps\)  loss [\d.]+  \d+ img/s  waiting for data \d+%  "
        r"ETA epoch \d+:\d\d, run (\d+):(\d\d)"
    )
    parsed = [re.fullmatch(pattern, line) for line in progress]
    assert len(parsed) == 8 and all(parsed), progress
    assert [(m[2], m[3]) for m in parsed] == [(e, s) for e in "12" for s in "2468"]
    assert parsed[-1][1] == "100" and parsed[-1].group(4, 5) == ("0", "00")  # nothing left to train
    assert sum("epoch 1/2" in line for line in lines) == 1  # the epoch's own line stays the only one of its kind
    assert lines[-1].startswith("[stbp] test accuracy ") and "checkpoints/best.pt" in lines[-1]
    assert lines[-1].endswith("summary.json")
