"""Event-camera data sets: readers of the official files, frames, a frame cache, splits and layouts.

    NMNIST/{Train,Test}/<digit>/<id>.bin                                              nmnist
    DVSGesture/DvsGesture/userNN_<lighting>.aedat, _labels.csv, trials_to_{train,test}.txt   dvs_gesture
    CIFAR10DVS/<class>/cifar10_<class>_<i>.aedat                                      cifar10_dvs

Events are structured numpy arrays of :data:`EVENT_DTYPE`: t (int64 microseconds), x, y (int16, 0 at the left and
the top), p (int8, 1 = ON, 0 = OFF). Readers check what they read and raise :class:`EventFormatError` naming the
file; a layout that is missing raises :class:`EventDataNotFound` saying what to fetch and where to put it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NoReturn

import numpy as np
import torch

__all__ = [
    "CIFAR10_DVS_CLASSES",
    "EVENT_DTYPE",
    "FORMAT_VERSION",
    "SENSORS",
    "EventDataNotFound",
    "EventFormatError",
    "Sample",
    "cache_key",
    "cache_path",
    "cached_frames",
    "cifar10_dvs_split",
    "event_splits",
    "events_to_frames",
    "extract_archive",
    "find_cifar10_dvs",
    "find_dvs_gesture",
    "find_nmnist",
    "gesture_labels_path",
    "integrate_samples",
    "read_aedat31",
    "read_cifar10_dvs",
    "read_dvs_gesture",
    "read_gesture_labels",
    "read_nmnist",
    "sample_events",
    "split_hash",
]

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "i1")])
# Part of every cache key: bump it whenever a reader or the integration changes what frames hold.
FORMAT_VERSION = 1
SENSORS = {"nmnist": (34, 34), "dvs_gesture": (128, 128), "cifar10_dvs": (128, 128)}  # (height, width)
CIFAR10_DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GESTURE_CLASSES = 11
FRAME_SETTINGS = ("dataset", "T", "split", "size")
_INT16_MAX = np.iinfo(np.int16).max


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


# Frames


def _target_hw(size: int | Sequence[int] | None, sensor_hw: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return tuple(sensor_hw)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if not (0 < h <= sensor_hw[0] and 0 < w <= sensor_hw[1]):
        raise ValueError(f"frame size {size} must be positive and at most the sensor's {sensor_hw}")
    return h, w


def events_to_frames(
    events: np.ndarray,
    sensor_hw: tuple[int, int],
    T: int,
    split: str = "count",
    size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Events integrated into ``T`` frames: an int16 tensor ``[T, 2, h, w]`` of event counts (channel 0 = OFF,
    1 = ON; a count past 32767 saturates).

    ``split='count'``: event i (in file order) goes to frame i * T // n, so frames hold equal numbers of events.
    ``split='time'``: frame (t - t_first) * T // (t_last - t_first + 1), equal spans of time. ``size`` (h, w or one
    int for both) downscales by summing every sensor pixel into target pixel (y * h // H, x * w // W), so the
    counts are kept.
    """
    if T < 1 or split not in ("count", "time"):
        raise ValueError(f"T must be >= 1 and split 'count' or 'time' (got T={T}, split={split!r})")
    height, width = sensor_hw
    h, w = _target_hw(size, sensor_hw)
    x, y, p = (events[k].astype(np.int64) for k in ("x", "y", "p"))
    if ((x < 0) | (x >= width) | (y < 0) | (y >= height) | (p < 0) | (p > 1)).any():
        raise ValueError(f"events lie outside the {width}x{height} sensor or have a polarity other than 0/1")
    n = len(events)
    if split == "count":
        slot = np.arange(n, dtype=np.int64) * T // max(n, 1)
    else:
        t = events["t"].astype(np.int64)
        t0 = t.min() if n else 0
        slot = (t - t0) * T // ((t.max() - t0 + 1) if n else 1)
    flat = ((slot * 2 + p) * h + y * h // height) * w + x * w // width
    counts = np.bincount(flat, minlength=T * 2 * h * w)
    return torch.from_numpy(np.minimum(counts, _INT16_MAX).astype(np.int16).reshape(T, 2, h, w))


def _frame_settings(samples: Sequence[Sample], settings: Mapping[str, object]) -> dict[str, object]:
    """The settings, checked: exactly the ones that change frames (an unknown one could change them unhashed)."""
    unknown = set(settings) - set(FRAME_SETTINGS)
    missing = {"dataset", "T"} - set(settings)
    if unknown or missing:
        raise ValueError(f"frame settings are {FRAME_SETTINGS}: unknown {sorted(unknown)}, missing {sorted(missing)}")
    out = {"dataset": settings["dataset"], "T": int(settings["T"]), "split": settings.get("split", "count")}
    size = settings.get("size")
    out["size"] = None if size is None else [size, size] if isinstance(size, int) else [int(v) for v in size]
    if out["dataset"] not in SENSORS:
        raise ValueError(f"unknown event data set {out['dataset']!r}; known: {sorted(SENSORS)}")
    others = {s.dataset for s in samples} - {out["dataset"]}
    if others:
        raise ValueError(f"settings name {out['dataset']!r} but samples come from {sorted(others)}")
    return out


def integrate_samples(samples: Sequence[Sample], settings: Mapping[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[N, T, 2, h, w]`` (int16 counts, see :func:`events_to_frames`) and int64 labels ``[N]``."""
    cfg = _frame_settings(samples, settings)
    hw = SENSORS[cfg["dataset"]]
    h, w = _target_hw(cfg["size"], hw)
    frames = torch.zeros((len(samples), cfg["T"], 2, h, w), dtype=torch.int16)
    for i, (_, events) in enumerate(sample_events(samples)):
        frames[i] = events_to_frames(events, hw, cfg["T"], cfg["split"], cfg["size"])
    return frames, torch.tensor([s.label for s in samples], dtype=torch.int64)


# The frame cache


def _source_files(s: Sample) -> list[Path]:
    return [s.path, gesture_labels_path(s.path)] if s.dataset == "dvs_gesture" else [s.path]


def cache_key(samples: Sequence[Sample], settings: Mapping[str, object]) -> str:
    """sha256 (hex) of what the frames depend on: FORMAT_VERSION, the frame settings, the samples in order (path,
    index, label) and every source file's path, size and mtime (ns), so a touched file is never read stale."""
    cfg = _frame_settings(samples, settings)
    files = sorted({str(p.resolve()) for s in samples for p in _source_files(s)})
    stats = [[f, st.st_size, st.st_mtime_ns] for f in files for st in [os.stat(f)]]
    payload = {
        "format": FORMAT_VERSION,
        "settings": cfg,
        "samples": [[str(s.path.resolve()), s.index, s.label] for s in samples],
        "files": stats,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _save_atomic(path: Path, obj: object) -> None:
    """torch.save to a temporary file beside ``path``, then os.replace: readers see the old file or the whole new
    one, and a failure leaves nothing behind (ranks writing the same key at once write the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (frames, labels), or None when the file is unreadable or holds another key."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is rebuilt, not fatal
        return None
    if not isinstance(obj, dict) or obj.get("key") != key:
        return None
    return obj["frames"], obj["labels"]


def _cache_file(cache_root: Path | str, settings: Mapping[str, object], key: str) -> Path:
    return Path(cache_root) / f"{settings['dataset']}-T{int(settings['T'])}-{key[:24]}.pt"


def cache_path(samples: Sequence[Sample], settings: Mapping[str, object], cache_root: Path | str) -> Path:
    """Where :func:`cached_frames` keeps these frames (a name with the data set, T and the key's first digits)."""
    return _cache_file(cache_root, settings, cache_key(samples, settings))


def cached_frames(
    samples: Sequence[Sample], settings: Mapping[str, object], cache_root: Path | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`integrate_samples` through a cache file in ``cache_root`` named by :func:`cache_key`: read when it
    matches, else integrated and written atomically. Settings: dataset, T, split ('count'), size (None)."""
    key = cache_key(samples, settings)
    path = _cache_file(cache_root, settings, key)
    if path.is_file() and (cached := _load_cache(path, key)) is not None:
        return cached
    frames, labels = integrate_samples(samples, settings)
    _save_atomic(path, {"key": key, "frames": frames, "labels": labels})
    return frames, labels


# Splits


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
