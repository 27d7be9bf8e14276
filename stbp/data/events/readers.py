"""Readers of the official event files: N-MNIST ``.bin``, DVS128 Gesture AEDAT 3.1 (+ labels CSV) and CIFAR10-DVS
AEDAT 2.0, each checked as it is read (:class:`EventFormatError` names the file)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1")])
SENSORS = {"nmnist": (34, 34), "dvs_gesture": (128, 128), "cifar10_dvs": (128, 128)}  # (height, width)
CIFAR10_DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GESTURE_CLASSES = 11


class EventFormatError(ValueError):
    """An event file (or archive) is there but is not what its format says: bad header, truncated, off the sensor."""


class EventDataNotFound(FileNotFoundError):
    """An event data set's files are not in the expected layout under data_dir."""


@dataclass(frozen=True)
class Sample:
    """One sample: a file under the data set's ``root`` (``rel``, '/'-separated) and its place in that file
    (``index``: the labels CSV row for DVS Gesture, 0 for one-sample files), with its class (0-based)."""

    dataset: str
    root: Path
    rel: str
    index: int
    label: int

    @property
    def path(self) -> Path:
        return self.root / self.rel

    @property
    def id(self) -> str:
        return f"{self.rel}#{self.index}"


def _fail(path: Path | str, what: str) -> NoReturn:
    raise EventFormatError(f"{path}: {what}")


def _events(path: Path, t, x, y, p, sensor_hw: tuple[int, int]) -> np.ndarray:
    """The structured array, once every event is checked to lie on the sensor."""
    height, width = sensor_hw
    off = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        _fail(path, f"event {i} at (x={int(x[i])}, y={int(y[i])}) lies outside the {width}x{height} sensor")
    out = np.empty(len(t), EVENT_DTYPE)
    out["t"], out["x"], out["y"], out["p"] = t, x, y, p
    return out


# Readers of the official formats


