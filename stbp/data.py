"""MNIST held on the training device, with on-device shuffling, sharding, normalisation and augmentation.

In the style of airbench / hlb-CIFAR10: the whole dataset is one uint8 tensor on the device and every
per-batch operation (indexing, random crop, flip, normalisation) is a handful of vectorised tensor ops.
There is no DataLoader, no worker process, no per-sample Python and no host synchronisation (``.item()``,
``.tolist()``, ``.cpu()``) in the per-batch path. Index permutations are drawn once per epoch on the CPU
(so they are identical on every rank and on every kind of device) and copied to the device in one go.
"""

from __future__ import annotations

import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "DataNotFoundError",
    "MNISTTensors",
    "resolve_data_dir",
    "load_mnist",
    "split_train_val",
    "epoch_indices",
    "normalize",
    "augment",
    "DeviceMNIST",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

DATA_DIR_ENV = "STBP_DATA_DIR"
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_TRAIN_SIZE = 60000
MNIST_TEST_SIZE = 10000
IMAGE_SIZE = 28

_MASK64 = (1 << 64) - 1


class DataNotFoundError(FileNotFoundError):
    """The MNIST raw files are not where we looked and could not be downloaded."""


class MNISTTensors(NamedTuple):
    """The full MNIST dataset as CPU tensors."""

    train_images: Tensor  # uint8 [60000, 28, 28]
    train_labels: Tensor  # int64 [60000]
    test_images: Tensor  # uint8 [10000, 28, 28]
    test_labels: Tensor  # int64 [10000]


# ----------------------------------------------------------------------------------------------------------
# Locating / loading
# ----------------------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """``data_dir`` if given, else ``$STBP_DATA_DIR`` if set (and non-empty), else ``./data``; absolute."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or "data"
    return pathlib.Path(data_dir).expanduser().resolve()


def _raw_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "MNIST" / "raw"


def _has_raw_files(root: pathlib.Path) -> bool:
    raw = _raw_dir(root)
    return all((raw / name).is_file() for name in RAW_FILES)


def _candidate_roots(root: pathlib.Path) -> list[pathlib.Path]:
    """Roots to look in (layout ``<root>/MNIST/raw``); a path to ``MNIST`` or ``MNIST/raw`` works too."""
    cands = [root]
    if root.name == "MNIST":
        cands.append(root.parent)
    if root.name == "raw" and root.parent.name == "MNIST":
        cands.append(root.parent.parent)
    return cands


def _probe_targets() -> list[tuple[str, int]]:
    """(host, port) pairs a download would connect to first: the proxy if one is configured, else mirrors."""
    from torchvision.datasets import MNIST

    targets: list[tuple[str, int]] = []
    proxies = urllib.request.getproxies()
    for mirror in MNIST.mirrors:
        url = urllib.parse.urlsplit(mirror)
        proxy = proxies.get(url.scheme)
        if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
            purl = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            target = (purl.hostname or "", purl.port or (443 if purl.scheme == "https" else 80))
        else:
            target = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        if target[0] and target not in targets:
            targets.append(target)
    return targets


def _network_reachable(timeout: float) -> tuple[bool, str]:
    """Can we open a TCP connection to a download mirror (or the proxy) within ``timeout`` seconds?

    Runs in a daemon thread joined with a deadline, so a hanging DNS lookup cannot stall the caller.
    """
    result: dict[str, object] = {"ok": False, "why": f"no answer within {timeout:g} s"}

    def probe() -> None:
        errors = []
        for host, port in _probe_targets():
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    result["ok"] = True
                    return
            except OSError as e:
                errors.append(f"{host}:{port}: {e}")
        result["why"] = "; ".join(errors) or "no mirror configured"

    t = threading.Thread(target=probe, name="stbp-mnist-probe", daemon=True)
    t.start()
    t.join(timeout)
    return bool(result["ok"]), str(result["why"])


def _download(root: pathlib.Path, timeout: float) -> None:
    """torchvision's MNIST download into ``root``; any failure (offline, read-only dir...) -> RuntimeError."""
    from torchvision.datasets import MNIST

    ok, why = _network_reachable(timeout)
    if not ok:
        raise RuntimeError(f"network unreachable ({why})")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(max(timeout, 30.0))  # per socket operation: a slow download still progresses
    try:
        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    except Exception as e:  # URLError, RuntimeError, OSError (read-only dir), timeouts, ...
        raise RuntimeError(f"{type(e).__name__}: {e}") from e
    finally:
        socket.setdefaulttimeout(old)


