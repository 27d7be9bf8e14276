"""Small event data sets written bit for bit in each official format and layout, straight from the formats'
descriptions (one event at a time with struct and shifts), for the readers and for training runs on them.

- N-MNIST ``.bin``: 5-byte records x, y, p<<7 | ts[22:16], ts[15:8], ts[7:0] (Orchard et al. 2015, readme).
- DVS128 Gesture ``.aedat``: AEDAT 3.1, a '#' text header up to '#!END-HEADER\\r\\n', then packets of a 28-byte
  little-endian header and 8-byte polarity events (valid | p<<1 | y<<2 | x<<17, then the low 31 timestamp bits; the
  bits above go in the packet's eventTSOverflow), plus a labels CSV per recording.
- CIFAR10-DVS ``.aedat``: AEDAT 2.0, a '#' text header, then big-endian (address, timestamp) uint32 pairs with the
  DVS128 address p | x<<1 | y_sensor<<8, where the sensor counts y from the bottom (y_sensor = 127 - y).

Every class fires mostly in its own cell of a 4x4 grid over the sensor, so frames carry the class and a network
can learn it. The builders return what each sample must read back as: {sample id: (events, label)}.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

EVENTS = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1")])
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GESTURE_LIGHTINGS = ("fluorescent", "fluorescent_led", "lab", "led", "natural")


def class_events(label: int, hw: tuple[int, int], n: int, t0: int, duration: int, seed: int) -> np.ndarray:
    """``n`` events in time order over [t0, t0 + duration): 90% in the class's grid cell, the rest anywhere."""
    rng = np.random.default_rng(seed)
    height, width = hw
    ch, cw = height // 4, width // 4
    row, col = divmod(label % 16, 4)
    ev = np.zeros(n, EVENTS)
    ev["t"] = np.sort(rng.integers(t0, t0 + duration, n))
    ev["x"] = col * cw + rng.integers(0, cw, n)
    ev["y"] = row * ch + rng.integers(0, ch, n)
    noise = rng.random(n) < 0.1
    ev["x"][noise] = rng.integers(0, width, noise.sum())
    ev["y"][noise] = rng.integers(0, height, noise.sum())
    ev["p"] = rng.integers(0, 2, n)
    return ev


# The formats


def nmnist_bytes(events: np.ndarray) -> bytes:
    out = bytearray()
    for t, x, y, p in events.tolist():
        assert 0 <= t < 1 << 23 and 0 <= x < 256 and 0 <= y < 256 and p in (0, 1)
        out += bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])
    return bytes(out)


AEDAT31_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"


def aedat31_packet(event_type: int, events: list[bytes], overflow: int, valid: int) -> bytes:
    size = len(events[0]) if events else 8
    head = struct.pack("<hhiiiiii", event_type, 1, size, 4, overflow, len(events), len(events), valid)
    return head + b"".join(events)


def polarity_event(t: int, x: int, y: int, p: int, valid: bool = True) -> bytes:
    return struct.pack("<II", int(valid) | p << 1 | y << 2 | x << 17, t & 0x7FFFFFFF)


def aedat31_bytes(events: np.ndarray, per_packet: int = 64) -> bytes:
    """Polarity packets of at most ``per_packet`` events (a new one where the timestamp overflow changes), each
    with one invalid event at a bogus address, and a special-event packet (type 0) before each: both skipped."""
    out = [AEDAT31_HEADER]
    rows = events.tolist()
    i = 0
    while i < len(rows):
        overflow = rows[i][0] >> 31
        chunk = []
        while i < len(rows) and len(chunk) < per_packet and rows[i][0] >> 31 == overflow:
            chunk.append(rows[i])
            i += 1
        special = struct.pack("<II", 1 | 5 << 1, chunk[0][0] & 0x7FFFFFFF)
        out.append(aedat31_packet(0, [special], overflow, 1))
        body = [polarity_event(t, x, y, p) for t, x, y, p in chunk]
        body.insert(len(body) // 2, polarity_event(chunk[0][0], 30000, 30000, 1, valid=False))
        out.append(aedat31_packet(1, body, overflow, len(chunk)))
    return b"".join(out)


AEDAT2_HEADER = (
    b"#!AER-DAT2.0\r\n"
    b"# This is a raw AE data file - do not edit\r\n"
    b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
    b"# Timestamps tick is 1 us\r\n"
)


def aedat2_bytes(events: np.ndarray, external_at: int | None = 0) -> bytes:
    """The records, with an external event (address bit 15) before event ``external_at``: it must be skipped."""
    records = [struct.pack(">II", p | x << 1 | (127 - y) << 8, t) for t, x, y, p in events.tolist()]
    if external_at is not None:
        records.insert(external_at, struct.pack(">II", 1 << 15 | 3, 0))
    return AEDAT2_HEADER + b"".join(records)


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


def write_gesture_labels(path: Path, rows: list[tuple[int, int, int]]) -> None:
    path.write_text("class,startTime_usec,endTime_usec\n" + "".join(f"{c},{s},{e}\n" for c, s, e in rows))


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
    for label, name in enumerate(CIFAR_CLASSES):
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
