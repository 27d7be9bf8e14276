"""Small data sets written in each official on-disk format, for the readers and a training run on each.

- Fashion-MNIST (and MNIST): idx files, big-endian headers, as LeCun's and Zalando's files are.
- CIFAR-10 / CIFAR-100: Python 2 pickles as the official ``cifar-*-python`` archives hold them: protocol 2, the
  dict keys and the array bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING opcodes, which Python 3 reads as
  bytes), numpy arrays through ``numpy.core.multiarray._reconstruct``.

Images carry their class (a per-class brightness and a stripe), so a network can learn them.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from stbp.data.catalog import DATASETS


def _images(n: int, classes: int, channels: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    base = rng.integers(0, 60, (n, channels, size, size))
    brightness = (labels * (150 // classes))[:, None, None, None]
    stripe = np.zeros_like(base)
    for i, label in enumerate(labels):
        stripe[i, :, label % size, :] = 80
    return np.clip(base + brightness + stripe, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes: magic 0x0000080N, N big-endian int32 dimensions, the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root: Path, name: str = "fashion_mnist", train: int = 256, test: int = 128) -> Path:
    spec = DATASETS[name]
    raw = root / spec.folder / "raw"
    for split, n, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = _images(n, spec.classes, 1, spec.size, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


class Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), and numpy arrays as Python 2 numpy pickled them."""

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    def save_array(self, array: np.ndarray) -> None:
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.save((np.ndarray, (0,), b"b"))
        self.write(pickle.REDUCE)
        self.memoize(array)
        self.save((1, array.shape, array.dtype, False, array.tobytes()))
        self.write(pickle.BUILD)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[np.ndarray] = save_array


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer).dump(obj)
    return buffer.getvalue()


def cifar_batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    key = b"labels" if name == "cifar10" else b"fine_labels"
    batch = {b"data": images.reshape(len(images), -1), key: [int(x) for x in labels], b"batch_label": b"testing"}
    if name == "cifar100":
        batch[b"coarse_labels"] = [int(x) // 5 for x in labels]
    return batch


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 64, test: int = 128) -> Path:
    spec = DATASETS[name]
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    files = ([f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]) + [
        "test_batch" if name == "cifar10" else "test"
    ]
    for i, file in enumerate(files):
        n = test if file.startswith("test") else per_batch * (5 if name == "cifar100" else 1)
        images, labels = _images(n, spec.classes, 3, spec.size, seed=10 + i)
        (folder / file).write_bytes(py2_pickle(cifar_batch(images, labels, name)))
    return root
