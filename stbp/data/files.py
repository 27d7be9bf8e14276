"""The data sets' files in torchvision's layout under ``data_dir``: found where the user keeps them, downloaded with
torchvision's checked download when missing (failing fast offline), and read into CPU tensors.

    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte          mnist
    FashionMNIST/raw/ (the same four files)                          fashion_mnist
    cifar-10-batches-py/{data_batch_1..5,test_batch}                 cifar10
    cifar-100-python/{train,test}  (fine labels)                     cifar100
    NMNIST/, DVSGesture/, CIFAR10DVS/ (stbp.data.events; never downloaded)  nmnist, dvs_gesture, cifar10_dvs

Checksums belong to the downloaded archives (torchvision checks them); the decoded files are checked by structure
on every load: header, shape, dtype, counts and label range, with an error that names the file and what is wrong.
CIFAR's files are Python pickles, read by an unpickler that admits only what they hold (dicts, lists, bytes,
strings, ints and numpy arrays): a pickle that names anything else is refused before it runs. The event data sets
are read by :mod:`stbp.data.event_sets` into frames, through their frame cache.
"""

from __future__ import annotations

import codecs
import math
import os
import pathlib
import pickle
import socket
import threading
import urllib.parse
import urllib.request
from typing import NamedTuple

import torch
from torch import Tensor

from .catalog import DATASETS, DatasetSpec
from .event_sets import FrameSettings, check_frames, load_event_tensors
from .events import EventDataNotFound, EventFormatError

__all__ = [
    "DataNotFoundError",
    "DataFormatError",
    "DatasetTensors",
    "resolve_data_dir",
    "load_dataset",
    "DATA_DIR_ENV",
]

DATA_DIR_ENV = "STBP_DATA_DIR"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PICKLE_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}
TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are not where we looked and could not be downloaded."""


class DataFormatError(ValueError):
    """A data set's file is there but is not what it should be (truncated, damaged, another data set's, unsafe)."""


class DatasetTensors(NamedTuple):
    """A whole data set as CPU tensors: uint8 images ``[N, H, W]`` (one channel) or ``[N, C, H, W]``, or int16 event
    frames ``[N, T, 2, H, W]``; int64 labels; for event data the ``split_hash`` of its train and test sample lists."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    split_hash: str | None = None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """``data_dir`` if given, else ``$STBP_DATA_DIR`` if set (and non-empty), else ``./data``; absolute."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or "data"
    return pathlib.Path(data_dir).expanduser().resolve()


def _files_dir(root: pathlib.Path, spec: DatasetSpec) -> pathlib.Path:
    return root / spec.folder / "raw" if spec.format == "idx" else root / spec.folder


def _file_names(spec: DatasetSpec) -> dict[str, list[str]]:
    return {k: list(v) for k, v in IDX_FILES.items()} if spec.format == "idx" else PICKLE_FILES[spec.name]


def _has_files(root: pathlib.Path, spec: DatasetSpec) -> bool:
    return all((_files_dir(root, spec) / n).is_file() for names in _file_names(spec).values() for n in names)


def _candidate_roots(root: pathlib.Path, spec: DatasetSpec) -> list[pathlib.Path]:
    """Roots to look in; a path to the data set's own folder (or to ``MNIST/raw``) works too."""
    cands = [root]
    if root.name == spec.folder:
        cands.append(root.parent)
    if root.name == "raw" and root.parent.name == spec.folder:
        cands.append(root.parent.parent)
    return cands


def _probe_targets(spec: DatasetSpec) -> list[tuple[str, int]]:
    """(host, port) pairs a download would connect to first: the proxy if one is configured, else the mirrors."""
    import torchvision.datasets

    source = getattr(torchvision.datasets, TORCHVISION[spec.name])
    urls = getattr(source, "mirrors", None) or [source.url]
    targets: list[tuple[str, int]] = []
    proxies = urllib.request.getproxies()
    for mirror in urls:
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


