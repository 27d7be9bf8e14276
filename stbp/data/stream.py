"""Image files streamed from disk, batch by batch: the folder sets' counterpart of :class:`~.loader.DeviceDataset`,
with the same interface (the trainer cannot tell them apart) and the same guarantees.

- **Memory flat in the data set's size.** Only the file index (:class:`~.folders.FolderIndex`, tens of bytes a
  file) is held; images are decoded when their batch is due.
- **Sharded and exact.** A rank's training batches are :func:`~.loader.epoch_indices` (one permutation per
  ``(seed, epoch)``, rank ``r`` taking slice ``r`` of every global batch), and every sample's crop and flip come from
  a generator seeded by ``(seed, epoch, rank, step, slot)``: the batches depend only on those numbers, whichever
  process decodes them, so a run resumed mid-epoch sees exactly the batches it would have seen.
- **Decoding keeps up.** ``workers`` processes (torch's ``DataLoader``, one item = one whole batch, kept across
  epochs, pinned memory on CUDA, two batches ahead per process) decode with Pillow and decode *less*: a JPEG is
  decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled decoding, Pillow's ``draft``) whenever the crop still has
  ``image_size`` pixels a side at that scale, and only the crop is resized (``resize(box=...)``). The device gets
  uint8 ``[B, H, W, 3]`` (channels-last, what the model's weights use) and normalises it there.
- **Augmentation, the ImageNet convention.** Training: a random resized crop (scale 0.08-1, aspect 3/4-4/3,
  torchvision's ``RandomResizedCrop``) to ``image_size`` and a horizontal flip (p=0.5) where the data set allows
  it; evaluation: the centre crop of the image resized so its short side is ``image_size / 0.875``.
- **Bad files named.** Any image Pillow reads loads (grayscale, CMYK, palette, PNG); a truncated, empty or
  unreadable one raises :class:`~.files.DataFormatError` with its path, which stops the run (its checkpoints stay).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .catalog import DatasetSpec
from .files import DataFormatError
from .folders import FolderIndex
from .loader import _mix_seed, _num_steps, epoch_indices, eval_part, normalize, split_train_val

__all__ = ["StreamedDataset", "train_box", "eval_box", "decode", "default_workers"]

EVAL_RESIZE = 0.875  # the ImageNet convention: resize to 256, centre crop 224
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def default_workers(local_ranks: int = 1) -> int:
    """Decoding processes per rank when not given: this process's CPUs shared by the ranks of its node, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_ranks)))


