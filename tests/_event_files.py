"""Small event data sets in each official layout, written in the official formats by
:mod:`stbp.data.events.writers`, for the readers and for training runs on them; and damaged files and archives for
the readers to refuse.

Every class fires mostly in its own cell of a 4x4 grid over the sensor (:func:`~stbp.data.events.writers.class_events`),
so frames carry the class and a network can learn it. The builders return what each sample must read back as:
{sample id: (events, label)}.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from stbp.data.events.readers import CIFAR10_DVS_CLASSES
from stbp.data.events.writers import (
    aedat2_bytes,
    aedat31_bytes,
    aedat31_packet,
    class_events,
    nmnist_bytes,
    polarity_event,
    write_gesture_labels,
)

GESTURE_LIGHTINGS = ("fluorescent", "fluorescent_led", "lab", "led", "natural")


# The layouts


def make_nmnist(data_dir: Path, train: int = 3, test: int = 2, n: int = 200) -> dict[str, tuple[np.ndarray, int]]:
    """``NMNIST/{Train,Test}/<digit>/<id>.bin``, ``train``/``test`` files per digit."""
    expected = {}
    for split, count in (("Train", train), ("Test", test)):
        for digit in range(10):
            for k in range(count):
                rel = f"{split}/{digit}/{k * 10 + digit + 1:05d}.bin"
                ev = class_events(digit, (34, 34), n, 0, 300_000, seed=zlib.crc32(rel.encode()))
                path = data_dir / "NMNIST" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(nmnist_bytes(ev))
                expected[f"{rel}#0"] = (ev, digit)
    return expected


def gesture_recording(seed: int, n: int = 150) -> tuple[np.ndarray, list[tuple[int, int, int]], list[np.ndarray]]:
    """All 11 gestures in turn, with events between them that no gesture owns; the clock starts just below 2**31
    so the recording crosses a timestamp overflow. Returns (all events, CSV rows, each gesture's events)."""
    t, all_events, rows, owned = 2**31 - 400_000, [], [], []
    for label in range(11):
        gap = class_events(15, (128, 128), 20, t, 30_000, seed + 100 + label)  # owned by no gesture
        gap["t"][0] = t  # at the previous gesture's end, which [start, end) leaves out
        all_events.append(gap)
        start = t + 30_000
        ev = class_events(label, (128, 128), n, start, 60_000, seed + label)
        ev["t"][0] = start
        all_events.append(ev)
        owned.append(ev)
        rows.append((label + 1, start, start + 60_000))
        t = start + 60_000
    return np.concatenate(all_events), rows, owned


def make_dvs_gesture(
    data_dir: Path, train_users: int = 2, test_users: int = 1, n: int = 150
) -> dict[str, tuple[np.ndarray, int]]:
    """``DVSGesture/DvsGesture/userNN_<lighting>.aedat`` + ``_labels.csv``, and the two trial lists."""
    root = data_dir / "DVSGesture" / "DvsGesture"
    root.mkdir(parents=True, exist_ok=True)
    expected, lists = {}, {"train": [], "test": []}
    for user in range(1, train_users + test_users + 1):
        name = f"user{user:02d}_{GESTURE_LIGHTINGS[user % len(GESTURE_LIGHTINGS)]}"
        events, rows, owned = gesture_recording(seed=user * 1000, n=n)
        (root / f"{name}.aedat").write_bytes(aedat31_bytes(events))
        write_gesture_labels(root / f"{name}_labels.csv", rows)
        lists["train" if user <= train_users else "test"].append(f"{name}.aedat")
        for i, ev in enumerate(owned):
            expected[f"{name}.aedat#{i}"] = (ev, i)
    for split, names in lists.items():
        (root / f"trials_to_{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return expected


def make_cifar10_dvs(data_dir: Path, per_class: int = 4, n: int = 200) -> dict[str, tuple[np.ndarray, int]]:
    """``CIFAR10DVS/<class>/cifar10_<class>_<i>.aedat``, ``per_class`` recordings per class."""
    expected = {}
    for label, name in enumerate(CIFAR10_DVS_CLASSES):
        for i in range(per_class):
            rel = f"{name}/cifar10_{name}_{i}.aedat"
            ev = class_events(label, (128, 128), n, 5_000, 1_000_000, seed=label * 100 + i)
            path = data_dir / "CIFAR10DVS" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(aedat2_bytes(ev, external_at=i % (n + 1)))
            expected[f"{rel}#0"] = (ev, label)
    return expected


# Corrupters and archives


def bad_header(path: Path) -> None:
    """The first header line says another format version ('#!AER-DAT2.0' -> '#!AER-DAT9.0')."""
    data = path.read_bytes()
    assert data.startswith(b"#!AER-DAT")
    path.write_bytes(data[:9] + b"9" + data[10:])


def truncate(path: Path, nbytes: int = 3) -> None:
    path.write_bytes(path.read_bytes()[:-nbytes])


def append_off_sensor(path: Path, fmt: str) -> None:
    """One more event outside the sensor: x = 34 (N-MNIST), x = 200 (AEDAT 3.1), address bit 16 (AEDAT 2.0)."""
    data = path.read_bytes()
    if fmt == "nmnist":
        data += bytes([34, 3, 0x80, 0x00, 0x10])
    elif fmt == "aedat31":
        data += aedat31_packet(1, [polarity_event(2**31 + 5, 200, 3, 1)], 1, 1)
    else:
        data += struct.pack(">II", 1 << 16 | 4, 7)
    path.write_bytes(data)


def zip_folder(folder: Path, archive: Path, top: str | None) -> None:
    """Every file under ``folder`` into a zip, under ``top/`` (or at the archive's root when None)."""
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = f.relative_to(folder).as_posix()
            z.write(f, f"{top}/{rel}" if top else rel)


def tar_folder(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def unsafe_zip(archive: Path, member: str) -> None:
    """A zip whose second member is ``member`` (absolute or climbing out with '..'); the first is harmless."""
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("Train/0/00001.bin", b"")
        z.writestr(zipfile.ZipInfo(member), b"escaped")


def tar_with_link(archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("DvsGesture/trials_to_train.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
        data = b"user01_lab.aedat\n"
        info = tarfile.TarInfo("DvsGesture/readme.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