def _network_reachable(timeout: float, spec: DatasetSpec = DATASETS["mnist"]) -> tuple[bool, str]:
    """Can we open a TCP connection to a download mirror (or the proxy) within ``timeout`` seconds?

    Runs in a daemon thread joined with a deadline, so a hanging DNS lookup cannot stall the caller.
    """
    result: dict[str, object] = {"ok": False, "why": f"no answer within {timeout:g} s"}

    def probe() -> None:
        errors = []
        for host, port in _probe_targets(spec):
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    result["ok"] = True
                    return
            except OSError as e:
                errors.append(f"{host}:{port}: {e}")
        result["why"] = "; ".join(errors) or "no mirror configured"

    t = threading.Thread(target=probe, name="stbp-data-probe", daemon=True)
    t.start()
    t.join(timeout)
    return bool(result["ok"]), str(result["why"])


def _download(root: pathlib.Path, spec: DatasetSpec, timeout: float) -> None:
    """torchvision's checked download into ``root``; any failure (offline, read-only dir...) -> RuntimeError."""
    import torchvision.datasets

    ok, why = _network_reachable(timeout, spec)
    if not ok:
        raise RuntimeError(f"network unreachable ({why})")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(max(timeout, 30.0))  # per socket operation: a slow download still progresses
    try:
        for train in (True, False):
            getattr(torchvision.datasets, TORCHVISION[spec.name])(str(root), train=train, download=True)
    except Exception as e:  # URLError, RuntimeError, OSError (read-only dir), timeouts, ...
        raise RuntimeError(f"{type(e).__name__}: {e}") from e
    finally:
        socket.setdefaulttimeout(old)


def _not_found_message(spec: DatasetSpec, looked: list[pathlib.Path], reason: str) -> str:
    where = "\n".join(f"  - {_files_dir(r, spec)}" for r in looked)
    layout = f"<data_dir>/{spec.folder}{'/raw' if spec.format == 'idx' else ''}/"
    names = [n for split in _file_names(spec).values() for n in split]
    return (
        f"{spec.name} files not found ({reason}).\n"
        f"Looked in:\n{where}\n"
        f"Expected files (torchvision layout {layout}): {', '.join(names)}\n"
        f"Fix: pass data_dir=<dir containing {spec.folder}> or set {DATA_DIR_ENV}=<that dir>, "
        f"or allow network access with download=True so torchvision can fetch the files into "
        f"{_files_dir(looked[0], spec)}."
    )


# Reading, checked by structure


