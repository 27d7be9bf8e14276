"""Event-camera data end to end, on small files written in each official format (stbp.data.events.writers, in the
layouts of tests/_event_files.py): a short training run per data set learns the class-coded events, its checkpoint
evaluates from the command line, the frame settings and the split hash reach MLflow, bad files and bad frame settings
are refused before training, the data on the device is cropped and flipped alike over time and polarity, and a two-trial
sweep runs on N-MNIST (fixed against learned thresholds, which its report compares)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stbp.config import ConfigError, build_config
from stbp.data import DataFormatError, DataNotFoundError, DeviceDataset, FrameSettings, event_input, load_dataset
from stbp.data.catalog import DATASETS
from stbp.data.events import event_splits, split_hash
from stbp.train import train
from stbp.train.checkpoint import load_checkpoint
from stbp.train.evaluate import evaluate_checkpoint
from tests import _event_files as files
from tests._procs import WITHOUT_STBP

ROOT = Path(__file__).resolve().parents[1]
SETS = ["nmnist", "dvs_gesture", "cifar10_dvs"]
# What each data set's run changes from the tiny preset. The 128x128 sets are downscaled to 32 to keep it quick;
# the synthetic classes are places on the sensor, which a mirror swaps, so CIFAR10-DVS trains without its flips.
LEARN = {
    "nmnist": {"val_size": 32},
    "dvs_gesture": {"val_size": 22, "frame_size": 32},
    "cifar10_dvs": {"val_size": 32, "frame_size": 32, "hflip": False},
}


@pytest.fixture(scope="module")
def event_root(tmp_path_factory) -> Path:
    """300 / 50 N-MNIST samples, 330 / 22 DVS Gesture samples, 500 / 1,000 CIFAR10-DVS samples (last100)."""
    root = tmp_path_factory.mktemp("event-data")
    files.make_nmnist(root, train=30, test=5)
    files.make_dvs_gesture(root, train_users=30, test_users=2)
    files.make_cifar10_dvs(root, per_class=150)
    return root


def cfg_overrides(root: Path, tmp_path: Path, name: str) -> dict:
    """What event_config changes from the tiny preset, as command-line values."""
    data = event_config(root, tmp_path, name)
    keys = ("dataset", "data_dir", "output_dir", "train_size", "test_size", "epochs", "batch_size", "lr", "patience")
    values = {k: getattr(getattr(data, section), k) for section in ("data", "run", "optim") for k in keys
              if hasattr(getattr(data, section), k)}  # fmt: skip
    return {**values, "amp": "off", **{k: str(v).lower() if isinstance(v, bool) else v for k, v in LEARN[name].items()}}


def event_config(root: Path, tmp_path: Path, name: str, **changes):
    overrides = dict(
        dataset=name,
        data_dir=str(root),
        output_dir=str(tmp_path / "out"),
        mlflow=False,
        train_size=0,
        test_size=0,
        epochs=3,
        batch_size=8,
        lr=0.01,
        patience=0,
        amp="off",  # as evaluate_checkpoint scores, so that the two accuracies are the same number
        **LEARN[name],
    )
    return build_config(preset="tiny", overrides={**overrides, **changes})


def copy_set(root: Path, tmp_path: Path, name: str) -> Path:
    """A private copy of one data set's files (without its frame cache), for tests that damage them."""
    folder = DATASETS[name].folder
    shutil.copytree(root / folder, tmp_path / "data" / folder, ignore=shutil.ignore_patterns("frames"))
    return tmp_path / "data"


# ---------------------------------------------------------------- training and evaluation