def read_nmnist(path: Path | str) -> np.ndarray:
    """An N-MNIST ``.bin`` file (Orchard et al. 2015, the data set's readme): 5-byte records, no header.

    byte 0 = x, byte 1 = y (34x34 sensor), byte 2 bit 7 = polarity, byte 2 bits 0-6 + byte 3 + byte 4 = a 23-bit
    timestamp in microseconds, most significant first: ts = (b2 & 0x7F) << 16 | b3 << 8 | b4. Orchard's Matlab
    reader takes y = 240 as a timestamp-overflow marker; a ~0.3 s N-MNIST recording never needs one (23 bits cover
    8.4 s), so such a record is reported as off the sensor here.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        _fail(path, "is empty (no events)")
    if len(data) % 5:
        _fail(path, f"{len(data)} bytes is not a whole number of 5-byte events: the last record is truncated")
    rec = np.frombuffer(data, np.uint8).reshape(-1, 5).astype(np.int64)
    t = (rec[:, 2] & 0x7F) << 16 | rec[:, 3] << 8 | rec[:, 4]
    return _events(path, t, rec[:, 0], rec[:, 1], rec[:, 2] >> 7, SENSORS["nmnist"])


def _text_header(path: Path, data: bytes, first: bytes, end: bytes | None = None) -> int:
    """The byte offset just past an AEDAT text header: lines starting with '#', the first one ``first``; with
    ``end``, the header stops after that line (AEDAT 3), else at the first line not starting with '#' (AEDAT 2)."""
    pos = 0
    while data[pos : pos + 1] == b"#":
        nl = data.find(b"\n", pos)
        if nl < 0:
            _fail(path, "bad header: a header line has no end")
        line = data[pos : nl + 1].rstrip(b"\r\n")
        if pos == 0 and line != first:
            _fail(path, f"bad header: first line {line[:40]!r}, expected {first!r}")
        pos = nl + 1
        if end is not None and line == end:
            return pos
    if pos == 0:
        _fail(path, f"bad header: the file does not start with {first!r}")
    if end is not None:
        _fail(path, f"bad header: no {end!r} line")
    return pos


def _aedat31_polarity(path: Path, data: bytes, pos: int) -> list[tuple[np.ndarray, int]]:
    """The (words [n, 2], tsOverflow) of each polarity packet after ``pos``; other packets are skipped."""
    packets = []
    while pos < len(data):
        if len(data) - pos < 28:
            _fail(path, f"truncated packet header at byte {pos}: {len(data) - pos} of 28 bytes")
        etype, _source, size, ts_offset, overflow, _cap, number, _valid = struct.unpack_from("<hhiiiiii", data, pos)
        pos += 28
        if size <= 0 or number < 0 or overflow < 0:
            _fail(path, f"bad packet header before byte {pos}: eventSize {size}, eventNumber {number}")
        end = pos + size * number
        if end > len(data):
            _fail(path, f"truncated packet at byte {pos}: {number} events of {size} bytes, {len(data) - pos} left")
        if etype == 1:
            if size != 8 or ts_offset != 4:
                _fail(path, f"polarity packet at byte {pos} has eventSize {size}, eventTSOffset {ts_offset} (not 8, 4)")
            packets.append((np.frombuffer(data, "<u4", count=2 * number, offset=pos).reshape(-1, 2), overflow))
        pos = end
    return packets


def read_aedat31(path: Path | str) -> np.ndarray:
    """A DVS128 Gesture recording (Amir et al. 2017) in AEDAT 3.1 (inivation's AEDAT 3.1 format documentation).

    Text header: lines starting with '#', the first '#!AER-DAT3.1', the last '#!END-HEADER\\r\\n'. Then packets: a
    28-byte little-endian header (int16 eventType, int16 eventSource, int32 eventSize, eventTSOffset,
    eventTSOverflow, eventCapacity, eventNumber, eventValid) and eventNumber events of eventSize bytes. Polarity
    events (eventType 1, 8 bytes): uint32 data (bit 0 valid, bit 1 polarity, bits 2-16 y, bits 17-31 x) and int32
    timestamp; t = eventTSOverflow << 31 | timestamp. Other packets and invalid events are skipped. Sensor 128x128.
    """
    path = Path(path)
    data = path.read_bytes()
    pos = _text_header(path, data, b"#!AER-DAT3.1", b"#!END-HEADER")
    packets = _aedat31_polarity(path, data, pos)
    words = np.concatenate([w for w, _ in packets]) if packets else np.zeros((0, 2), np.uint32)
    over = np.concatenate([np.full(len(w), o, np.int64) for w, o in packets]) if packets else np.zeros(0, np.int64)
    d, ts = words[:, 0].astype(np.int64), words[:, 1].astype(np.int64)
    if (ts >> 31).any():
        _fail(path, "a polarity event has a negative int32 timestamp")
    keep = (d & 1) == 1
    d, t = d[keep], (over[keep] << 31) | ts[keep]
    return _events(path, t, (d >> 17) & 0x7FFF, (d >> 2) & 0x7FFF, (d >> 1) & 1, SENSORS["dvs_gesture"])


def read_gesture_labels(path: Path | str) -> list[tuple[int, int, int]]:
    """A DVS Gesture ``userNN_<lighting>_labels.csv``: header 'class,startTime_usec,endTime_usec', then one row
    per gesture; returns (label 0..10, start, end) with classes 1..11 shifted to 0..10."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].replace(" ", "") != "class,startTime_usec,endTime_usec":
        _fail(path, "bad header: expected 'class,startTime_usec,endTime_usec'")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            cls, start, end = (int(v) for v in line.split(","))
        except ValueError:
            _fail(path, f"line {n} is not three integers: {line[:60]!r}")
        if not 1 <= cls <= GESTURE_CLASSES or end <= start:
            _fail(path, f"line {n}: class {cls} not in 1..{GESTURE_CLASSES} or end {end} <= start {start}")
        rows.append((cls - 1, start, end))
    return rows


def gesture_labels_path(aedat: Path) -> Path:
    """``userNN_<lighting>.aedat`` -> ``userNN_<lighting>_labels.csv`` beside it."""
    return aedat.with_name(f"{aedat.stem}_labels.csv")


def read_dvs_gesture(path: Path | str) -> list[tuple[np.ndarray, int]]:
    """A DVS Gesture recording cut into its labelled gestures: (events with start <= t < end, label 0..10) for each
    row of the recording's labels CSV, in the CSV's order."""
    path = Path(path)
    events = read_aedat31(path)
    t = events["t"]
    return [
        (events[(t >= start) & (t < end)], label)
        for label, start, end in read_gesture_labels(gesture_labels_path(path))
    ]


def read_cifar10_dvs(path: Path | str) -> np.ndarray:
    """A CIFAR10-DVS recording (Li et al. 2017) in AEDAT 2.0 (jAER's AEDAT 2.0 format documentation).

    Text header: lines starting with '#', the first '#!AER-DAT2.0'. Then big-endian 8-byte records: uint32 address,
    uint32 timestamp (us). The DVS128 address: bit 0 polarity, bits 1-7 x, bits 8-14 y, bit 15 jAER's external
    (special) event flag, higher bits unused. External events are skipped; an address with higher bits set is off
    the sensor. The sensor's y counts from the bottom, so y = 127 - raw y puts 0 at the top as for the other sets;
    x is kept as recorded (orientation only changes how frames look, the same for every sample).
    """
    path = Path(path)
    data = path.read_bytes()
    body = data[_text_header(path, data, b"#!AER-DAT2.0") :]
    if len(body) % 8:
        _fail(path, f"{len(body)} bytes of events is not a whole number of 8-byte records: the last is truncated")
    rec = np.frombuffer(body, ">u4").reshape(-1, 2).astype(np.int64)
    addr, t = rec[:, 0], rec[:, 1]
    if (addr >> 16).any():
        i = int(np.flatnonzero(addr >> 16)[0])
        _fail(path, f"event {i} has address {addr[i]:#x}, outside the 128x128 sensor's 15-bit addresses")
    keep = (addr >> 15) == 0
    addr, t = addr[keep], t[keep]
    return _events(path, t, (addr >> 1) & 0x7F, 127 - ((addr >> 8) & 0x7F), addr & 1, SENSORS["cifar10_dvs"])


def sample_events(samples: Iterable[Sample]) -> Iterator[tuple[Sample, np.ndarray]]:
    """Each sample with its events; a file holding several samples (DVS Gesture) is read once per run of them."""
    last: tuple[Path, list[tuple[np.ndarray, int]]] | None = None
    for s in samples:
        if s.dataset == "nmnist":
            yield s, read_nmnist(s.path)
        elif s.dataset == "cifar10_dvs":
            yield s, read_cifar10_dvs(s.path)
        elif s.dataset == "dvs_gesture":
            if last is None or last[0] != s.path:
                last = (s.path, read_dvs_gesture(s.path))
            if s.index >= len(last[1]):
                _fail(gesture_labels_path(s.path), f"has no row {s.index} (it has {len(last[1])})")
            yield s, last[1][s.index][0]
        else:
            raise ValueError(f"unknown event data set {s.dataset!r}; known: {sorted(SENSORS)}")
