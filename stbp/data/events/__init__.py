"""Event-camera data sets: readers of the official files (:mod:`.readers`), frames and their cache (:mod:`.frames`),
layouts and splits (:mod:`.layout`); writers of the official formats (:mod:`.writers`, imported by name: tests,
benchmarks and demonstration sets write files in them).

    NMNIST/{Train,Test}/<digit>/<id>.bin                                              nmnist
    DVSGesture/DvsGesture/userNN_<lighting>.aedat, _labels.csv, trials_to_{train,test}.txt   dvs_gesture
    CIFAR10DVS/<class>/cifar10_<class>_<i>.aedat                                      cifar10_dvs

Events are structured numpy arrays of :data:`EVENT_DTYPE`: t (int64 microseconds), x, y (int16, 0 at the left and
the top), p (int8, 1 = ON, 0 = OFF). Readers check what they read and raise :class:`EventFormatError` naming the
file; a layout that is missing raises :class:`EventDataNotFound` saying what to fetch and where to put it.
"""

from .frames import FORMAT_VERSION, cache_key, cache_path, cached_frames, events_to_frames, integrate_samples
from .layout import (
    cifar10_dvs_split,
    event_splits,
    extract_archive,
    find_cifar10_dvs,
    find_dvs_gesture,
    find_nmnist,
    split_hash,
)
from .readers import (
    CIFAR10_DVS_CLASSES,
    EVENT_DTYPE,
    SENSORS,
    EventDataNotFound,
    EventFormatError,
    Sample,
    gesture_labels_path,
    read_aedat31,
    read_cifar10_dvs,
    read_dvs_gesture,
    read_gesture_labels,
    read_nmnist,
    sample_events,
)

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