@pytest.mark.slow
@pytest.mark.parametrize("name", SETS)
def test_a_short_run_learns_each_event_data_set_and_its_checkpoint_evaluates(event_root, tmp_path, name):
    """From the command line (train_ddp.main) with MLflow and a registered model, then evaluated."""
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(ROOT))
    import train_ddp

    cfg = event_config(event_root, tmp_path, name)
    spec = DATASETS[name]
    assert (cfg.model.in_channels, cfg.model.num_classes, cfg.model.timesteps) == (2, spec.classes, 2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [f"--{k}={v}" for k, v in {**cfg_overrides(event_root, tmp_path, name), "tracking_uri": uri}.items()]
    assert train_ddp.main(["--preset", "tiny", *argv, "--register_model", f"stbp-{name}"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    version = MlflowClient(uri).get_model_version(f"stbp-{name}", "1")
    assert version.run_id == summary["mlflow_run_id"] and f"on {name}: v_th 0.4" in version.description
    chance = 100 / spec.classes
    assert summary["test_acc"] > 3 * chance, summary  # the classes are learnt, not guessed
    train_ids, test_ids = event_splits(name, event_root)
    assert summary["split_hash"] == split_hash(train_ids, test_ids)
    best = Path(summary["output_dir"]) / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    assert state["model"]["conv1.weight"].shape[1] == 2 and state["model"]["fc2.weight"].shape[0] == spec.classes
    assert list((event_root / spec.folder / "frames").glob(f"{name}-T2-*.pt"))  # train and test frames cached
    result = evaluate_checkpoint(best)  # the checkpoint names the data set, its data_dir and its frames
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert result["split_hash"] == summary["split_hash"]


@pytest.mark.slow
def test_the_evaluate_command_scores_an_event_checkpoint(event_root, tmp_path):
    summary = train(event_config(event_root, tmp_path, "nmnist", epochs=1))
    best = Path(summary["output_dir"]) / "checkpoints" / "best.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "stbp.train.evaluate", str(best), "--data_dir", str(event_root), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test accuracy {summary['test_acc']:.2f}%" in proc.stdout
    assert f"(split {summary['split_hash']})" in proc.stdout and "synaptic operations" in proc.stdout


@pytest.mark.slow
def test_a_registered_event_model_takes_frames_and_scores_like_best_pt(event_root, tmp_path):
    """The Model Registry's copy of an event model takes [N, T, 2, H, W] log-count frames, loads without this
    package, and gives best.pt's logits; its description says so."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    changes = dict(epochs=1, mlflow=True, tracking_uri=uri, register_model="stbp-gesture")
    summary = train(event_config(event_root, tmp_path, "dvs_gesture", **changes))
    assert summary["registered_model"] == "models:/stbp-gesture/1"
    data = load_dataset("dvs_gesture", event_root, frames=FrameSettings(timesteps=2, size=32))
    frames = event_input(data.test_images[:6])
    model, _ = load_checkpoint(Path(summary["output_dir"]) / "checkpoints" / "best.pt")
    with torch.no_grad():
        expected = model.eval()(frames)
    torch.save(frames, tmp_path / "frames.pt")
    code = (
        WITHOUT_STBP
        + f"""
import mlflow, mlflow.pytorch, sys, torch
mlflow.set_tracking_uri({uri!r})
model = mlflow.pytorch.load_model("models:/stbp-gesture/1")
with torch.no_grad():
    torch.save(model(torch.load("frames.pt")), "logits.pt")
"""
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
    description = MlflowClient(uri).get_model_version("stbp-gesture", "1").description
    assert "Input: [N, 2, 2, 32, 32] float32" in description and "log(1 + c)" in description


def test_the_frame_settings_and_the_split_hash_are_mlflow_params(event_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    changes = dict(epochs=1, mlflow=True, tracking_uri=uri, frame_split="time", frame_size=17, timesteps=3)
    summary = train(event_config(event_root, tmp_path / "events", "nmnist", **changes))
    params = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.params
    expected = split_hash(*event_splits("nmnist", event_root))
    assert params["split_hash"] == expected == summary["split_hash"]
    assert (params["timesteps"], params["frame_split"], params["frame_size"], params["dvs_test_split"]) == (
        "3",
        "time",
        "17",
        "last100",
    )
    from tests._datasets import make_idx_dataset  # a static data set: no frame settings, no split hash

    static = make_idx_dataset(tmp_path / "static", "fashion_mnist")
    overrides = dict(dataset="fashion_mnist", data_dir=str(static), val_size=64, train_size=0, test_size=0)
    overrides.update(output_dir=str(tmp_path / "static-out"), tracking_uri=uri)
    summary = train(build_config(preset="tiny", overrides=overrides))
    params = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.params
    assert "v_th" in params and not {"split_hash", "frame_split", "frame_size", "dvs_test_split"} & set(params)
    assert "split_hash" not in summary


@pytest.mark.slow
def test_a_resumed_event_run_continues_exactly(event_root, tmp_path):
    """Crops and flips of frames come from the same seeded generator as images' do: 1 + 1 epochs = 2 epochs."""
    augmented = dict(crop_padding=2, hflip=True, batch_size=16)
    full = train(event_config(event_root, tmp_path / "a", "nmnist", epochs=2, **augmented))
    train(event_config(event_root, tmp_path / "b", "nmnist", epochs=1, **augmented))
    resumed = train(event_config(event_root, tmp_path / "b", "nmnist", epochs=2, **augmented))
    assert (resumed["epochs_run"], resumed["split_hash"]) == (2, full["split_hash"])
    a, b = (torch.load(tmp_path / d / "out/checkpoints/last.pt", weights_only=True) for d in "ab")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------- what is refused before training


@pytest.mark.parametrize(
    ("name", "damage", "what"),
    [
        ("nmnist", lambda d: files.truncate(d / "NMNIST/Train/3/00024.bin"), "NMNIST/Train/3/00024.bin: .*truncated"),
        (
            "cifar10_dvs",
            lambda d: files.bad_header(d / "CIFAR10DVS/cat/cifar10_cat_7.aedat"),
            "cifar10_cat_7.aedat: bad",
        ),
    ],
)
def test_a_malformed_event_file_is_named_and_nothing_trains(event_root, tmp_path, capsys, name, damage, what):
    data = copy_set(event_root, tmp_path, name)
    damage(data)
    cfg = event_config(data, tmp_path, name)
    with pytest.raises(DataFormatError, match=what):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()
    sys.path.insert(0, str(ROOT))
    import train_ddp

    argv = ["--preset", "tiny", "--dataset", name, "--data_dir", str(data), "--val_size", "32", "--no-mlflow"]
    assert train_ddp.main([*argv, "--output_dir", str(tmp_path / "cli")]) == 2
    assert what.split(":")[0] in capsys.readouterr().err


def test_a_missing_event_data_set_says_what_to_fetch(tmp_path):
    frames = FrameSettings(timesteps=2)
    with pytest.raises(DataNotFoundError, match=r"DvsGesture.tar.gz.*research.ibm.com"):
        load_dataset("dvs_gesture", tmp_path, frames=frames)
    with pytest.raises(ValueError, match="needs its frame settings"):
        load_dataset("nmnist", tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "nmnist", "frame_size": 40}, "data.frame_size: 40 is larger than nmnist's 34x34 sensor"),
        ({"dataset": "dvs_gesture", "frame_size": 129}, "data.frame_size: 129 is larger than dvs_gesture's 128x128"),
        ({"dataset": "mnist", "frame_size": 16}, "data.frame_size: 16 is a setting of the event data sets"),
        ({"dataset": "cifar10", "frame_split": "time"}, "data.frame_split: 'time' is a setting of the event data"),
        ({"dataset": "nmnist", "dvs_test_split": "first100"}, "data.dvs_test_split: 'first100' is CIFAR10-DVS's"),
    ],
)
def test_frame_settings_that_do_not_fit_the_data_set_are_refused_before_training(tmp_path, changes, message):
    base = dict(data_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "out"), mlflow=False, val_size=100)
    cfg = build_config(preset="tiny", overrides={**base, **changes})
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_the_event_data_sets_decide_their_inputs_classes_flips_and_validation_split():
    for name, (classes, hflip, val, padding) in {
        "nmnist": (10, False, 6000, 0),
        "dvs_gesture": (11, False, 118, 4),
        "cifar10_dvs": (10, True, 900, 4),
    }.items():
        cfg = build_config(cli=["--dataset", name])
        got = (cfg.model.in_channels, cfg.model.num_classes, cfg.data.hflip, cfg.data.val_size, cfg.data.crop_padding)
        assert got == (2, classes, hflip, val, padding), name
    assert build_config(cli=["--dataset", "dvs_gesture", "--val_size", "50"]).data.val_size == 50