def _not_found_message(looked: list[pathlib.Path], reason: str) -> str:
    where = "\n".join(f"  - {_raw_dir(r)}" for r in looked)
    return (
        f"MNIST raw files not found ({reason}).\n"
        f"Looked in:\n{where}\n"
        f"Expected files (torchvision layout <data_dir>/MNIST/raw/): {', '.join(RAW_FILES)}\n"
        f"Fix: pass data_dir=<dir containing MNIST/raw> or set {DATA_DIR_ENV}=<that dir>, "
        f"or allow network access with download=True so torchvision can fetch the files into "
        f"{_raw_dir(looked[0])}."
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = True, *, timeout: float = 10.0
) -> MNISTTensors:
    """Load the full MNIST train and test sets as CPU tensors.

    Looks for ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with ``root`` from
    :func:`resolve_data_dir`. If missing and ``download`` is true, tries torchvision's download (failing
    within about ``timeout`` seconds when the network is unreachable). Raises :class:`DataNotFoundError`
    naming every place looked in otherwise.
    """
    from torchvision.datasets import MNIST

    root = resolve_data_dir(data_dir)
    looked = _candidate_roots(root)
    found = next((r for r in looked if _has_raw_files(r)), None)
    if found is None:
        if not download:
            raise DataNotFoundError(_not_found_message(looked, "download=False"))
        try:
            _download(root, timeout)
        except RuntimeError as e:
            raise DataNotFoundError(_not_found_message(looked, f"download failed: {e}")) from e
        if not _has_raw_files(root):
            raise DataNotFoundError(_not_found_message(looked, "download finished but files are missing"))
        found = root

    try:
        train = MNIST(str(found), train=True, download=False)
        test = MNIST(str(found), train=False, download=False)
    except RuntimeError as e:  # files present but torchvision refuses them
        raise DataNotFoundError(_not_found_message(looked, f"torchvision could not read them: {e}")) from e

    out = MNISTTensors(
        train_images=train.data.to(torch.uint8).contiguous(),
        train_labels=train.targets.to(torch.int64).contiguous(),
        test_images=test.data.to(torch.uint8).contiguous(),
        test_labels=test.targets.to(torch.int64).contiguous(),
    )
    if out.train_images.shape != (MNIST_TRAIN_SIZE, IMAGE_SIZE, IMAGE_SIZE) or out.test_images.shape != (
        MNIST_TEST_SIZE,
        IMAGE_SIZE,
        IMAGE_SIZE,
    ):
        raise DataNotFoundError(
            f"MNIST files under {_raw_dir(found)} have unexpected shapes "
            f"{tuple(out.train_images.shape)} / {tuple(out.test_images.shape)}; "
            "replace them with the original files."
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Index bookkeeping (CPU, once per run / epoch)
# ----------------------------------------------------------------------------------------------------------


def _mix_seed(*parts: int) -> int:
    """Deterministic, well-spread 63-bit seed from integers (splitmix64 chained over the parts)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def split_train_val(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic split of ``range(n)``: a CPU permutation from ``seed``; first ``val_size`` -> val.

    Returns ``(train_idx, val_idx)`` int64 CPU tensors (in permutation order).
    """
    if not 0 <= val_size <= n:
        raise ValueError(f"val_size must be in [0, n={n}], got {val_size}")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    perm = torch.randperm(n, generator=g, dtype=torch.int64)
    return perm[val_size:].clone(), perm[:val_size].clone()


def _num_steps(n: int, global_batch: int, world_size: int) -> int:
    if global_batch <= 0 or world_size <= 0:
        raise ValueError(f"global_batch and world_size must be positive, got {global_batch} and {world_size}")
    if global_batch % world_size != 0:
        raise ValueError(
            f"global_batch={global_batch} is not divisible by world_size={world_size}; "
            f"choose a global batch that is a multiple of the number of ranks"
        )
    steps = n // global_batch
    if steps == 0:
        raise ValueError(
            f"more ranks/batch than data: n={n} items cannot fill one global batch of {global_batch} "
            f"(world_size={world_size}, {global_batch // world_size} per rank)"
        )
    return steps


def epoch_indices(n: int, global_batch: int, world_size: int, rank: int, seed: int, epoch: int) -> Tensor:
    """``[steps, global_batch // world_size]`` int64 CPU positions into ``range(n)`` for this rank and epoch.

    One permutation per ``(seed, epoch)`` (identical on every rank), remainder dropped, each global batch cut
    into ``world_size`` contiguous slices; rank ``r`` takes slice ``r``.
    """
    steps = _num_steps(n, global_batch, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    g = torch.Generator(device="cpu")
    g.manual_seed(_mix_seed(seed, epoch, 0xE90C))
    perm = torch.randperm(n, generator=g, dtype=torch.int64)
    per_rank = global_batch // world_size
    return perm[: steps * global_batch].view(steps, world_size, per_rank)[:, rank].contiguous()


# ----------------------------------------------------------------------------------------------------------
# Per-batch, on-device transforms
# ----------------------------------------------------------------------------------------------------------


def normalize(images_uint8: Tensor) -> Tensor:
    """``[B, 28, 28]`` uint8 -> ``[B, 1, 28, 28]`` float32 ``((x / 255) - MNIST_MEAN) / MNIST_STD``."""
    x = images_uint8.to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return x.unsqueeze(1)


def augment(images_uint8: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with ``padding`` black (0) pixels and optional horizontal flip (p=0.5), then normalise.

    Per-sample offsets in ``[0, 2 * padding]`` (and flip coins) are drawn from ``generator`` on its device;
    the crop is one gather from the padded batch, the flip reverses the column index of that same gather.
    Draw order: offsets (rows, then columns), then flips. ``padding=0, hflip=False`` is exactly
    :func:`normalize` and draws nothing.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not hflip:
        return normalize(images_uint8)
    b, h, w = images_uint8.shape
    dev = images_uint8.device
    gdev = generator.device

    if padding > 0:
        padded = images_uint8.new_zeros((b, h + 2 * padding, w + 2 * padding))
        padded[:, padding : padding + h, padding : padding + w] = images_uint8
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(dev)
    else:
        padded = images_uint8
        dy = torch.zeros(b, dtype=torch.int64, device=dev)
        dx = dy

    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # [B, H]
    cols = dx[:, None] + ar_w  # [B, W]
    if hflip:
        flip = torch.rand((b,), generator=generator, device=gdev).to(dev) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W]
    return normalize(out)


# ----------------------------------------------------------------------------------------------------------
# The dataset on the device
# ----------------------------------------------------------------------------------------------------------


class DeviceMNIST:
    """Train / val / test MNIST images (uint8) and labels (int64) resident on ``device``.

    ``val`` is carved out of the 60,000 training images with :func:`split_train_val` (``seed``);
    ``train_size > 0`` keeps only the first ``train_size`` of the remaining train split.
    """

    def __init__(
        self,
        tensors: MNISTTensors,
        device: torch.device | str,
        *,
        val_size: int = 6000,
        train_size: int = 0,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        n_all = tensors.train_images.shape[0]
        train_idx, val_idx = split_train_val(n_all, val_size, seed)
        if train_size < 0:
            raise ValueError(f"train_size must be >= 0 (0 = all), got {train_size}")
        if train_size > 0:
            if train_size > train_idx.numel():
                raise ValueError(
                    f"train_size={train_size} exceeds the {train_idx.numel()} training images left after "
                    f"holding out val_size={val_size} of {n_all}"
                )
            train_idx = train_idx[:train_size]
        dev = self.device
        self.train_images = tensors.train_images[train_idx].contiguous().to(dev)
        self.train_labels = tensors.train_labels[train_idx].to(torch.int64).contiguous().to(dev)
        self.val_images = tensors.train_images[val_idx].contiguous().to(dev)
        self.val_labels = tensors.train_labels[val_idx].to(torch.int64).contiguous().to(dev)
        self.test_images = tensors.test_images.contiguous().to(dev)
        self.test_labels = tensors.test_labels.to(torch.int64).contiguous().to(dev)

    @property
    def n_train(self) -> int:
        return self.train_images.shape[0]

    @property
    def n_val(self) -> int:
        return self.val_images.shape[0]

    @property
    def n_test(self) -> int:
        return self.test_images.shape[0]

    def num_train_steps(self, global_batch: int, world_size: int = 1) -> int:
        """Optimizer steps per epoch (same on every rank); raises ValueError like :func:`epoch_indices`."""
        return _num_steps(self.n_train, global_batch, world_size)

    def train_batches(
        self,
        epoch: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        padding: int = 4,
        hflip: bool = False,
        seed: int = 0,
        *,
        start_step: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x [b,1,28,28] float32, y [b] int64)`` on the device, ``b = global_batch // world_size``.

        Order from :func:`epoch_indices` ``(seed, epoch)``; augmentation from a device generator reseeded
        for every step from ``(seed, epoch, rank, step)``, so the batches depend only on those numbers and a
        run resumed at ``start_step`` (or at an epoch boundary) sees exactly the batches it would have seen.
        """
        idx = epoch_indices(self.n_train, global_batch, world_size, rank, seed, epoch)
        steps = idx.shape[0]
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
        idx = idx[start_step:].to(self.device, non_blocking=True)
        augmenting = padding > 0 or hflip
        gen = torch.Generator(device=self.device) if augmenting else None
        for i, step in enumerate(range(start_step, steps)):
            pos = idx[i]
            imgs = self.train_images[pos]
            labels = self.train_labels[pos]
            if gen is not None:
                gen.manual_seed(_mix_seed(seed, epoch, rank, step, 0xA06))
                x = augment(imgs, padding, hflip, gen)
            else:
                x = normalize(imgs)
            yield x, labels

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "val":
            return self.val_images, self.val_labels
        if split == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")

    def eval_range(self, split: str, world_size: int = 1, rank: int = 0) -> tuple[int, int]:
        """``[start, stop)`` of the contiguous part of ``split`` that ``rank`` evaluates.

        Parts differ in size by at most one (the first ``n % world_size`` ranks get one extra) and together
        cover the split exactly once; a rank may get an empty part when ``world_size > n``.
        """
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size > 0 and 0 <= rank < world_size, got {world_size}, {rank}")
        n = self._split(split)[0].shape[0]
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def eval_batches(
        self, split: str, batch_size: int, world_size: int = 1, rank: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield un-augmented ``(x, y)`` batches of this rank's contiguous part of ``"val"`` or ``"test"``.

        Deterministic order; the last batch may be smaller and ranks may yield different numbers of batches
        (possibly none), so reduce sums and counts across ranks once at the end, not per batch.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        images, labels = self._split(split)
        start, stop = self.eval_range(split, world_size, rank)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield normalize(images[lo:hi]), labels[lo:hi]
