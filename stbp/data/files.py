"""The MNIST files in torchvision's layout (``<data_dir>/MNIST/raw/*-ubyte``): found where the user keeps them,
downloaded with torchvision's checked download when missing (failing fast offline), and read into CPU tensors whose
shapes are verified. :mod:`stbp.data.loader` puts them on the training device.
"""

from __future__ import annotations

import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DataNotFoundError", "MNISTTensors", "resolve_data_dir", "load_mnist", "DATA_DIR_ENV"]

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


class DataNotFoundError(FileNotFoundError):
    """The MNIST raw files are not where we looked and could not be downloaded."""


class MNISTTensors(NamedTuple):
    """The full MNIST dataset as CPU tensors."""

    train_images: Tensor  # uint8 [60000, 28, 28]
    train_labels: Tensor  # int64 [60000]
    test_images: Tensor  # uint8 [10000, 28, 28]
    test_labels: Tensor  # int64 [10000]


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