def _read_idx(path: pathlib.Path, ndim: int) -> Tensor:
    """An idx file of unsigned bytes with ``ndim`` dimensions (MNIST's format), checked against its header."""
    data = path.read_bytes()
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != 0x800 + ndim:
        found = "no header" if magic is None else f"magic number {magic:#010x}"
        raise DataFormatError(
            f"{path} is not an idx file of {ndim}-d unsigned bytes ({found}, expected {0x800 + ndim:#010x})"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    if len(dims) != ndim or len(body) != math.prod(dims):
        raise DataFormatError(
            f"{path} holds {len(body):,} bytes of data where its header promises {dims} "
            f"= {math.prod(dims):,}: it is truncated or damaged"
        )
    flat = torch.frombuffer(bytearray(body), dtype=torch.uint8) if body else torch.empty(0, dtype=torch.uint8)
    return flat.view(*dims)


class _PickleOfArrays(pickle.Unpickler):
    """Admits only what CIFAR's pickles hold: dicts, lists, bytes, strings, ints and numpy arrays."""

    def find_class(self, module: str, name: str):
        import numpy as np

        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1}
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.zeros(1).__reduce__()[0]  # numpy's array reconstructor, wherever numpy keeps it
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file has no reason to hold")


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """What a Python 3 pickle of bytes calls (``_codecs.encode``), for its one legitimate use."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _read_cifar(path: pathlib.Path, spec: DatasetSpec) -> tuple[Tensor, Tensor]:
    import numpy as np

    try:
        with open(path, "rb") as f:
            raw = _PickleOfArrays(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataFormatError(f"{path} is not a readable {spec.name} batch: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path} holds a {type(raw).__name__}, not a {spec.name} batch (a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    key = LABEL_KEYS[spec.name]
    if key not in batch:
        other = next((n for n, k in LABEL_KEYS.items() if k in batch), None)
        hint = f": it looks like {other}'s" if other else ""
        raise DataFormatError(f"{path} has no {key!r} entry, so it is not a {spec.name} file{hint}")
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataFormatError(
            f"{path}: 'data' must be a uint8 array of N x 3072 pixels, got {shape} "
            f"{getattr(data, 'dtype', '')}".rstrip()
        )
    labels = batch[key]
    if len(labels) != len(data):
        raise DataFormatError(f"{path} has {len(data)} images but {len(labels)} labels")
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return images, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _read_split(folder: pathlib.Path, spec: DatasetSpec, split: str) -> tuple[Tensor, Tensor]:
    names = _file_names(spec)[split]
    if spec.format == "idx":
        images, labels = _read_idx(folder / names[0], 3), _read_idx(folder / names[1], 1).to(torch.int64)
        if tuple(images.shape[1:]) != (spec.size, spec.size) or len(images) != len(labels):
            raise DataFormatError(
                f"{folder / names[0]} and {names[1]}: {tuple(images.shape)} images of "
                f"{len(labels)} labels, expected N x {spec.size} x {spec.size} images, one label "
                "each"
            )
    else:
        parts = [_read_cifar(folder / n, spec) for n in names]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    bad = (labels < 0) | (labels >= spec.classes)
    if bool(bad.any()):
        raise DataFormatError(
            f"{folder} ({split}): label {int(labels[bad][0])} is outside 0..{spec.classes - 1} of {spec.name}"
        )
    return images.contiguous(), labels.contiguous()


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    *,
    timeout: float = 10.0,
    frames: FrameSettings | None = None,
) -> DatasetTensors:
    """A whole data set (:data:`stbp.data.catalog.DATASETS`) as CPU tensors.

    Looks under ``data_dir`` (:func:`resolve_data_dir`) in torchvision's layout; if the files are missing and
    ``download`` is true, fetches them with torchvision (failing within about ``timeout`` seconds offline).
    :class:`DataNotFoundError` names every place looked in; :class:`DataFormatError` names a malformed file.
    An event data set needs ``frames`` (checked first, :func:`~stbp.data.event_sets.check_frames`) and is never
    downloaded: its official files must be under ``data_dir`` (:mod:`stbp.data.events`).
    """
    spec = DATASETS[name]
    check_frames(name, frames)
    root = resolve_data_dir(data_dir)
    if spec.events:
        try:
            return DatasetTensors(*load_event_tensors(spec, root, frames))
        except EventFormatError as e:
            raise DataFormatError(str(e)) from e
        except EventDataNotFound as e:
            raise DataNotFoundError(str(e)) from e
    looked = _candidate_roots(root, spec)
    found = next((r for r in looked if _has_files(r, spec)), None)
    if found is None:
        if not download:
            raise DataNotFoundError(_not_found_message(spec, looked, "download=False"))
        try:
            _download(root, spec, timeout)
        except RuntimeError as e:
            raise DataNotFoundError(_not_found_message(spec, looked, f"download failed: {e}")) from e
        if not _has_files(root, spec):
            raise DataNotFoundError(_not_found_message(spec, looked, "download finished but files are missing"))
        found = root
    folder = _files_dir(found, spec)
    files = [folder / n for names in _file_names(spec).values() for n in names]
    key = (name, str(folder), tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, files)))
    if key not in _LOADED:  # a process that trains again (a reused sweep worker) reads the files once
        _LOADED.clear()  # one data set kept: the tensors are shared read-only, never written in place
        _LOADED[key] = DatasetTensors(*_read_split(folder, spec, "train"), *_read_split(folder, spec, "test"))
    return _LOADED[key]


_LOADED: dict[tuple, DatasetTensors] = {}
