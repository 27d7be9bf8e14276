"""The data sets a config can name (``data.dataset``), as facts: shapes, classes, split sizes, normalisation and
the augmentation that suits them. Pure Python (the config reads it); :mod:`stbp.data` reads the files.

Normalisation constants are the training sets' per-channel pixel mean and standard deviation (on [0, 1]), as
torchvision's and SpikingJelly's examples use them.

The event-camera sets (``events=True``, :mod:`stbp.data.events`) have two channels, the OFF and ON polarities, and
``size`` is the sensor's. Their samples are frames of event counts, which the model sees as ``log(1 + count)``
(:func:`stbp.data.event_input`): no mean or standard deviation, zero stays zero (an empty pixel, the crop's
padding) and a hot pixel's hundreds of events weigh about 6, not hundreds; tdBN after the stem sets the scale.
Their ``val_size`` and ``crop_padding``, where given, are the defaults a config takes with the data set.

The folder sets (``streamed=True``: ``imagefolder``, a user's own ``train/<class>/`` and ``val/<class>/``, and
``imagenet``) are JPEG, PNG, ... files read from disk batch by batch (:mod:`stbp.data.folders`), never held whole;
``size`` is the default ``image_size`` of their crops. ``imagefolder``'s classes and split sizes are its folder's
(0 here: counted when it is listed).
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
    events: bool = False  # an event-camera data set: frames [T, 2, size, size] of event counts
    val_size: int | None = None  # the config's default val_size with this data set (None: the config's own)
    crop_padding: int | None = None  # the config's default crop_padding with this data set (None: the config's own)
    streamed: bool = False  # image files read from disk batch by batch (stbp.data.folders), not held in memory

    @property
    def format(self) -> str:
        if self.streamed:
            return "folder"
        return "events" if self.events else "idx" if self.channels == 1 else "pickle"


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
    # Event data (frames of event counts; no normalisation constants). N-MNIST: Orchard et al. 2015, the official
    # Train/Test folders, 34x34 sensor, digits (no flips; its saccades already move the digit: no crop). DVS128
    # Gesture: Amir et al. 2017, one sample per row of the labels CSV of each recording in the official trials lists:
    # 1,176 / 288 rows, the count SpikingJelly and snnTorch report for the same cut (some recordings list a gesture
    # twice; the paper counts 1,342 gestures, tonic 1,077 / 264); left- and right-hand gestures are different
    # classes (no flips). CIFAR10-DVS: Li et al. 2017, no official split: 100 of each class's 1,000 recordings
    # held out (dvs_test_split). val_size is 10% of each training split.
    "nmnist": DatasetSpec(
        "nmnist", "NMNIST", 2, 34, 10, 60_000, 10_000, (), (), hflip=False, events=True, crop_padding=0
    ),
    "dvs_gesture": DatasetSpec(
        "dvs_gesture", "DVSGesture", 2, 128, 11, 1_176, 288, (), (), hflip=False, events=True, val_size=118
    ),
    "cifar10_dvs": DatasetSpec(
        "cifar10_dvs", "CIFAR10DVS", 2, 128, 10, 9_000, 1_000, (), (), hflip=True, events=True, val_size=900
    ),
    # Image files streamed from disk. ImageNet: ILSVRC2012 (Russakovsky et al. 2015), 1,281,167 training and 50,000
    # validation images (the test split here) of 1,000 classes; torchvision's normalisation constants; 10,000
    # training images held out for validation. An image folder's classes and sizes are its own (0: counted).
    "imagenet": DatasetSpec(
        "imagenet",
        "imagenet",
        3,
        224,
        1000,
        1_281_167,
        50_000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        hflip=True,
        val_size=10_000,
        crop_padding=0,
        streamed=True,
    ),
    "imagefolder": DatasetSpec(
        "imagefolder",
        "",
        3,
        224,
        0,
        0,
        0,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        hflip=True,
        crop_padding=0,
        streamed=True,
    ),
}


def dataset_defaults(name: str) -> dict[str, object]:
    """The config fields a data set decides unless they are given with it: its channels, classes and flips (and the
    val_size and crop_padding of the sets that set them). An image folder's classes are counted when it is listed."""
    spec = DATASETS[name]
    extra = {k: getattr(spec, k) for k in ("val_size", "crop_padding") if getattr(spec, k) is not None}
    classes = {"num_classes": spec.classes} if spec.classes else {}
    return {"in_channels": spec.channels, **classes, "hflip": spec.hflip, **extra}