def train_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A random resized crop's ``(left, top, right, bottom)`` in a ``width`` x ``height`` image: torchvision's
    ``RandomResizedCrop.get_params`` (10 tries at a random area and aspect ratio, else the central crop of the
    nearest allowed ratio), drawn from ``rng``."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    ratio = width / height
    w, h = (width, round(width / RATIO[0])) if ratio < RATIO[0] else (round(height * RATIO[1]), height)
    w, h = (width, height) if RATIO[0] <= ratio <= RATIO[1] else (min(w, width), min(h, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def eval_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centre crop of ``Resize(image_size / 0.875)`` then ``CenterCrop(image_size)``, in the image's own pixels:
    a square of 0.875 times its short side, centred."""
    side = max(1, round(EVAL_RESIZE * min(width, height)))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode(path: str, size: int, rng: random.Random | None, hflip: bool, out: np.ndarray, scaled: bool = True) -> None:
    """Decode the image at ``path`` into ``out`` (uint8 ``[size, size, 3]``): a random resized crop drawn from ``rng``
    (and a flip, when ``hflip``), or the evaluation crop when ``rng`` is None. A JPEG whose crop keeps ``size`` pixels
    a side at 1/2 scale or less is decoded at that scale (``scaled``); only the crop is resized, and an RGB image is
    not copied on the way. :class:`DataFormatError` naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
            box = eval_box(width, height) if rng is None else train_box(width, height, rng)
            flip = rng is not None and hflip and rng.random() < 0.5
            reduce = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
            if scaled and reduce >= 2 and img.format == "JPEG":
                img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            sx, sy = img.size[0] / width, img.size[1] / height
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")  # grayscale, CMYK, palette, alpha: all RGB
            scaled_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            crop = rgb.resize((size, size), Image.Resampling.BILINEAR, box=scaled_box)
        out[...] = np.asarray(crop)[:, ::-1] if flip else np.asarray(crop)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataFormatError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


class _Batches(torch.utils.data.Dataset):
    """One item = one whole batch, decoded where the loader runs it (a worker): the key is ``("train", epoch, step,
    global_batch, world_size, rank, seed, hflip)`` or ``(split, lo, hi)`` for an evaluation chunk; the value uint8
    ``[B, size, size, 3]`` and int64 labels ``[B]``. Everything a worker needs is in the key or fixed at the start."""

    def __init__(self, index: FolderIndex, rows: dict[str, np.ndarray], size: int, scaled: bool = True):
        self.index, self.rows, self.size, self.scaled = index, rows, size, scaled
        self._epoch: tuple[tuple, Tensor] | None = None  # this process's last epoch's permutation

    def _train_rows(self, epoch: int, step: int, batch: int, world: int, rank: int, seed: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != (epoch, batch, world, rank, seed):
            idx = epoch_indices(len(self.rows["train"]), batch, world, rank, seed, epoch)
            self._epoch = ((epoch, batch, world, rank, seed), idx)
        return self.rows["train"][self._epoch[1][step].numpy()]

    def __getitem__(self, key: tuple) -> tuple[Tensor, Tensor]:
        index = self.index
        if key[0] == "train":
            _, epoch, step, batch, world, rank, seed, hflip = key
            rows = self._train_rows(epoch, step, batch, world, rank, seed)
            paths, labels = index.train_paths[rows], index.train_labels[rows]
            rngs = [random.Random(_mix_seed(seed, epoch, rank, step, j, 0x1A6)) for j in range(len(rows))]
        else:
            split, lo, hi = key
            rows, hflip = self.rows[split][lo:hi], False
            train = split == "val"  # the validation images are held out of the training folder
            paths = (index.train_paths if train else index.test_paths)[rows]
            labels = (index.train_labels if train else index.test_labels)[rows]
            rngs = [None] * len(rows)
        out = np.empty((len(paths), self.size, self.size, 3), dtype=np.uint8)
        for j, (path, rng) in enumerate(zip(paths.tolist(), rngs)):
            decode(os.path.join(index.root, os.fsdecode(path)), self.size, rng, hflip, out[j], self.scaled)
        return torch.from_numpy(out), torch.from_numpy(labels.copy())


class _Plan:
    """The keys the loader's sampler yields next (set before each pass; the workers persist across passes)."""

    def __init__(self) -> None:
        self.keys: list[tuple] = []

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.keys)


def _rows(index: FolderIndex, val_size: int, train_size: int, test_size: int, seed: int) -> dict[str, np.ndarray]:
    """Positions into the index of the train, val and test images: val carved out of the training folder as for
    every data set (:func:`~.loader.split_train_val`), ``train_size`` the first of the rest, at most ``test_size``
    spread evenly over the test folder (which is sorted by class: its first N would be a few classes)."""
    n_all, n_test = len(index.train_paths), len(index.test_paths)
    where = f"{index.root}/train"
    if not 1 <= val_size < n_all:
        raise DataFormatError(f"data.val_size {val_size} must be in [1, {n_all}): {where} has {n_all} images")
    train, val = (t.numpy() for t in split_train_val(n_all, val_size, seed))
    if train_size > len(train):
        raise DataFormatError(
            f"data.train_size {train_size} exceeds the {len(train)} images of {where} left after val_size {val_size}"
        )
    train = train[:train_size] if train_size else train
    test_size = min(test_size, n_test)  # at most: as for the data sets held in memory
    test = np.linspace(0, n_test - 1, test_size).round().astype(np.int64) if test_size else np.arange(n_test)
    return {"train": train, "val": val, "test": test}


class StreamedDataset:
    """The images of a folder set (``index``) as :class:`~.loader.DeviceDataset` serves them: shuffled, sharded,
    augmented batches and evaluation chunks on ``device``, decoded from disk by ``workers`` processes
    (``scaled_decoding=False`` decodes every JPEG at full size: for comparisons, bench/loader.py)."""

    def __init__(
        self,
        index: FolderIndex,
        device: torch.device | str,
        *,
        spec: DatasetSpec,
        image_size: int,
        val_size: int,
        train_size: int = 0,
        test_size: int = 0,
        seed: int = 0,
        workers: int = 0,
        scaled_decoding: bool = True,
    ) -> None:
        self.device, self.spec, self.index, self.size = torch.device(device), spec, index, image_size
        self.split_hash = index.identity
        self.rows = _rows(index, val_size, train_size, test_size, seed)
        shape = (1, len(spec.mean), 1, 1)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(shape)
        self._plan = _Plan()
        self.loader = torch.utils.data.DataLoader(
            _Batches(index, self.rows, image_size, scaled_decoding),
            batch_size=None,
            sampler=self._plan,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers else None,
        )

    n_train = property(lambda self: len(self.rows["train"]))
    n_val = property(lambda self: len(self.rows["val"]))
    n_test = property(lambda self: len(self.rows["test"]))

    def num_train_steps(self, global_batch: int, world_size: int = 1) -> int:
        return _num_steps(self.n_train, global_batch, world_size)

    def train_rows_of(self, epoch: int, step: int, global_batch: int, world_size: int, rank: int, seed: int):
        """The index rows (into its training files) of ``rank``'s batch ``step`` of ``epoch``."""
        return self.loader.dataset._train_rows(epoch, step, global_batch, world_size, rank, seed)

    def _pass(self, keys: list[tuple]) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``keys``, on the device: uint8 ``[B, H, W, 3]`` becomes float ``[B, 3, H, W]``
        (channels-last), normalised."""
        self._plan.keys = keys
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            yield normalize(images, self.mean, self.std), labels.to(self.device, non_blocking=True)

    def train_batches(
        self, epoch, global_batch, world_size=1, rank=0, padding=0, hflip=False, seed=0, start_step=0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """As :meth:`DeviceDataset.train_batches` (``padding`` does not apply: the crop is a random resized one)."""
        steps = self.num_train_steps(global_batch, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        key = (global_batch, world_size, rank, seed, hflip)
        return self._pass([("train", epoch, step, *key) for step in range(start_step, steps)])

    def eval_range(self, split: str, world_size: int = 1, rank: int = 0) -> tuple[int, int]:
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return eval_part(len(self.rows[split]), world_size, rank)

    def eval_batches(self, split, batch_size, world_size=1, rank=0) -> Iterator[tuple[Tensor, Tensor]]:
        """As :meth:`DeviceDataset.eval_batches`: this rank's contiguous part of ``split``, un-augmented."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        start, stop = self.eval_range(split, world_size, rank)
        return self._pass([(split, lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size)])
