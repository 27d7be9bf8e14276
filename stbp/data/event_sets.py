"""The event-camera data sets (:mod:`stbp.data.events`) as training tensors: each official split integrated into frames
``[N, T, 2, H, W]`` once, kept in the frame cache under ``<data_dir>/<folder>/frames/``, with the hash that names the
split. The frame settings are checked against the data set here, before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from .catalog import DATASETS, DatasetSpec
from .events import SENSORS, cached_frames, event_splits, split_hash

__all__ = ["FrameSettings", "FRAME_FIELDS", "check_frames", "load_event_tensors"]

#: The config fields (data section) that only event data sets read.
FRAME_FIELDS = ("frame_split", "frame_size", "dvs_test_split")


@dataclass(frozen=True)
class FrameSettings:
    """How an event data set becomes frames: ``timesteps`` frames a sample (the model's T), cut by event ``split``
    ('count' or 'time'), ``size`` pixels a side (None: the sensor's), and CIFAR10-DVS's ``test_split``."""

    timesteps: int
    split: str = "count"
    size: int | None = None
    test_split: str = "last100"

    @classmethod
    def of(cls, cfg: Any) -> FrameSettings:
        """The settings a training config (:class:`stbp.config.Config`) names."""
        data = cfg.data
        return cls(cfg.model.timesteps, data.frame_split, data.frame_size, data.dvs_test_split)

    def cache_settings(self, dataset: str) -> dict[str, Any]:
        """What :func:`stbp.data.events.cached_frames` takes (and keys its cache by)."""
        return {"dataset": dataset, "T": self.timesteps, "split": self.split, "size": self.size}


def check_frames(dataset: str, frames: FrameSettings | None) -> None:
    """Refuse frame settings that the data set would not read or could not make (ConfigError naming the key)."""
    if frames is None:
        if DATASETS[dataset].events:
            raise ValueError(f"{dataset} is event data: loading it needs its frame settings (frames=FrameSettings)")
        return
    if not DATASETS[dataset].events:
        given = {
            "frame_split": (frames.split, "count"),
            "frame_size": (frames.size, None),
            "dvs_test_split": (frames.test_split, "last100"),
        }
        for key, (value, default) in given.items():
            if value != default:
                raise ConfigError(
                    f"data.{key}: {value!r} is a setting of the event data sets ({', '.join(SENSORS)}), "
                    f"not of {dataset}; leave it at {default!r}"
                )
        return
    height, width = SENSORS[dataset]
    if frames.size is not None and frames.size > min(height, width):
        raise ConfigError(
            f"data.frame_size: {frames.size} is larger than {dataset}'s {width}x{height} sensor; "
            f"frames may be downscaled only (at most {min(height, width)}, or None)"
        )
    if frames.test_split != "last100" and dataset != "cifar10_dvs":
        raise ConfigError(
            f"data.dvs_test_split: {frames.test_split!r} is CIFAR10-DVS's choice of test set; {dataset} has an "
            "official split (leave it at 'last100')"
        )


def load_event_tensors(spec: DatasetSpec, root: Path, frames: FrameSettings) -> tuple[Tensor, ...]:
    """(train frames, train labels, test frames, test labels, split hash) of the official split under ``root``,
    the frames int16 event counts ``[N, T, 2, H, W]`` read from the cache, or integrated and cached first."""
    check_frames(spec.name, frames)
    train, test = event_splits(spec.name, root, frames.test_split)
    settings = frames.cache_settings(spec.name)
    cache = root / spec.folder / "frames"
    train_frames, train_labels = cached_frames(train, settings, cache)
    test_frames, test_labels = cached_frames(test, settings, cache)
    return train_frames, train_labels, test_frames, test_labels, split_hash(train, test)
