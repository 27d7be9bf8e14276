"""The data sets: what each one is (:mod:`.catalog`, facts the config reads); finding, verifying and downloading
their files (:mod:`.files`); holding one on the training device and serving shuffled, sharded, augmented batches
(:mod:`.loader`); the event-camera sets' readers, frames and splits (:mod:`.events`, :mod:`.event_sets`); image
folders and ImageNet listed (:mod:`.folders`) and streamed from disk batch by batch (:mod:`.stream`).

The names below load on first use (PEP 562), so that the config can read :mod:`.catalog` without torch or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .event_sets import FRAME_FIELDS, FrameSettings, check_frames
    from .files import DATA_DIR_ENV, DataFormatError, DataNotFoundError, DatasetTensors, load_dataset, resolve_data_dir
    from .folders import FolderIndex, folder_index, list_folder
    from .loader import (
        MNIST_MEAN,
        MNIST_STD,
        DeviceDataset,
        augment,
        epoch_indices,
        event_input,
        model_input,
        normalize,
        split_train_val,
    )
    from .stream import StreamedDataset

_HOME = {
    **dict.fromkeys(["FRAME_FIELDS", "FrameSettings", "check_frames"], ".event_sets"),
    **dict.fromkeys(
        ["DATA_DIR_ENV", "DataFormatError", "DataNotFoundError", "DatasetTensors", "load_dataset", "resolve_data_dir"],
        ".files",
    ),
    **dict.fromkeys(
        ["MNIST_MEAN", "MNIST_STD", "DeviceDataset", "augment", "epoch_indices", "event_input", "model_input"],
        ".loader",
    ),
    **dict.fromkeys(["normalize", "split_train_val"], ".loader"),
    **dict.fromkeys(["FolderIndex", "folder_index", "list_folder"], ".folders"),
    "StreamedDataset": ".stream",
}

__all__ = [
    "DATA_DIR_ENV",
    "FRAME_FIELDS",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetTensors",
    "DeviceDataset",
    "FolderIndex",
    "FrameSettings",
    "StreamedDataset",
    "augment",
    "check_frames",
    "epoch_indices",
    "event_input",
    "folder_index",
    "list_folder",
    "load_dataset",
    "model_input",
    "normalize",
    "resolve_data_dir",
    "split_train_val",
]
assert sorted(__all__) == sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
