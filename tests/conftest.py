"""Where the tests find the real MNIST: ``$STBP_DATA_DIR`` if set; else ``../shared/data`` beside the repository
(CI and the development machines, which have no internet); else the product's own default, ``./data`` of the
repository, where ``make train`` puts it, downloading it there when it is missing."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def mnist_root(environ=os.environ, shared: Path = SHARED_DATA, default: Path = ROOT / "data") -> Path:
    """The data directory the tests use (absolute: end-to-end tests run tools in other working directories)."""
    if environ.get("STBP_DATA_DIR"):
        return Path(environ["STBP_DATA_DIR"]).resolve()
    return (shared if (shared / "MNIST" / "raw").is_dir() else default).resolve()


def pytest_configure(config):
    # The tools the tests start (tune.py, torchrun, Ray workers) read the same place.
    os.environ["STBP_DATA_DIR"] = str(mnist_root())


@pytest.fixture(scope="session")
def data_dir() -> str:
    from stbp.data import DataNotFoundError, load_dataset

    path = mnist_root()
    if not (path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        try:
            load_dataset("mnist", path, download=True)  # downloaded where the product keeps it
        except DataNotFoundError as exc:
            pytest.fail(f"the real MNIST is needed: {exc}")
    return str(path)


@pytest.fixture(scope="session")
def mnist(data_dir):
    from stbp.data import load_dataset

    return load_dataset("mnist", data_dir, download=False)


#: Module fixtures that cost minutes (whole sweeps, a browser): under pytest-xdist (``make test`` runs
#: ``-n 4 --dist loadgroup``) the tests that share one run in one worker, so that it is made once.
ONE_WORKER = {"resumed_sweep", "multi_sweeps", "faulted_sweep", "repeated_sweep", "browser"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name in (info.name2fixturedefs if info else ()) if name in ONE_WORKER)
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}::{shared[0]}"))
