"""Where the event data sets' files are (their official layouts under data_dir, extracted from the official
archives when only those are there), their train/test splits, and the hash that names a split."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .readers import (
    CIFAR10_DVS_CLASSES,
    SENSORS,
    EventDataNotFound,
    Sample,
    _fail,
    gesture_labels_path,
    read_gesture_labels,
)


def split_hash(train_ids: Iterable[str | Sample], test_ids: Iterable[str | Sample]) -> str:
    """12 hex digits of sha256 over the sorted training and test sample ids ('<rel path>#<index>'): equal exactly
    when two runs train and test on the same samples."""
    ids = {
        name: sorted(s.id if isinstance(s, Sample) else str(s) for s in group)
        for name, group in (("train", train_ids), ("test", test_ids))
    }
    return hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()[:12]


def cifar10_dvs_split(files: Iterable[Sample], test: str = "last100") -> tuple[list[Sample], list[Sample]]:
    """CIFAR10-DVS has no official split: per class, files sorted by their numeric index, the last 100 are the
    test set ('last100', the default) or the first 100 ('first100', as some published code does); any
    'firstN'/'lastN' works. Returns (train, test), class by class."""
    m = re.fullmatch(r"(first|last)(\d+)", test)
    if not m:
        raise ValueError(f"test must be 'firstN' or 'lastN' (e.g. 'last100'), not {test!r}")
    n = int(m.group(2))
    by_class: dict[int, list[Sample]] = {}
    for s in files:
        by_class.setdefault(s.label, []).append(s)
    train, held = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: int(re.findall(r"\d+", PurePosixPath(s.rel).stem)[-1]))
        if not 0 < n < len(group):
            raise ValueError(f"class {label} has {len(group)} files: cannot hold out {n} of them")
        first, rest = (group[:n], group[n:]) if m.group(1) == "first" else (group[-n:], group[:-n])
        held += first
        train += rest
    return train, held


# Layouts and archives


def _check_member(archive: Path, name: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        _fail(archive, f"unsafe member {name!r} (absolute or '..') refused; nothing extracted")


def _unpack(archive: Path, into: Path) -> None:
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                _check_member(archive, name)
            z.extractall(into)
        return
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            _check_member(archive, m.name)
            if not (m.isfile() or m.isdir()):
                _fail(archive, f"member {m.name!r} is a link or device, refused; nothing extracted")
        # The 'data' filter (3.10.12+/3.11.4+) re-checks what we checked and drops odd permissions.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **kwargs)


def extract_archive(archive: Path | str, folder: Path | str) -> Path:
    """Unpack a .zip or .tar(.gz) so that ``folder`` appears whole: the archive's top-level entry named like
    ``folder`` if it has one, else its whole content. Every member is checked before anything is written
    (absolute paths, '..' and links are refused) and the result is moved into place in one rename."""
    archive, folder = Path(archive), Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{folder.name}-", dir=folder.parent))
    content = tmp / "content"  # made by mkdir, so a flat archive's folder gets the umask's mode, not mkdtemp's 0700
    try:
        content.mkdir()
        try:
            _unpack(archive, content)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
            _fail(archive, f"is not a readable archive ({e})")
        inner = content / folder.name
        os.replace(inner if inner.is_dir() else content, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _ensure_folder(folder: Path, archive: Path, fetch: str) -> None:
    """``folder`` exists, extracted from ``archive`` if that is there, else EventDataNotFound saying what to get."""
    if folder.is_dir():
        return
    if archive.is_file():
        extract_archive(archive, folder)
        return
    raise EventDataNotFound(
        f"{folder} not found. {fetch} Put {archive.name} in {archive.parent}/ (it is extracted "
        f"there on first use) or extract it yourself so that {folder} exists."
    )


def find_nmnist(data_dir: Path | str) -> tuple[list[Sample], list[Sample]]:
    """The official N-MNIST split: ``NMNIST/Train/<digit>/*.bin`` and ``NMNIST/Test/<digit>/*.bin``."""
    root = Path(data_dir) / "NMNIST"
    fetch = "Fetch N-MNIST's Train.zip and Test.zip (https://www.garrickorchard.com/datasets/n-mnist)."
    splits = []
    for split in ("Train", "Test"):
        _ensure_folder(root / split, root / f"{split}.zip", fetch)
        samples = [
            Sample("nmnist", root, f"{split}/{d}/{f.name}", 0, d)
            for d in range(10)
            for f in sorted((root / split / str(d)).glob("*.bin"))
        ]
        if not samples:
            raise EventDataNotFound(f"no {root / split}/<digit>/*.bin files. {fetch}")
        splits.append(samples)
    return splits[0], splits[1]


def find_dvs_gesture(data_dir: Path | str) -> tuple[list[Sample], list[Sample]]:
    """The official DVS Gesture split: the recordings that ``DVSGesture/DvsGesture/trials_to_train.txt`` and
    ``trials_to_test.txt`` list, each cut into one sample per row of its ``_labels.csv``."""
    base = Path(data_dir) / "DVSGesture"
    root = base / "DvsGesture"
    fetch = "Fetch DvsGesture.tar.gz (IBM's DVS128 Gesture, https://research.ibm.com/interactive/dvsgesture/)."
    _ensure_folder(root, base / "DvsGesture.tar.gz", fetch)
    splits = []
    for split in ("train", "test"):
        listing = root / f"trials_to_{split}.txt"
        if not listing.is_file():
            raise EventDataNotFound(f"{listing} not found. {fetch}")
        samples = []
        for name in (line.strip() for line in listing.read_text().splitlines()):
            if not name:
                continue
            aedat = root / name
            if not aedat.is_file() or not gesture_labels_path(aedat).is_file():
                raise EventDataNotFound(f"{aedat} or its _labels.csv (listed in {listing}) not found. {fetch}")
            rows = read_gesture_labels(gesture_labels_path(aedat))
            samples += [Sample("dvs_gesture", root, name, i, label) for i, (label, _, _) in enumerate(rows)]
        splits.append(samples)
    return splits[0], splits[1]


def find_cifar10_dvs(data_dir: Path | str) -> list[Sample]:
    """Every CIFAR10-DVS recording, ``CIFAR10DVS/<class>/cifar10_<class>_<i>.aedat``, by class then numeric i."""
    root = Path(data_dir) / "CIFAR10DVS"
    fetch = (
        "Fetch CIFAR10-DVS's per-class archives airplane.zip ... truck.zip "
        "(https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671)."
    )
    samples = []
    for label, name in enumerate(CIFAR10_DVS_CLASSES):
        _ensure_folder(root / name, root / f"{name}.zip", fetch)
        found = [
            (int(m.group(1)), f.name)
            for f in (root / name).iterdir()
            if (m := re.fullmatch(rf"cifar10_{name}_(\d+)\.aedat", f.name))
        ]
        if not found:
            raise EventDataNotFound(f"no cifar10_{name}_<i>.aedat files in {root / name}. {fetch}")
        samples += [Sample("cifar10_dvs", root, f"{name}/{f}", 0, label) for _, f in sorted(found)]
    return samples


def event_splits(name: str, data_dir: Path | str, cifar_test: str = "last100") -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples of an event data set: the official split, or :func:`cifar10_dvs_split`'s."""
    if name == "nmnist":
        return find_nmnist(data_dir)
    if name == "dvs_gesture":
        return find_dvs_gesture(data_dir)
    if name == "cifar10_dvs":
        return cifar10_dvs_split(find_cifar10_dvs(data_dir), cifar_test)
    raise ValueError(f"unknown event data set {name!r}; known: {sorted(SENSORS)}")
