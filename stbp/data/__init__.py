"""The data sets: :mod:`~stbp.data.files` finds, verifies and downloads their files; :mod:`~stbp.data.loader` holds
one on the training device and serves shuffled, sharded, augmented batches from it; :mod:`~stbp.data.event_sets`
turns the event-camera data sets into frames."""

from .event_sets import FRAME_FIELDS, FrameSettings, check_frames
from .files import (
    DATA_DIR_ENV,
    DataFormatError,
    DataNotFoundError,
    DatasetTensors,
    load_dataset,
    resolve_data_dir,
)
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

__all__ = [
    "DATA_DIR_ENV",
    "MNIST_MEAN",
    "MNIST_STD",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetTensors",
    "DeviceDataset",
    "augment",
    "epoch_indices",
    "event_input",
    "model_input",
    "FRAME_FIELDS",
    "FrameSettings",
    "check_frames",
    "load_dataset",
    "normalize",
    "resolve_data_dir",
    "split_train_val",
]
