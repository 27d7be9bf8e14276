"""A data set held on the training device, with on-device shuffling, sharding, normalisation and augmentation.

In the style of airbench / hlb-CIFAR10: the whole dataset is one uint8 tensor on the device and every
per-batch operation (indexing, random crop, flip, normalisation) is a handful of vectorised tensor ops.
There is no DataLoader, no worker process, no per-sample Python and no host synchronisation (``.item()``,
``.tolist()``, ``.cpu()``) in the per-batch path. Index permutations are drawn once per epoch on the CPU
(so they are identical on every rank and on every kind of device) and copied to the device in one go.

Event data (int16 frames of event counts ``[N, T, 2, H, W]``) is held and served the same way: a crop and a flip
move every frame and polarity of a sample alike, and :func:`event_input` turns counts into the model's input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .catalog import DATASETS, DatasetSpec
from .files import DatasetTensors

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "split_train_val",
    "epoch_indices",
    "eval_part",
    "normalize",
    "augment",
    "event_input",
    "model_input",
    "DeviceDataset",
]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_MASK64 = (1 << 64) - 1


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


def eval_part(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous part of ``range(n)``: parts differ in size by at most one (the first
    ``n % world_size`` ranks get one extra) and together cover it once; a part is empty when ``world_size > n``."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size > 0 and 0 <= rank < world_size, got {world_size}, {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _num_steps(n: int, global_batch: int, world_size: int) -> int:
    if world_size < 1 or global_batch % world_size:
        raise ValueError(f"the global batch ({global_batch}) must be divisible by world_size ({world_size})")
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


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor = (MNIST_MEAN,), std: Sequence[float] | Tensor = (MNIST_STD,)
) -> Tensor:
    """uint8 ``[B, H, W]`` (one channel) or ``[B, C, H, W]`` -> float32 ``[B, C, H, W]``, ``(x / 255 - mean) / std``
    per channel (MNIST's constants by default; a ``[1, C, 1, 1]`` tensor of them on the device avoids copies)."""
    x = images.to(torch.float32).div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x
    if isinstance(mean, Tensor):
        return x.sub_(mean).div_(std)
    if len(mean) == 1:
        return x.sub_(mean[0]).div_(std[0])
    shape = (1, len(mean), 1, 1)
    return x.sub_(torch.tensor(mean, device=x.device).view(shape)).div_(torch.tensor(std, device=x.device).view(shape))


def augment(
    images: Tensor,
    padding: int,
    hflip: bool,
    generator: torch.Generator,
    mean: Sequence[float] | Tensor = (MNIST_MEAN,),
    std: Sequence[float] | Tensor = (MNIST_STD,),
) -> Tensor:
    """Random crop with ``padding`` black (0) pixels and optional horizontal flip (p=0.5), then :func:`normalize`.

    ``images`` as for :func:`normalize`. Per-sample offsets in ``[0, 2 * padding]`` (and flip coins) are drawn from
    ``generator`` on its device; the crop is one gather from the padded batch, the flip reverses the column index of
    that same gather. Draw order: offsets (rows, then columns), then flips. ``padding=0, hflip=False`` is exactly
    :func:`normalize` and draws nothing.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not hflip:
        return normalize(images, mean, std)
    images = images.unsqueeze(1) if images.dim() == 3 else images
    return normalize(_crop_flip(images, padding, hflip, generator), mean, std)


def _crop_flip(images: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """:func:`augment`'s crop and flip of ``[B, C, H, W]``, in the input's dtype (0 where the crop shows padding)."""
    b, c, h, w = images.shape
    dev = images.device
    gdev = generator.device

    if padding > 0:
        padded = images.new_zeros((b, c, h + 2 * padding, w + 2 * padding))
        padded[:, :, padding : padding + h, padding : padding + w] = images
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=gdev).to(dev)
    else:
        padded = images
        dy = torch.zeros(b, dtype=torch.int64, device=dev)
        dx = dy

    rows = dy[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=dev)  # [B, W]
    if hflip:
        flip = torch.rand((b,), generator=generator, device=gdev).to(dev) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None, None]
    channel = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # [B, C, H, W]


def event_input(frames: Tensor, padding: int = 0, hflip: bool = False, generator: torch.Generator | None = None):
    """Event frames ``[B, T, 2, H, W]`` of counts -> float32 ``log(1 + count)`` (zero stays zero; a hot pixel's
    hundreds of events do not swamp the rest; :mod:`stbp.data.catalog`), after :func:`augment`'s random crop and flip
    when ``padding`` or ``hflip`` (drawn from ``generator`` as there): one offset and coin per sample, for all of
    its frames and polarities."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding > 0 or hflip:
        b, t, c, h, w = frames.shape
        frames = _crop_flip(frames.reshape(b, t * c, h, w), padding, hflip, generator).view(b, t, c, h, w)
    return torch.log1p(frames.to(torch.float32))


def model_input(batch: Tensor, spec: DatasetSpec, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """A batch of stored samples (uint8 images or event frames) as the model's input, un-augmented."""
    if spec.events:
        return event_input(batch)
    return normalize(batch, spec.mean if mean is None else mean, spec.std if std is None else std)


# ----------------------------------------------------------------------------------------------------------
# The dataset on the device
# ----------------------------------------------------------------------------------------------------------


class DeviceDataset:
    """Train / val / test images (uint8) or event frames (int16) and labels (int64) of a data set (``spec``; MNIST by
    default), resident on ``device``.

    ``val`` is carved out of the official training images with :func:`split_train_val` (``seed``);
    ``train_size > 0`` keeps only the first ``train_size`` of the remaining train split.
    """

    def __init__(
        self,
        tensors: DatasetTensors,
        device: torch.device | str,
        *,
        val_size: int = 6000,
        train_size: int = 0,
        seed: int = 0,
        spec: DatasetSpec = DATASETS["mnist"],
    ) -> None:
        self.device = torch.device(device)
        self.spec = spec
        shape = (1, len(spec.mean), 1, 1)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(shape)
        self.split_hash = getattr(tensors, "split_hash", None)  # event data: names its train and test samples
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
        start_step: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x [b, C, H, W] float32, y [b] int64)`` on the device, ``b = global_batch // world_size`` (event
        data: ``x [b, T, 2, H, W]``, :func:`event_input`).

        Order from :func:`epoch_indices` ``(seed, epoch)``; augmentation from a device generator reseeded
        for every step from ``(seed, epoch, rank, step)``, so the batches depend only on those numbers and a run
        resumed at an epoch boundary sees exactly the batches it would have seen; ``start_step`` skips the epoch's
        first steps, for a run resumed within the epoch.
        """
        idx = epoch_indices(self.n_train, global_batch, world_size, rank, seed, epoch)
        idx = idx.to(self.device, non_blocking=True)
        augmenting = padding > 0 or hflip
        gen = torch.Generator(device=self.device) if augmenting else None
        for step, pos in enumerate(idx):
            if step < start_step:
                continue
            imgs = self.train_images[pos]
            labels = self.train_labels[pos]
            if gen is not None:
                gen.manual_seed(_mix_seed(seed, epoch, rank, step, 0xA06))
            if self.spec.events:
                x = event_input(imgs, padding, hflip, gen)
            elif gen is not None:
                x = augment(imgs, padding, hflip, gen, self.mean, self.std)
            else:
                x = normalize(imgs, self.mean, self.std)
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
        return eval_part(self._split(split)[0].shape[0], world_size, rank)

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
            yield model_input(images[lo:hi], self.spec, self.mean, self.std), labels[lo:hi]
