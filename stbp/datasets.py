"""The data sets a config can name (``data.dataset``), as facts: shapes, classes, split sizes, normalisation and
the augmentation that suits them. Pure Python (the config reads it); :mod:`stbp.data` reads the files.

Normalisation constants are the training sets' per-channel pixel mean and standard deviation (on [0, 1]), as
torchvision's and SpikingJelly's examples use them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetSpec", "DATASETS", "dataset_defaults"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # torchvision's folder under data_dir
    channels: int
    size: int  # images are size x size
    classes: int
    train_size: int  # the official training split, that val_size is carved out of
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether a mirrored image is still an image of its class (not for digits)

    @property
    def format(self) -> str:
        return "idx" if self.channels == 1 else "pickle"


DATASETS = {
    "mnist": DatasetSpec("mnist", "MNIST", 1, 28, 10, 60_000, 10_000, (0.1307,), (0.3081,), hflip=False),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "FashionMNIST", 1, 28, 10, 60_000, 10_000, (0.2860,), (0.3530,), hflip=True
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        "cifar-10-batches-py",
        3,
        32,
        10,
        50_000,
        10_000,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        hflip=True,
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "cifar-100-python",
        3,
        32,
        100,
        50_000,
        10_000,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        hflip=True,
    ),
}


def dataset_defaults(name: str) -> dict[str, object]:
    """The config fields a data set decides unless they are given with it: its channels, classes and flips."""
    spec = DATASETS[name]
    return {"in_channels": spec.channels, "num_classes": spec.classes, "hflip": spec.hflip}