# ---------------------------------------------------------------- the data on the device


def frames_dataset(n: int = 24, t: int = 3, size: int = 12, **kwargs) -> DeviceDataset:
    g = torch.Generator().manual_seed(0)
    shape = (n, t, 2, size, size)
    counts = torch.randint(0, 4, shape, generator=g, dtype=torch.int16) * (torch.rand(shape, generator=g) < 0.3)
    tensors = (counts, torch.arange(n), counts[:8].clone(), torch.arange(8))
    from stbp.data import DatasetTensors

    return DeviceDataset(DatasetTensors(*tensors, split_hash="abc"), "cpu", spec=DATASETS["nmnist"], **kwargs)


def test_event_batches_are_log_counts_and_evaluation_is_unaugmented():
    data = frames_dataset(val_size=4)
    assert data.split_hash == "abc"
    (x, y), *_ = data.train_batches(0, 4, padding=0, hflip=False)
    assert x.shape == (4, 3, 2, 12, 12) and x.dtype == torch.float32
    pos = [int(torch.nonzero(data.train_labels == label)[0]) for label in y.tolist()]  # labels are unique here
    assert torch.equal(x, torch.log1p(data.train_images[pos].float()))
    x, y = next(data.eval_batches("test", 8))
    assert torch.equal(x, torch.log1p(data.test_images.float())) and torch.equal(y, data.test_labels)


