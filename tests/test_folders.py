"""Image folders and ImageNet, streamed from disk (stbp/data/folders.py, stbp/data/stream.py): the listing and its
refusals, decoding against torchvision's transforms, batches that depend only on (seed, epoch, rank, step), shards
that cover an epoch once, training under train() and under torchrun with 2 ranks, an exact mid-epoch resume, a
broken file named mid-run, and ImageNet's archives prepared by torchvision. The folders are real JPEG and PNG files
the tests write (stbp/data/images.py)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stbp.config import ConfigError, build_config
from stbp.data import DataFormatError, DataNotFoundError, FolderIndex, StreamedDataset, folder_index, list_folder
from stbp.data.catalog import DATASETS
from stbp.data.images import class_image, write_image_folder
from stbp.data.stream import decode, eval_box, train_box
from stbp.train import train
from stbp.train.checkpoint import read_checkpoint
from tests._dist import free_port

REPO = Path(__file__).resolve().parents[1]
FOLDER = DATASETS["imagefolder"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 30 training and 8 test images a class, a third of them odd but valid files."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "set", 3, 30, 8, odd=True)


def streamed(index: FolderIndex, **kwargs) -> StreamedDataset:
    options = dict(spec=FOLDER, image_size=24, val_size=10, workers=0) | kwargs
    return StreamedDataset(index, "cpu", **options)


def folder_config(root: Path, out: Path, *argv: str):
    base = ["--dataset", "imagefolder", "--data_dir", str(root), "--image_size", "24", "--val_size", "10"]
    base += ["--width", "0.0625", "--timesteps", "1", "--batch_size", "16", "--workers", "1", "--lr", "0.01"]
    base += ["--train_size", "0", "--test_size", "0", "--output_dir", str(out), "--patience", "0"]
    return build_config(preset="tiny", cli=[*base, "--no-mlflow", *argv])


# ---- the listing ---------------------------------------------------------------------------------------------


def test_a_folder_lists_its_images_by_class_and_ignores_what_is_not_an_image(folder):
    index = list_folder(folder)
    assert index.classes == ("class_0", "class_1", "class_2")
    assert (len(index.train_paths), len(index.test_paths)) == (90, 24)
    names = {Path(os.fsdecode(p)).name for p in index.train_paths}
    assert {"gray_2.jpg", "cmyk_5.jpg", "palette_11.png", "alpha_14.png", "upper_17.JPEG"} <= names
    assert not names & {".DS_Store", "Thumbs.db", "notes.txt"}
    assert np.bincount(index.train_labels).tolist() == [30, 30, 30]
    for path, label in zip(index.test_paths, index.test_labels):
        assert os.fsdecode(path).startswith(f"val/class_{label}/")


def test_the_identity_names_the_files_and_labels_and_survives_a_save(folder, tmp_path):
    index = list_folder(folder)
    index.save(tmp_path / "index.npz")
    loaded = FolderIndex.load(tmp_path / "index.npz")
    assert loaded.identity == index.identity and loaded.classes == index.classes and loaded.root == index.root
    relabelled = FolderIndex(index.root, index.classes, index.train_paths, index.train_labels[::-1].copy(),
                             index.test_paths, index.test_labels)  # fmt: skip
    fewer = FolderIndex(index.root, index.classes, index.train_paths[1:], index.train_labels[1:],
                        index.test_paths, index.test_labels)  # fmt: skip
    assert len({index.identity, relabelled.identity, fewer.identity, index.subset(2).identity}) == 4
    assert index.subset(2).classes == ("class_0", "class_1") and set(index.subset(2).test_labels) == {0, 1}
    (tmp_path / "not-an-index.npz").write_bytes(b"junk")
    with pytest.raises(DataFormatError, match="not-an-index.npz"):
        FolderIndex.load(tmp_path / "not-an-index.npz")


def test_bad_layouts_are_refused_naming_what_is_wrong(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"no train or val folder"):
        list_folder(tmp_path)
    root = write_image_folder(tmp_path / "a", 2, 2, 1)
    (root / "train" / "class_9").mkdir()
    (root / "train" / "class_9" / "notes.txt").write_text("no images here")
    with pytest.raises(DataFormatError, match=r"class_9 holds no images"):
        list_folder(root)
    root = write_image_folder(tmp_path / "b", 2, 2, 1)
    (root / "val" / "extra").mkdir()
    with pytest.raises(DataFormatError, match=r"classes that .*train lacks: extra"):
        list_folder(root)
    with pytest.raises(DataNotFoundError, match=r"the image folder .*nowhere"):
        folder_index("imagefolder", tmp_path / "nowhere")


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--dataset", "imagefolder"], "data.data_dir"),
        (["--image_size", "32"], "data.image_size (32)"),
        (["--dataset", "imagenet", "--image_size", "4"], "data.image_size"),
        (["--dataset", "cifar10", "--classes", "5"], "data.classes (5)"),
    ],
)
def test_folder_options_are_checked_with_the_config(argv, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        build_config(cli=argv)


def test_split_sizes_that_the_folder_cannot_hold_are_named(folder):
    index = list_folder(folder)
    with pytest.raises(DataFormatError, match=r"data.val_size 90 must be in \[1, 90\)"):
        streamed(index, val_size=90)
    with pytest.raises(DataFormatError, match=r"data.train_size 81 exceeds the 80 images"):
        streamed(index, train_size=81)
    data = streamed(index, test_size=6)
    assert sorted(set(index.test_labels[data.rows["test"]].tolist())) == [0, 1, 2]  # spread, not the first class


# ---- decoding ------------------------------------------------------------------------------------------------


def smooth_image(width: int, height: int) -> Image.Image:
    """Gradients and a slow wave: detail far below the crops' resolution, so resampling paths agree on it."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([255 * xx, 255 * yy, 128 + 100 * np.sin(2 * np.pi * (xx + yy))], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def test_the_evaluation_crop_matches_torchvisions_resize_and_centre_crop(tmp_path):
    from torchvision.transforms import v2

    for i, size in enumerate([(300, 200), (180, 260), (97, 150)]):
        path = tmp_path / f"{i}.png"  # lossless: the two pipelines see the same pixels
        smooth_image(*size).save(path)
        out = np.empty((64, 64, 3), np.uint8)
        decode(str(path), 64, None, False, out)
        pipeline = v2.Compose([v2.PILToTensor(), v2.Resize(round(64 / 0.875), antialias=True), v2.CenterCrop(64)])
        expected = pipeline(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
        assert np.abs(out.astype(float) - expected).mean() < 3.0  # one resample against two: a level or two


def test_random_resized_crops_are_distributed_as_torchvisions():
    from torchvision.transforms import v2

    rng, sizes = random.Random(0), [(w, h) for w in (60, 200, 500) for h in (80, 300)]
    torch.manual_seed(0)
    ours, theirs = [], []
    for width, height in sizes * 500:
        left, top, right, bottom = train_box(width, height, rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        ours.append(((right - left) * (bottom - top) / (width * height), (right - left) / (bottom - top)))
        top, left, h, w = v2.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append((w * h / (width * height), w / h))
    ours, theirs = np.array(ours), np.array(theirs)
    for q in (10, 50, 90):  # area fraction and aspect ratio, quantile by quantile
        np.testing.assert_allclose(np.percentile(ours, q, axis=0), np.percentile(theirs, q, axis=0), rtol=0.06)
    assert train_box(1000, 100, random.Random(0))[2:] != (1000, 100)  # too wide: the ratio is clamped
    assert eval_box(200, 100) == (56, 6, 144, 94)


def test_scaled_jpeg_decoding_gives_the_full_decode_s_crop(tmp_path):
    """Pillow's draft (libjpeg's 1/2..1/8 scaled decoding) against a full decode, resized the same way."""
    smooth_image(800, 600).save(tmp_path / "big.jpg", quality=95)
    out = np.empty((64, 64, 3), np.uint8)
    decode(str(tmp_path / "big.jpg"), 64, None, False, out)
    with Image.open(tmp_path / "big.jpg") as full:
        assert full.size == (800, 600)
        expected = np.asarray(full.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR, box=eval_box(800, 600)))
    assert np.abs(out.astype(float) - expected).mean() < 1.5


def test_every_valid_kind_decodes_to_rgb_and_broken_files_are_named(folder, tmp_path):
    out = np.empty((16, 16, 3), np.uint8)
    for path in sorted((folder / "train" / "class_1").iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            decode(str(path), 16, random.Random(0), True, out)
    good = (folder / "train" / "class_0" / "img_0000.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a png")
    for name in ("truncated.jpg", "empty.jpg", "text.png"):
        with pytest.raises(DataFormatError, match=name):
            decode(str(tmp_path / name), 16, None, False, out)


# ---- batches -------------------------------------------------------------------------------------------------


def test_batches_depend_only_on_seed_epoch_rank_and_step_whichever_process_decodes(folder):
    index = list_folder(folder)
    inline = list(streamed(index).train_batches(1, 16, hflip=True, seed=3))
    workers = streamed(index, workers=2)
    pooled = list(workers.train_batches(1, 16, hflip=True, seed=3))
    resumed = list(workers.train_batches(1, 16, hflip=True, seed=3, start_step=2))
    assert len(inline) == len(pooled) == 5 and len(resumed) == 3
    for (a, ya), (b, yb) in zip(inline, pooled):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    for (a, _), (b, _) in zip(inline[2:], resumed):
        assert torch.equal(a, b)
    x, y = inline[0]
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    other_epoch = next(iter(streamed(index).train_batches(2, 16, hflip=True, seed=3)))[0]
    assert not torch.equal(other_epoch, x)


def test_two_ranks_see_every_training_image_once_an_epoch_and_evaluate_each_image_once(folder):
    index = list_folder(folder)
    data = streamed(index, val_size=16)  # 74 training images: 2 global batches of 32, 10 left out
    seen = []
    for rank in (0, 1):
        for step in range(data.num_train_steps(32, 2)):
            seen += data.train_rows_of(0, step, 32, 2, rank, 0).tolist()
    assert len(seen) == len(set(seen)) == 64 and set(seen) <= set(data.rows["train"].tolist())
    labels = [y for rank in (0, 1) for _, y in data.eval_batches("test", 5, 2, rank)]
    assert torch.cat(labels).tolist() == index.test_labels.tolist()


# ---- training ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_short_run_learns_an_image_folder_and_records_what_it_read(folder, tmp_path):
    db = tmp_path / "mlflow.db"
    cfg = folder_config(folder, tmp_path / "out", "--epochs", "3", "--mlflow", "--tracking_uri", f"sqlite:///{db}")
    summary = train(cfg)
    assert summary["test_acc"] > 60 and summary["split_hash"] == list_folder(folder).identity  # chance: 33%
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{db}").get_run(summary["mlflow_run_id"])
    params = run.data.params
    assert (params["split_hash"], params["image_size"], params["arch"]) == (summary["split_hash"], "24", "resnet19")
    assert params["num_classes"] == "3" and params["dataset"] == "imagefolder"
    assert 0 <= run.data.metrics["data_wait"] < 1
    saved = read_checkpoint(tmp_path / "out" / "checkpoints" / "best.pt")
    assert saved["config"]["model"]["num_classes"] == 3
    from stbp.train.evaluate import evaluate_checkpoint  # python -m stbp.evaluate: the folder, from the checkpoint

    scored = evaluate_checkpoint(tmp_path / "out" / "checkpoints" / "best.pt", batch_size=10)
    assert scored["test_acc"] == pytest.approx(summary["test_acc"]) and scored["split_hash"] == summary["split_hash"]


@pytest.mark.slow
def test_a_broken_image_stops_the_run_with_its_name_and_keeps_the_last_checkpoint(tmp_path):
    root = write_image_folder(tmp_path / "set", 2, 20, 4)
    victim = root / "train" / "class_1" / "img_0003.jpg"

    def break_it(epoch, metrics, checkpoint_dir):
        victim.write_bytes(victim.read_bytes()[:200])  # truncated after epoch 1

    cfg = folder_config(root, tmp_path / "out", "--epochs", "2", "--val_size", "4", "--workers", "0")
    with pytest.raises(DataFormatError, match="img_0003.jpg"):
        train(cfg, callback=break_it)
    assert read_checkpoint(tmp_path / "out" / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.slow
def test_a_stop_mid_epoch_resumes_exactly_on_an_image_folder(folder, tmp_path, monkeypatch):
    from stbp.train import loop as training

    stop = tmp_path / "b" / "STOP"
    real = training.Trainer._stop_requested
    checks = []

    def appears_at_second_check(self):
        checks.append(1)
        if len(checks) == 2:
            stop.touch()
        return real(self)

    argv = ("--epochs", "2", "--log_interval", "2")
    full = train(folder_config(folder, tmp_path / "a", *argv))
    (tmp_path / "b").mkdir()
    cfg = folder_config(folder, tmp_path / "b", *argv, "--stop_file", str(stop))
    monkeypatch.setattr(training.Trainer, "_stop_requested", appears_at_second_check)
    with pytest.raises(training.Preempted):
        train(cfg)
    monkeypatch.setattr(training.Trainer, "_stop_requested", real)
    resumed = train(cfg)
    assert resumed["epochs_run"] == full["epochs_run"] == 2
    a, b = (read_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in "ab")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_torchrun_two_ranks_train_an_image_folder(folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d"]
    cmd += [f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1", str(REPO / "train_ddp.py"), "--preset", "tiny"]
    cmd += ["--dataset", "imagefolder", "--data_dir", str(folder), "--image_size", "24", "--val_size", "10"]
    cmd += ["--train_size", "0", "--test_size", "0", "--width", "0.0625", "--timesteps", "1", "--epochs", "1"]
    cmd += ["--batch_size", "32", "--workers", "1", "--output_dir", str(tmp_path / "out"), "--no-mlflow"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    assert "imagefolder: 80 train / 10 val images, 2 rank(s)" in proc.stdout


@pytest.mark.slow
def test_a_sweep_over_an_image_folder_lists_it_once_for_all_its_trials(folder, tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    sweep = {
        "name": "folder",
        "train": {
            "preset": "tiny",
            "dataset": "imagefolder",
            "data_dir": str(folder),
            "image_size": 16,
            "val_size": 10,
            "train_size": 48,
            "test_size": 12,
            "timesteps": 1,
            "batch_size": 16,
            "epochs": 1,
            "workers": 0,
        },  # fmt: skip
        "space": {"v_th": {"type": "choice", "values": [0.3, 0.5]}},
        "search": {"sampler": "grid", "num_samples": 2, "max_concurrent": 1},
        "scheduler": "none",
        "resources": {"cpus": 1, "gpus": 0, "workers": 1},
        "mlflow": {"experiment": "folder-sweep", "registered_model": None},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, str(REPO / "tune.py"), "--sweep", str(tmp_path / "sweep.yaml")]
    cmd += ["--tracking_uri", f"sqlite:///{db}", "--storage", str(tmp_path / "ray")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    index = tmp_path / "ray" / "folder" / "file-index.npz"
    assert FolderIndex.load(index).identity == list_folder(folder).identity
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("folder-sweep")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.ray_trial_id != ''")
    assert len(runs) == 2 and {r.data.params["v_th"] for r in runs} == {"0.3", "0.5"}
    for run in runs:  # each trial read the sweep's listing, not the folder
        assert (
            run.data.tags["file_index"] == str(index) and run.data.params["split_hash"] == list_folder(folder).identity
        )
        assert run.info.status == "FINISHED"


# ---- ImageNet ------------------------------------------------------------------------------------------------


def test_imagenet_missing_names_both_layouts(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"ILSVRC2012_img_train.tar.*never downloaded"):
        folder_index("imagenet", tmp_path)


def test_imagenet_prepared_folders_are_read_where_users_keep_them(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", 2, 3, 2)
    for split in ("train", "val"):  # WordNet ids for class names, as ImageNet has them
        for k, wnid in enumerate(("n01440764", "n01443537")):
            (root / split / f"class_{k}").rename(root / split / wnid)
    index = folder_index("imagenet", tmp_path)
    assert index.classes == ("n01440764", "n01443537") and len(index.train_paths) == 6


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(label: int) -> bytes:
    buf = io.BytesIO()
    class_image(label, 2, (50, 40), np.random.default_rng(label)).save(buf, format="JPEG")
    return buf.getvalue()


def test_imagenet_archives_are_prepared_once_by_torchvision(tmp_path, monkeypatch):
    """The three official archives (tiny, in their real formats: a devkit with meta.mat and the validation ground
    truth, a train tar of per-class tars, a flat val tar) become the prepared folders; torchvision checks the
    archives' MD5s, so the test gives it these files' sums."""
    import hashlib

    import scipy.io
    from torchvision.datasets import imagenet

    root = tmp_path / "imagenet"
    root.mkdir()
    wnids = ("n01440764", "n01443537")
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height")
    fields += ("num_train_images",)
    rows = [(k + 1, w, f"class {k}", "", 0, np.zeros(0), 0, 3) for k, w in enumerate(wnids)]  # the real struct's fields
    synsets = np.array(rows, dtype=[(f, "O") for f in fields])
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    devkit = {"ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue()}
    devkit["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"] = b"2\n1\n2\n"
    _tar(root / "ILSVRC2012_devkit_t12.tar.gz", devkit)
    for k, w in enumerate(wnids):
        _tar(tmp_path / f"{w}.tar", {f"{w}_{i}.JPEG": _jpeg(k) for i in range(3)})
    _tar(root / "ILSVRC2012_img_train.tar", {f"{w}.tar": (tmp_path / f"{w}.tar").read_bytes() for w in wnids})
    _tar(root / "ILSVRC2012_img_val.tar", {f"ILSVRC2012_val_0000000{i}.JPEG": _jpeg(i % 2) for i in (1, 2, 3)})
    md5 = lambda name: hashlib.md5((root / name).read_bytes()).hexdigest()  # noqa: E731
    sums = {k: (name, md5(name)) for k, (name, _) in imagenet.ARCHIVE_META.items()}
    monkeypatch.setattr(imagenet, "ARCHIVE_META", sums)
    index = folder_index("imagenet", tmp_path)
    assert index.classes == wnids and len(index.train_paths) == 6
    assert sorted(os.fsdecode(p) for p in index.test_paths) == [
        "val/n01440764/ILSVRC2012_val_00000002.JPEG",
        "val/n01443537/ILSVRC2012_val_00000001.JPEG",
        "val/n01443537/ILSVRC2012_val_00000003.JPEG",
    ]
