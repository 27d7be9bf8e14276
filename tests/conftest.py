import os
from pathlib import Path

import pytest

# CI and developer machines have no internet: the real MNIST lives in ../shared/data beside the repo.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> str:
    # Absolute: the end-to-end tests run tune.py and torchrun in other working directories.
    path = str(Path(os.environ.get("STBP_DATA_DIR") or SHARED_DATA).resolve())
    if not (Path(path) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.fail(f"real MNIST not found under {path}; set STBP_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def mnist(data_dir):
    from stbp.data import load_dataset

    return load_dataset("mnist", data_dir, download=False)
