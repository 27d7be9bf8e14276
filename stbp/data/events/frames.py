"""Events integrated into frames, and the on-disk cache of a sample list's frames."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .readers import SENSORS, Sample, gesture_labels_path, sample_events

# Part of every cache key: bump it whenever a reader or the integration changes what frames hold.
FORMAT_VERSION = 1
FRAME_SETTINGS = ("dataset", "T", "split", "size")
_INT16_MAX = np.iinfo(np.int16).max


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
