"""MNIST for training: :mod:`~stbp.data.files` finds, verifies and downloads the files; :mod:`~stbp.data.loader`
holds the data set on the training device and serves shuffled, sharded, augmented batches from it."""

from .files import DATA_DIR_ENV, DataNotFoundError, MNISTTensors, load_mnist, resolve_data_dir
from .loader import MNIST_MEAN, MNIST_STD, DeviceMNIST, augment, epoch_indices, normalize, split_train_val

__all__ = ["DATA_DIR_ENV", "MNIST_MEAN", "MNIST_STD", "DataNotFoundError", "DeviceMNIST", "MNISTTensors", "augment",
           "epoch_indices", "load_mnist", "normalize", "resolve_data_dir", "split_train_val"]
