"""Tests for stbp.data: real MNIST loading, splits, sharding, on-device normalisation and augmentation."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from stbp.data import (
    MNIST_MEAN,
    MNIST_STD,
    DataNotFoundError,
    DeviceDataset,
    augment,
    epoch_indices,
    load_dataset,
    normalize,
    resolve_data_dir,
    split_train_val,
)
from stbp.data import files as data_files


@pytest.fixture(scope="module")
def dm(mnist):
    return DeviceDataset(mnist, "cpu", val_size=6000, seed=0)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------------------ loading


def test_constants():
    assert MNIST_MEAN == 0.1307 and MNIST_STD == 0.3081


def test_load_dataset_mnist_shapes(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 28, 28) and mnist.test_images.dtype == torch.uint8
    assert mnist.train_labels.shape == (60000,) and mnist.train_labels.dtype == torch.int64
    assert mnist.test_labels.shape == (10000,) and mnist.test_labels.dtype == torch.int64
    for t in mnist[:4]:  # the tensors (split_hash, the fifth field, is None for MNIST)
        assert t.device.type == "cpu"
    for labels in (mnist.train_labels, mnist.test_labels):
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert torch.bincount(labels, minlength=10).min() > 800
    assert int(mnist.train_images.max()) == 255


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STBP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == (tmp_path / "env").resolve()
    assert resolve_data_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    monkeypatch.delenv("STBP_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    p = resolve_data_dir(None)
    assert p.is_absolute() and p == (tmp_path / "data").resolve()


def test_missing_dir_no_download(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as ei:
        load_dataset("mnist", missing, download=False)
    msg = str(ei.value)
    assert str(missing / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "STBP_DATA_DIR" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_missing_dir_uses_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STBP_DATA_DIR", str(tmp_path / "envdir"))
    with pytest.raises(DataNotFoundError, match="envdir"):
        load_dataset("mnist", None, download=False)


def _offline(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "offline (simulated by test)")


def test_offline_download_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(socket, "getaddrinfo", _offline)
    t0 = time.monotonic()
    with pytest.raises(DataNotFoundError) as ei:
        load_dataset("mnist", tmp_path / "dl", download=True, timeout=5.0)
    assert time.monotonic() - t0 < 30
    msg = str(ei.value)
    assert str(tmp_path / "dl" / "MNIST" / "raw") in msg and "download failed" in msg


def test_offline_torchvision_error_is_wrapped(monkeypatch, tmp_path):
    # Skip the reachability probe so torchvision's own download runs and fails on every mirror.
    monkeypatch.setattr(data_files, "_network_reachable", lambda timeout, *_: (True, ""))
    monkeypatch.setattr(socket, "getaddrinfo", _offline)
    t0 = time.monotonic()
    with pytest.raises(DataNotFoundError, match="download failed"):
        load_dataset("mnist", tmp_path / "dl2", download=True, timeout=5.0)
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------------------------------------ indices


def test_split_train_val():
    train, val = split_train_val(60000, 6000, seed=0)
    assert train.dtype == torch.int64 and val.dtype == torch.int64
    assert train.numel() == 54000 and val.numel() == 6000
    both = torch.cat([train, val])
    assert torch.equal(torch.sort(both).values, torch.arange(60000))
    train2, val2 = split_train_val(60000, 6000, seed=0)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    _, val3 = split_train_val(60000, 6000, seed=1)
    assert not torch.equal(val, val3)
    with pytest.raises(ValueError):
        split_train_val(10, 11, seed=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_epoch_indices_sharding(world_size):
    n, gb = 1000, 96
    steps = n // gb
    shards = [epoch_indices(n, gb, world_size, r, seed=3, epoch=5) for r in range(world_size)]
    for s in shards:
        assert s.shape == (steps, gb // world_size) and s.dtype == torch.int64
    allidx = torch.cat([s.flatten() for s in shards])
    assert allidx.numel() == steps * gb
    assert torch.unique(allidx).numel() == steps * gb  # disjoint, distinct
    assert int(allidx.min()) >= 0 and int(allidx.max()) < n
    # Each global batch is the rank slices concatenated; same result when recomputed (every rank agrees).
    for r in range(world_size):
        assert torch.equal(shards[r], epoch_indices(n, gb, world_size, r, seed=3, epoch=5))
    # One-rank view of the same epoch: rank slices are contiguous parts of the global batch.
    full = epoch_indices(n, gb, 1, 0, seed=3, epoch=5)
    assert torch.equal(torch.cat(shards, dim=1), full)
    assert not torch.equal(full, epoch_indices(n, gb, 1, 0, seed=3, epoch=6))
    assert not torch.equal(full, epoch_indices(n, gb, 1, 0, seed=4, epoch=5))


def test_epoch_indices_errors():
    with pytest.raises(ValueError, match="divisible"):
        epoch_indices(100, 10, 3, 0, 0, 0)
    with pytest.raises(ValueError, match="n=10") as ei:
        epoch_indices(10, 16, 2, 0, 0, 0)
    assert "16" in str(ei.value) and "world_size=2" in str(ei.value)
    with pytest.raises(ValueError):
        epoch_indices(100, 10, 2, 2, 0, 0)


# ------------------------------------------------------------------------------------------------ transforms


def test_normalize_matches_torchvision(mnist):
    imgs = mnist.train_images[:200]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ref = torch.stack([tf(Image.fromarray(im.numpy(), mode="L")) for im in imgs])
    out = normalize(imgs)
    assert out.shape == (200, 1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_augment_no_padding_is_normalize(mnist):
    imgs = mnist.train_images[:64]
    assert torch.equal(augment(imgs, 0, False, _gen(0)), normalize(imgs))


def _windows(img: torch.Tensor, padding: int, hflip: bool) -> list[torch.Tensor]:
    """Brute force: normalised 28x28 windows of the zero-padded image at all offsets (and their mirrors)."""
    padded = np.pad(img.numpy(), padding)
    size = 2 * padding + 1
    wins = [padded[dy : dy + 28, dx : dx + 28] for dy in range(size) for dx in range(size)]
    if hflip:
        wins += [w[:, ::-1] for w in wins]
    return [normalize(torch.from_numpy(np.ascontiguousarray(w))[None])[0, 0] for w in wins]


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_is_a_window_of_padded_image(mnist, hflip):
    p = 4
    imgs = mnist.train_images[:32]
    out = augment(imgs, p, hflip, _gen(123))
    assert out.shape == (32, 1, 28, 28) and out.dtype == torch.float32
    first_hits = set()
    only_flipped = 0
    for i in range(imgs.shape[0]):
        cands = _windows(imgs[i], p, hflip)
        assert len(cands) == 81 * (2 if hflip else 1)
        hits = [k for k, w in enumerate(cands) if torch.equal(out[i, 0], w)]
        assert hits, f"sample {i} is not a shifted window of the zero-padded image"
        first_hits.add(hits[0] % 81)
        only_flipped += all(k >= 81 for k in hits)
    assert len(first_hits) > 5  # offsets actually vary per sample
    if hflip:
        assert 3 <= only_flipped <= 29  # p=0.5 flips on 32 samples


def test_augment_deterministic(mnist):
    imgs = mnist.train_images[:128]
    a = augment(imgs, 4, True, _gen(7))
    b = augment(imgs, 4, True, _gen(7))
    c = augment(imgs, 4, True, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- DeviceDataset


def test_device_dataset_sizes(mnist, dm):
    assert (dm.n_train, dm.n_val, dm.n_test) == (54000, 6000, 10000)
    assert dm.train_images.dtype == torch.uint8 and dm.train_labels.dtype == torch.int64
    small = DeviceDataset(mnist, "cpu", val_size=6000, train_size=1000, seed=0)
    assert small.n_train == 1000 and small.n_val == 6000
    assert torch.equal(small.train_images, dm.train_images[:1000])
    with pytest.raises(ValueError):
        DeviceDataset(mnist, "cpu", val_size=6000, train_size=54001)
    # val and train images come from disjoint index sets of the 60k training set
    train_idx, val_idx = split_train_val(60000, 6000, 0)
    assert torch.equal(dm.val_labels, mnist.train_labels[val_idx])
    assert torch.equal(dm.train_labels, mnist.train_labels[train_idx])


def test_train_batches(mnist):
    d = DeviceDataset(mnist, "cpu", val_size=6000, train_size=1000, seed=0)
    gb, ws = 128, 2
    assert d.num_train_steps(gb, ws) == 7
    for rank in range(ws):
        batches = list(d.train_batches(0, gb, ws, rank, padding=4, hflip=True))
        assert len(batches) == 7
        for x, y in batches:
            assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
            assert y.shape == (64,) and y.dtype == torch.int64
    # no augmentation: exactly the images/labels picked by epoch_indices
    idx = epoch_indices(1000, gb, ws, 1, seed=5, epoch=2)
    plain = list(d.train_batches(2, gb, ws, 1, padding=0, hflip=False, seed=5))
    for (x, y), pos in zip(plain, idx, strict=True):
        assert torch.equal(x, normalize(d.train_images[pos])) and torch.equal(y, d.train_labels[pos])
    # deterministic given (seed, epoch, rank); different for another epoch
    a = list(d.train_batches(3, gb, ws, 0, padding=4, seed=1))
    b = list(d.train_batches(3, gb, ws, 0, padding=4, seed=1))
    e = list(d.train_batches(4, gb, ws, 0, padding=4, seed=1))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0][1], e[0][1])
    with pytest.raises(ValueError):
        d.num_train_steps(2000, 1)


@pytest.mark.parametrize(("split", "ws", "bs"), [("val", 2, 512), ("test", 2, 1000), ("test", 3, 333)])
def test_eval_batches_cover_once(dm, split, ws, bs):
    images = dm.val_images if split == "val" else dm.test_images
    labels = dm.val_labels if split == "val" else dm.test_labels
    xs, ys = [], []
    for rank in range(ws):
        for x, y in dm.eval_batches(split, bs, ws, rank):
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and x.shape[0] <= bs
            xs.append(x)
            ys.append(y)
    assert torch.equal(torch.cat(xs), normalize(images))
    assert torch.equal(torch.cat(ys), labels)
    assert sum(y.numel() for y in ys) == images.shape[0]


def test_eval_batches_odd_split(mnist):
    d = DeviceDataset(mnist, "cpu", val_size=1001, train_size=100, seed=2)
    sizes = [sum(y.numel() for _, y in d.eval_batches("val", 100, 2, r)) for r in range(2)]
    assert sorted(sizes) == [500, 501]
    with pytest.raises(ValueError):
        list(d.eval_batches("train", 100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_per_batch_path_has_no_host_sync(mnist):
    d = DeviceDataset(mnist, "cuda", val_size=6000, train_size=4096, seed=0)
    it = d.train_batches(0, 512, 2, 1, padding=4, hflip=True)
    next(it)  # the once-per-epoch index upload happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        n = 1 + sum(1 for _ in it)
        ev = list(d.eval_batches("val", 1000, 2, 0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n == d.num_train_steps(512, 2) == 8
    assert all(x.is_cuda and y.is_cuda for x, y in ev)
    # same batches as on the CPU (indices are drawn on the CPU; augmentation differs by generator device)
    c = DeviceDataset(mnist, "cpu", val_size=6000, train_size=4096, seed=0)
    xg, yg = next(d.train_batches(0, 512, 2, 1, padding=0))
    xc, yc = next(c.train_batches(0, 512, 2, 1, padding=0))
    assert torch.equal(yg.cpu(), yc) and torch.equal(xg.cpu(), xc)


def test_the_tests_find_mnist_where_the_product_keeps_it(tmp_path):
    from tests.conftest import mnist_root

    shared, default = tmp_path / "shared" / "data", tmp_path / "repo" / "data"
    assert mnist_root({}, shared, default) == default  # a user's machine: ./data, where make train put it
    (shared / "MNIST" / "raw").mkdir(parents=True)
    assert mnist_root({}, shared, default) == shared  # CI: ../shared/data beside the clone
    assert mnist_root({"STBP_DATA_DIR": str(tmp_path / "x")}, shared, default) == tmp_path / "x"
