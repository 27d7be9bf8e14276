"""Where the tests find the real MNIST: ``$STBP_DATA_DIR`` if set; else ``../shared/data`` beside the repository
(CI and the development machines, which have no internet); else the product's own default, ``./data`` of the
repository, where ``make train`` puts it, downloading it there when it is missing."""

import os
from pathlib import Path

import pytest

# One torch thread a process, before anything imports torch (the pytest workers, and through the environment every
# trainer, tune.py and Ray worker the tests start): the suite runs several processes at once on a 2-core machine,
# where a team of OpenMP threads waits at every barrier for a member the scheduler has parked (with two threads a
# process, a test that takes 15 s alone took 507 s in the suite). OMP_NUM_THREADS in the environment still wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
#: ``-n 4 --dist loadgroup``) the tests that take one as an argument run in one worker, so that it is made once.
#: The SLURM tests too: the one-node cluster runs one of their jobs at a time anyway, and as one group (the largest,
#: with the sweeps') they start first instead of queueing behind the rest of the suite at its end.
ONE_WORKER = {"resumed_sweep", "multi_sweeps", "faulted_sweep", "repeated_sweep", "browser", "slurm"}


def fixture_groups(tests: Path = ROOT / "tests") -> dict[str, str]:
    """``{"tests/test_x.py::test_name": group}`` for every test function that takes a :data:`ONE_WORKER` fixture (its
    first such argument names the group), read from the test files' source."""
    import ast

    groups = {}
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            if shared := sorted({a.arg for a in node.args.args} & ONE_WORKER):
                groups[f"tests/{path.name}::{node.name}"] = f"tests/{path.name}::{shared[0]}"
    return groups


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: pytest -p no:xdist runs too
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` as :func:`fixture_groups` groups the tests; every other test is a group of its own. (xdist's
    own loadgroup reads ``xdist_group`` marks into the test ids, which pytest 9 no longer lets it rewrite.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups = fixture_groups()

    class FixtureGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return groups.get(nodeid.split("[")[0], nodeid)

    return FixtureGroups(config, log)