def test_a_crop_and_a_flip_move_every_frame_and_polarity_of_a_sample_alike():
    frames = torch.randint(0, 5, (6, 3, 2, 10, 10), dtype=torch.int16)
    out = event_input(frames, 2, True, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the draws, in augment's order: rows, columns, flips
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand((6,), generator=g) < 0.5
    padded = torch.nn.functional.pad(frames, (2, 2, 2, 2))
    for i in range(6):
        window = padded[i, :, :, dy[i] : dy[i] + 10, dx[i] : dx[i] + 10]
        expected = window.flip(-1) if flip[i] else window
        assert torch.equal(out[i], torch.log1p(expected.float())), i
    assert flip.any() and not flip.all()


def test_event_batches_depend_only_on_seed_epoch_and_step():
    """What makes a resumed run see exactly the batches it would have seen."""
    a, b = frames_dataset(val_size=4, seed=3), frames_dataset(val_size=4, seed=3)
    torch.manual_seed(0)  # the global generator plays no part
    first = list(a.train_batches(1, 4, padding=2, hflip=True, seed=3))
    torch.manual_seed(1)
    again = list(b.train_batches(1, 4, padding=2, hflip=True, seed=3))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(first, again, strict=True))
    other = list(a.train_batches(2, 4, padding=2, hflip=True, seed=3))
    assert not all(torch.equal(x, x2) for (x, _), (x2, _) in zip(first, other, strict=True))


# ---------------------------------------------------------------- a sweep


@pytest.mark.slow
def test_a_two_trial_sweep_on_nmnist_records_the_split_in_every_trial(event_root, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests._dist import free_port
    from tests._procs import start_mlflow_server, stop_group

    sweep = yaml.safe_load((ROOT / "sweeps" / "dvs_gesture_vth_aa.yaml").read_text())
    sweep.update(name="nmnist_two", mlflow={"experiment": "stbp-nmnist-two", "registered_model": None})
    sweep["train"] = {"preset": "tiny", "dataset": "nmnist", "val_size": 32, "train_size": 0, "test_size": 0}
    sweep["train"].update(epochs=2, batch_size=16, lr=0.01)
    # the two trials: fixed and learned thresholds at the reference point (a grid of one setting)
    sweep["space"] = {"v_th": {"type": "choice", "values": [0.4]}, "aa": {"type": "choice", "values": [0.5]}}
    sweep["space"]["learn_v_th"] = {"type": "choice", "values": [False, True]}
    sweep["search"] = {"sampler": "grid", "num_samples": 2, "max_concurrent": 1}
    sweep.update(scheduler={"type": "none"}, resources={"cpus": 1, "gpus": 0, "workers": 1})
    path = tmp_path / "nmnist_two.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow", port)
    try:
        uri = f"http://127.0.0.1:{port}"
        args = ["--sweep", str(path), "--tracking_uri", uri, "--storage", str(tmp_path / "ray")]
        env = {**os.environ, "STBP_DATA_DIR": str(event_root), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tune.py"), *args, "--data_dir", str(event_root)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("stbp-nmnist-two")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.ray_trial_id != ''")
        assert len(runs) == 2
        expected = split_hash(*event_splits("nmnist", event_root))
        for run in runs:
            params = run.data.params
            assert params["dataset"] == "nmnist" and params["in_channels"] == "2"
            assert params["split_hash"] == expected and params["frame_split"] == "count"
            assert run.info.status == "FINISHED" and "val_acc" in run.data.metrics
            learned = params["learn_v_th"] == "True"
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert ("neurons.csv" in artifacts) == learned and ("neurons.png" in artifacts) == learned
        by_mode = {r.data.params["learn_v_th"]: r for r in runs}
        assert set(by_mode) == {"False", "True"}
        best = {
            k: max(m.value for m in client.get_metric_history(r.info.run_id, "val_acc")) for k, r in by_mode.items()
        }
        parent = runs[0].data.tags["mlflow.parentRunId"]
        table = Path(client.download_artifacts(parent, "report/learn_vs_fixed.csv", str(tmp_path)))
        (row,) = list(csv.DictReader(table.open()))
        assert (float(row["fixed_val_acc"]), float(row["learned_val_acc"])) == pytest.approx(
            (best["False"], best["True"])
        )
        assert float(row["val_acc_gain"]) == pytest.approx(best["True"] - best["False"])
        assert "Fixed against learned neurons" in proc.stdout
    finally:
        stop_group(server)
