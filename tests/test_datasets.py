"""Fashion-MNIST, CIFAR-10 and CIFAR-100 on small files written in each official layout (tests/_datasets.py): the
readers against a second reading, a tiny training run per data set whose checkpoint evaluates with no data set flag,
a 2-trial sweep on CIFAR-10, the config's dataset field, and the files that must be refused."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stbp.config import ConfigError, build_config
from stbp.data import DataFormatError, DataNotFoundError, augment, load_dataset
from stbp.data.catalog import DATASETS
from stbp.sweep import load_sweep
from stbp.train import train
from stbp.train.evaluate import evaluate_checkpoint
from tests._datasets import make_cifar, make_idx_dataset, py2_pickle, write_idx

ROOT = Path(__file__).resolve().parents[1]
SETS = ["fashion_mnist", "cifar10", "cifar100"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    make_idx_dataset(root, "fashion_mnist")
    make_cifar(root, "cifar10")
    make_cifar(root, "cifar100")
    return root


def copy_of(data_root: Path, tmp_path: Path, name: str) -> Path:
    folder = DATASETS[name].folder
    shutil.copytree(data_root / folder, tmp_path / folder)
    return tmp_path


# ---------------------------------------------------------------- reading


def second_reading(root: Path, name: str):
    """The same files read another way: numpy over the idx bytes, plain pickle (the tests' own files) for CIFAR."""
    spec = DATASETS[name]
    if spec.format == "idx":
        raw = root / spec.folder / "raw"
        read = lambda f, skip: np.frombuffer((raw / f).read_bytes()[skip:], np.uint8)  # noqa: E731
        return [
            read("train-images-idx3-ubyte", 16).reshape(-1, 28, 28),
            read("train-labels-idx1-ubyte", 8),
            read("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28),
            read("t10k-labels-idx1-ubyte", 8),
        ]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test_files = ["test_batch"] if name == "cifar10" else ["test"]
    out = []
    for files in (train_files, test_files):
        batches = [pickle.loads((root / spec.folder / f).read_bytes(), encoding="bytes") for f in files]
        out += [
            np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32),
            np.concatenate([b[key] for b in batches]),
        ]
    return out


@pytest.mark.parametrize("name", SETS)
def test_each_layout_reads_to_the_images_and_labels_in_its_files(data_root, name):
    tensors = load_dataset(name, data_root, download=False)
    spec = DATASETS[name]
    shape = (spec.size, spec.size) if spec.channels == 1 else (3, spec.size, spec.size)
    for got, expected in zip(tensors[:4], second_reading(data_root, name), strict=True):
        assert np.array_equal(got.numpy(), expected)
    assert tensors.train_images.dtype == torch.uint8 and tensors.train_labels.dtype == torch.int64
    assert tuple(tensors.train_images.shape[1:]) == shape
    assert int(tensors.train_labels.max()) < spec.classes


def test_cifar_crops_and_flips_every_channel_alike_on_the_device():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    raw = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    together = augment(images, 4, True, torch.Generator().manual_seed(5), **raw)
    assert together.shape == (16, 3, 32, 32)
    for c in range(3):  # the same offsets and flips, drawn once per image
        alone = augment(images[:, c], 4, True, torch.Generator().manual_seed(5), mean=(0.0,), std=(1.0,))
        assert torch.equal(together[:, c], alone[:, 0])
    assert not torch.equal(together, images.float() / 255)  # it did move something


# ---------------------------------------------------------------- training and evaluation


@pytest.mark.parametrize("name", SETS)
def test_a_tiny_run_trains_on_each_data_set_and_its_checkpoint_evaluates_without_a_flag(data_root, tmp_path, name):
    cfg = build_config(
        preset="tiny",
        overrides=dict(
            dataset=name,
            data_dir=str(data_root),
            val_size=64,
            train_size=0,
            output_dir=str(tmp_path / "out"),
            mlflow=False,
        ),
    )
    spec = DATASETS[name]
    assert (cfg.model.in_channels, cfg.model.num_classes) == (spec.channels, spec.classes)
    summary = train(cfg)
    best = tmp_path / "out" / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    assert state["config"]["data"]["dataset"] == name
    assert state["model"]["fc2.weight"].shape[0] == spec.classes
    assert state["model"]["conv1.weight"].shape[1] == spec.channels
    result = evaluate_checkpoint(best, data_dir=data_root)  # no data set given: the checkpoint says which
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert 0 <= summary["test_acc"] <= 100 and summary["epochs_run"] == 1


@pytest.mark.slow
def test_evaluate_command_needs_no_dataset_flag(data_root, tmp_path):
    cfg = build_config(
        preset="tiny",
        overrides=dict(
            dataset="cifar100",
            data_dir=str(data_root),
            val_size=64,
            train_size=0,
            output_dir=str(tmp_path / "out"),
            mlflow=False,
        ),
    )
    summary = train(cfg)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stbp.train.evaluate",
            str(tmp_path / "out/checkpoints/best.pt"),
            "--data_dir",
            str(data_root),
            "--chart",
            str(tmp_path / "rates.png"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test accuracy {summary['test_acc']:.2f}%" in proc.stdout
    assert (tmp_path / "rates.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- the config


def test_the_data_set_decides_channels_classes_and_flips_unless_given():
    assert build_config(cli=["--dataset", "cifar100"]).model.num_classes == 100
    cfg = build_config(cli=["--dataset", "cifar10"])
    assert (cfg.model.in_channels, cfg.model.num_classes, cfg.data.hflip) == (3, 10, True)
    assert build_config(cli=["--dataset", "cifar10", "--hflip", "false"]).data.hflip is False
    assert build_config(overrides={"dataset": "fashion_mnist"}).model.in_channels == 1
    assert build_config(preset="cifar10", cli=["--dataset", "cifar100"]).model.num_classes == 100
    assert build_config().data.dataset == "mnist"  # the default, unchanged
    with pytest.raises(
        ConfigError,
        match="data.dataset: input should be 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'nmnist', "
        "'dvs_gesture', 'cifar10_dvs', 'imagenet' or 'imagefolder', got 'svhn'",
    ):
        build_config(cli=["--dataset", "svhn"])
    with pytest.raises(ConfigError, match=r"val_size must be in \[1, 50000\)"):
        build_config(cli=["--dataset", "cifar10", "--val_size", "50000"])


def test_a_model_that_does_not_fit_the_data_set_is_refused_before_training(data_root, tmp_path):
    cfg = build_config(
        preset="tiny",
        overrides=dict(
            dataset="cifar10", in_channels=1, data_dir=str(data_root), output_dir=str(tmp_path / "out"), mlflow=False
        ),
    )
    with pytest.raises(ConfigError, match="in_channels 1 and num_classes 10 do not fit"):
        train(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_loads(path):
    sweep = load_sweep(path)
    assert {"v_th", "aa"} <= set(sweep.space)


# ---------------------------------------------------------------- files that are refused


def test_a_data_set_missing_offline_is_named_with_where_it_was_looked_for(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message and "download=False" in message


def test_a_truncated_cifar_batch_is_named(data_root, tmp_path):
    root = copy_of(data_root, tmp_path, "cifar10")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[: len(batch.read_bytes()) // 2])
    with pytest.raises(DataFormatError, match=f"{batch} is not a readable cifar10 batch"):
        load_dataset("cifar10", root, download=False)


def test_a_truncated_idx_file_is_named(data_root, tmp_path):
    root = copy_of(data_root, tmp_path, "fashion_mnist")
    images = root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match=f"{images} holds .* bytes of data where its header promises"):
        load_dataset("fashion_mnist", root, download=False)


def test_labels_out_of_range_are_refused(data_root, tmp_path):
    root = copy_of(data_root, tmp_path, "cifar10")
    batch = root / "cifar-10-batches-py" / "test_batch"
    data = pickle.loads(batch.read_bytes(), encoding="bytes")
    data[b"labels"][7] = 10
    batch.write_bytes(py2_pickle(data))
    with pytest.raises(DataFormatError, match="label 10 is outside 0..9 of cifar10"):
        load_dataset("cifar10", root, download=False)
    root = copy_of(data_root, tmp_path / "f", "fashion_mnist")
    write_idx(root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte", np.full(256, 12, np.uint8))
    with pytest.raises(DataFormatError, match="label 12 is outside 0..9 of fashion_mnist"):
        load_dataset("fashion_mnist", root, download=False)


@pytest.mark.parametrize(
    "payload",
    [
        b"cos\nsystem\n(S'touch MARKER'\ntR.",  # a shell command
        b'cbuiltins\nexec\n(S\'open("MARKER", "w")\'\ntR.',  # Python code
        b"cmarshal\nloads\n(C\x00tR.",  # a code object
    ],
    ids=["os.system", "builtins.exec", "marshal.loads"],
)
def test_a_cifar_pickle_that_names_code_is_refused_before_it_runs(data_root, tmp_path, payload):
    root = copy_of(data_root, tmp_path, "cifar10")
    marker = tmp_path / "ran"
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(payload.replace(b"MARKER", str(marker).encode()))
    with pytest.raises(DataFormatError, match="which a data file has no reason to hold"):
        load_dataset("cifar10", root, download=False)
    assert not marker.exists()


def test_another_data_sets_files_in_the_place_of_cifar10s_are_refused(data_root, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        shutil.copy(data_root / "cifar-100-python" / "train", folder / name)
    shutil.copy(data_root / "cifar-100-python" / "test", folder / "test_batch")
    with pytest.raises(DataFormatError, match="so it is not a cifar10 file: it looks like cifar100's"):
        load_dataset("cifar10", tmp_path, download=False)
    fashion = tmp_path / "FashionMNIST" / "raw"  # CIFAR's pickles where idx files belong
    fashion.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        shutil.copy(folder / "test_batch", fashion / name)
    with pytest.raises(DataFormatError, match="is not an idx file of 3-d unsigned bytes"):
        load_dataset("fashion_mnist", tmp_path, download=False)


def test_train_ddp_reports_a_malformed_file_and_exits_2(data_root, tmp_path, capsys):
    root = copy_of(data_root, tmp_path, "cifar10")
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    sys.path.insert(0, str(ROOT))
    import train_ddp

    argv = [
        "--preset",
        "tiny",
        "--dataset",
        "cifar10",
        "--data_dir",
        str(root),
        "--val_size",
        "64",
        "--train_size",
        "0",
        "--no-mlflow",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert train_ddp.main(argv) == 2
    assert "data_batch_1 is not a readable cifar10 batch" in capsys.readouterr().err


# ---------------------------------------------------------------- a sweep on CIFAR-10


@pytest.mark.slow
def test_a_two_trial_sweep_on_cifar10_files(data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    args = [
        sys.executable,
        str(ROOT / "tune.py"),
        "--sweep",
        str(ROOT / "sweeps" / "cifar10_cpu.yaml"),
        "--num_samples",
        "2",
        "--tracking_uri",
        f"sqlite:///{db}",
        "--storage",
        str(tmp_path / "ray"),
        "--data_dir",
        str(data_root),
        "--train_size",
        "256",
        "--val_size",
        "64",
        "--test_size",
        "128",
        "--epochs",
        "2",
        "--width",
        "0.0625",
        "--batch_size",
        "32",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("stbp-cifar10-cpu")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.ray_trial_id != ''")
    assert len(runs) == 2
    for run in runs:
        assert run.data.params["dataset"] == "cifar10" and run.data.params["in_channels"] == "3"
        assert run.info.status in ("FINISHED", "KILLED") and "val_acc" in run.data.metrics
    assert "Best point" in proc.stdout
