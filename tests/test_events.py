"""stbp.data.events on small files written in each official format (stbp.data.events.writers, in the layouts of
tests/_event_files.py): the readers event for event, the files they must refuse, frames, the frame cache, split hashes,
the CIFAR10-DVS splits, layouts and archives."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stbp.data import events as ev
from stbp.data.events import writers
from tests import _event_files as files

READERS = {"nmnist": ev.read_nmnist, "dvs_gesture": ev.read_aedat31, "cifar10_dvs": ev.read_cifar10_dvs}
FORMATS = {"nmnist": "nmnist", "dvs_gesture": "aedat31", "cifar10_dvs": "aedat2"}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("events")
    expected = {
        "nmnist": files.make_nmnist(root),
        "dvs_gesture": files.make_dvs_gesture(root),
        "cifar10_dvs": files.make_cifar10_dvs(root),
    }
    return root, expected


@pytest.fixture
def data_dir(written, tmp_path) -> Path:
    """A private copy, for tests that damage or touch files."""
    shutil.copytree(written[0], tmp_path / "data")
    return tmp_path / "data"


def all_samples(name: str, data_dir: Path) -> list[ev.Sample]:
    train, test = ev.event_splits(name, data_dir, cifar_test="last1")
    return train + test


def assert_same_events(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == ev.EVENT_DTYPE and len(got) == len(want)
    for field in ("t", "x", "y", "p"):
        np.testing.assert_array_equal(got[field], want[field], err_msg=field)


# Readers


@pytest.mark.parametrize("name", ["nmnist", "dvs_gesture", "cifar10_dvs"])
def test_readers_agree_with_the_writers_event_for_event(written, name):
    data_dir, expected = written
    samples = all_samples(name, data_dir)
    assert sorted(s.id for s in samples) == sorted(expected[name])
    for sample, events in ev.sample_events(samples):
        want, label = expected[name][sample.id]
        assert sample.label == label
        assert_same_events(events, want)


def test_the_official_splits(written):
    data_dir, _ = written
    train, test = ev.find_nmnist(data_dir)
    assert (len(train), len(test)) == (30, 20) and all(s.rel.startswith("Train/") for s in train)
    assert {s.label for s in test} == set(range(10))
    train, test = ev.find_dvs_gesture(data_dir)
    assert (len(train), len(test)) == (22, 11) and {s.rel for s in test} == {"user03_led.aedat"}
    assert [s.label for s in test] == list(range(11))


def test_gesture_timestamps_cross_the_overflow_and_gestures_exclude_the_gaps(written):
    data_dir, _ = written
    path = data_dir / "DVSGesture/DvsGesture/user01_fluorescent_led.aedat"
    whole = ev.read_aedat31(path)
    assert whole["t"].min() < 2**31 <= whole["t"].max()
    cut = ev.read_dvs_gesture(path)
    assert [label for _, label in cut] == list(range(11))
    assert sum(len(e) for e, _ in cut) == len(whole) - 11 * 20  # the events between gestures belong to none


DAMAGES = [
    (name, damage)
    for name in ("nmnist", "dvs_gesture", "cifar10_dvs")
    for damage in ("bad_header", "truncated", "off_sensor")
    if (name, damage) != ("nmnist", "bad_header")  # N-MNIST files have no header
]


@pytest.mark.parametrize("name, damage", DAMAGES)
def test_malformed_files_are_refused_by_name_and_leave_no_cache(data_dir, tmp_path, name, damage):
    samples = all_samples(name, data_dir)
    path = samples[1].path
    if damage == "bad_header":
        files.bad_header(path)
    elif damage == "truncated":
        files.truncate(path, 3)
    else:
        files.append_off_sensor(path, FORMATS[name])
    with pytest.raises(ev.EventFormatError, match=str(path)) as err:
        READERS[name](path)
    assert {"bad_header": "header", "truncated": "truncated", "off_sensor": "outside"}[damage] in str(err.value)
    cache = tmp_path / "cache"
    with pytest.raises(ev.EventFormatError, match=str(path)):
        ev.cached_frames(samples, {"dataset": name, "T": 4}, cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_whole_missing_packet_body_and_a_missing_end_of_header_are_refused(data_dir):
    path = all_samples("dvs_gesture", data_dir)[0].path
    data = path.read_bytes()
    path.write_bytes(data[: len(writers.AEDAT31_HEADER) + 28 + 8 + 28 + 4])  # second packet's header, then 4 bytes
    with pytest.raises(ev.EventFormatError, match="truncated packet at"):
        ev.read_aedat31(path)
    path.write_bytes(data.replace(b"#!END-HEADER\r\n", b"#no end\r\n"))
    with pytest.raises(ev.EventFormatError, match="END-HEADER"):
        ev.read_aedat31(path)


@pytest.mark.parametrize(
    "text, what",
    [("cls,start,end\n1,0,10\n", "bad header"), ("class,startTime_usec,endTime_usec\n12,0,10\n", "class 12")],
)
def test_bad_gesture_labels_are_refused_by_name(tmp_path, text, what):
    path = tmp_path / "user01_lab_labels.csv"
    path.write_text(text)
    with pytest.raises(ev.EventFormatError, match=what) as err:
        ev.read_gesture_labels(path)
    assert str(path) in str(err.value)


# Frames


def make_events(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    out = np.zeros(len(rows), ev.EVENT_DTYPE)
    for i, (t, x, y, p) in enumerate(rows):
        out[i] = (t, x, y, p)
    return out


def test_count_and_time_splits_on_a_hand_computed_example():
    # Five events at t = 0, 1, 2, 3, 100 on a 2x2 sensor, T = 2.
    events = make_events([(0, 0, 0, 1), (1, 1, 0, 1), (2, 0, 1, 0), (3, 1, 1, 0), (100, 1, 1, 1)])
    count = ev.events_to_frames(events, (2, 2), 2, "count")
    # By count: event i goes to frame i * 2 // 5, so events 0-2 to frame 0, events 3-4 to frame 1.
    want = torch.zeros(2, 2, 2, 2, dtype=torch.int16)
    want[0, 1, 0, 0] = want[0, 1, 0, 1] = want[0, 0, 1, 0] = 1
    want[1, 0, 1, 1] = want[1, 1, 1, 1] = 1
    assert count.dtype == torch.int16 and torch.equal(count, want)
    # By time: span 101 us, frame (t * 2) // 101: t <= 50 to frame 0, so only the last event is in frame 1.
    time = ev.events_to_frames(events, (2, 2), 2, "time")
    want = torch.zeros(2, 2, 2, 2, dtype=torch.int16)
    want[0, 1, 0, 0] = want[0, 1, 0, 1] = want[0, 0, 1, 0] = want[0, 0, 1, 1] = 1
    want[1, 1, 1, 1] = 1
    assert torch.equal(time, want)


@pytest.mark.parametrize("split", ["count", "time"])
@pytest.mark.parametrize("size", [None, 64, 48, (32, 16)])
def test_frames_keep_every_event_per_polarity(written, split, size):
    data_dir, expected = written
    events, _ = expected["cifar10_dvs"]["airplane/cifar10_airplane_0.aedat#0"]
    frames = ev.events_to_frames(events, (128, 128), 5, split, size)
    h, w = (128, 128) if size is None else (size, size) if isinstance(size, int) else size
    assert frames.shape == (5, 2, h, w)
    for p in (0, 1):
        assert int(frames[:, p].sum()) == int((events["p"] == p).sum())


def test_downscale_maps_pixels_by_integer_area():
    events = make_events([(0, 127, 0, 1), (1, 126, 0, 1), (2, 0, 127, 0), (3, 2, 2, 0)])
    frames = ev.events_to_frames(events, (128, 128), 1, "count", 48)
    assert frames[0, 1, 0, 47] == 2  # x = 127 and 126 both map to 47 (x * 48 // 128)
    assert frames[0, 0, 47, 0] == 1 and frames[0, 0, 0, 0] == 1
    assert int(frames.sum()) == 4


def test_frames_refuse_bad_arguments():
    events = make_events([(0, 5, 0, 1)])
    for kwargs in ({"T": 0}, {"split": "rate"}, {"size": 200}):
        with pytest.raises(ValueError):
            ev.events_to_frames(events, (4, 4), **{"T": 2, **kwargs})
    empty = ev.events_to_frames(make_events([]), (4, 4), 3, "time")
    assert empty.shape == (3, 2, 4, 4) and int(empty.sum()) == 0


# The frame cache


def test_the_key_changes_with_every_setting_and_the_format_version(data_dir, monkeypatch):
    samples = all_samples("cifar10_dvs", data_dir)[:6]
    base = {"dataset": "cifar10_dvs", "T": 4, "split": "count", "size": None}
    keys = {ev.cache_key(samples, base)}
    for change in ({"T": 5}, {"split": "time"}, {"size": 64}, {"size": 48}):
        keys.add(ev.cache_key(samples, {**base, **change}))
    keys.add(ev.cache_key(samples[:5], base))
    keys.add(ev.cache_key(samples[::-1], base))
    monkeypatch.setattr(ev.frames, "FORMAT_VERSION", ev.FORMAT_VERSION + 1)  # where cache_key reads it
    keys.add(ev.cache_key(samples, base))
    assert len(keys) == 8
    nmnist = all_samples("nmnist", data_dir)[:6]
    assert ev.cache_key(nmnist, {**base, "dataset": "nmnist"}) not in keys
    with pytest.raises(ValueError, match="samples come from"):
        ev.cache_key(nmnist, base)
    with pytest.raises(ValueError, match="unknown"):
        ev.cache_key(samples, {**base, "crop": 8})


def test_the_key_changes_when_a_source_file_is_touched(data_dir):
    samples = all_samples("dvs_gesture", data_dir)[:3]
    settings = {"dataset": "dvs_gesture", "T": 4}
    key = ev.cache_key(samples, settings)
    csv = ev.gesture_labels_path(samples[0].path)
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = ev.cache_key(samples, settings)
    assert touched != key
    with open(csv, "a") as f:  # a size change alone, the mtime put back
        f.write("\n")
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert ev.cache_key(samples, settings) not in (key, touched)


def test_a_second_call_reads_the_cache(data_dir, tmp_path, monkeypatch):
    samples = all_samples("dvs_gesture", data_dir)
    settings = {"dataset": "dvs_gesture", "T": 3, "split": "time", "size": 32}
    frames, labels = ev.cached_frames(samples, settings, tmp_path / "cache")
    assert frames.shape == (33, 3, 2, 32, 32) and frames.dtype == torch.int16
    assert labels.dtype == torch.int64 and labels.tolist() == [s.label for s in samples]
    (path,) = (tmp_path / "cache").iterdir()
    assert path == ev.cache_path(samples, settings, tmp_path / "cache")
    mtime = path.stat().st_mtime_ns

    def no_integration(*args):
        raise AssertionError("integrated again instead of reading the cache")

    monkeypatch.setattr(ev.frames, "integrate_samples", no_integration)
    again, again_labels = ev.cached_frames(samples, settings, tmp_path / "cache")
    assert torch.equal(again, frames) and torch.equal(again_labels, labels)
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="integrated again"):
        ev.cached_frames(samples, {**settings, "T": 2}, tmp_path / "cache")
    path.touch()  # the cache file itself is no source: still read
    ev.cached_frames(samples, settings, tmp_path / "cache")
    os.utime(samples[0].path)
    with pytest.raises(AssertionError, match="integrated again"):
        ev.cached_frames(samples, settings, tmp_path / "cache")


def test_a_damaged_cache_is_rebuilt_and_a_failed_write_leaves_nothing(data_dir, tmp_path, monkeypatch):
    samples = all_samples("nmnist", data_dir)[:5]
    settings = {"dataset": "nmnist", "T": 2}
    frames, _ = ev.cached_frames(samples, settings, tmp_path / "cache")
    path = ev.cache_path(samples, settings, tmp_path / "cache")
    path.write_bytes(b"not a torch file")
    assert torch.equal(ev.cached_frames(samples, settings, tmp_path / "cache")[0], frames)
    path.unlink()

    def half_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        ev.cached_frames(samples, settings, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cached_frames_match_the_integration(written, tmp_path):
    data_dir, expected = written
    samples = all_samples("nmnist", data_dir)[:4]
    frames, _ = ev.cached_frames(samples, {"dataset": "nmnist", "T": 3, "size": 17}, tmp_path)
    for i, s in enumerate(samples):
        assert torch.equal(frames[i], ev.events_to_frames(expected["nmnist"][s.id][0], (34, 34), 3, "count", 17))


# Splits


def test_split_hash_is_stable_under_reordering_and_tells_splits_apart(written):
    train, test = ev.find_nmnist(written[0])
    h = ev.split_hash(train, test)
    assert len(h) == 12 and int(h, 16) >= 0
    assert ev.split_hash(train[::-1], test[::-1]) == h
    assert ev.split_hash([s.id for s in train], [s.id for s in test]) == h
    assert ev.split_hash(train[1:], test + train[:1]) != h
    assert ev.split_hash(test, train) != h
    moved = [ev.Sample(s.dataset, s.root, s.rel, s.index + (i == 0), s.label) for i, s in enumerate(train)]
    assert ev.split_hash(moved, test) != h


def cifar_names(per_class: int) -> list[ev.Sample]:
    rng = np.random.default_rng(0)
    return [
        ev.Sample("cifar10_dvs", Path("/d"), f"{c}/cifar10_{c}_{i}.aedat", 0, label)
        for label, c in enumerate(ev.CIFAR10_DVS_CLASSES)
        for i in rng.permutation(per_class)
    ]


@pytest.mark.parametrize("test, held", [("last100", range(900, 1000)), ("first100", range(100))])
def test_cifar10_dvs_both_splits(test, held):
    samples = cifar_names(1000)
    train, held_out = ev.cifar10_dvs_split(samples, test)
    assert (len(train), len(held_out)) == (9000, 1000)
    assert {s.id for s in train}.isdisjoint(s.id for s in held_out)
    index = lambda s: int(Path(s.rel).stem.rsplit("_", 1)[1])
    for label in range(10):
        assert sorted(index(s) for s in held_out if s.label == label) == list(held)
    assert ev.cifar10_dvs_split(samples) == ev.cifar10_dvs_split(samples, "last100")
    with pytest.raises(ValueError):
        ev.cifar10_dvs_split(samples, "middle100")
    with pytest.raises(ValueError, match="cannot hold out"):
        ev.cifar10_dvs_split(cifar_names(100))


def test_cifar10_dvs_files_sort_by_number(written):
    samples = ev.find_cifar10_dvs(written[0])
    assert [s.rel for s in samples[:4]] == [f"airplane/cifar10_airplane_{i}.aedat" for i in range(4)]
    train, test = ev.cifar10_dvs_split(samples, "first1")
    assert [s.rel for s in test[:2]] == ["airplane/cifar10_airplane_0.aedat", "automobile/cifar10_automobile_0.aedat"]


# Layouts and archives


def test_official_archives_are_extracted_in_place(written, tmp_path):
    src, expected = written[0], written[1]
    data = tmp_path / "data"
    (data / "NMNIST").mkdir(parents=True)
    for split in ("Train", "Test"):
        files.zip_folder(src / "NMNIST" / split, data / "NMNIST" / f"{split}.zip", top=split)
    (data / "DVSGesture").mkdir()
    files.tar_folder(src / "DVSGesture" / "DvsGesture", data / "DVSGesture" / "DvsGesture.tar.gz")
    (data / "CIFAR10DVS").mkdir()
    for i, c in enumerate(ev.CIFAR10_DVS_CLASSES):  # half the archives hold the class folder, half their files alone
        files.zip_folder(src / "CIFAR10DVS" / c, data / "CIFAR10DVS" / f"{c}.zip", top=c if i % 2 else None)
    for name in ("nmnist", "dvs_gesture", "cifar10_dvs"):
        samples = all_samples(name, data)
        assert sorted(s.id for s in samples) == sorted(expected[name])
        for sample, events in ev.sample_events(samples[:3]):
            assert_same_events(events, expected[name][sample.id][0])
    assert not list(data.rglob(".extract-*"))
    (data / "fresh").mkdir()  # a flat archive's folder gets an ordinary folder's mode, not a temporary one's
    assert (data / "CIFAR10DVS" / "airplane").stat().st_mode == (data / "fresh").stat().st_mode


def test_a_damaged_archive_is_refused_by_name(tmp_path):
    (tmp_path / "NMNIST").mkdir()
    (tmp_path / "NMNIST" / "Train.zip").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ev.EventFormatError, match="Train.zip.*not a readable archive"):
        ev.find_nmnist(tmp_path)
    assert sorted(p.name for p in (tmp_path / "NMNIST").iterdir()) == ["Train.zip"]


@pytest.mark.parametrize("member", ["../escaped.bin", "/tmp/escaped.bin", "Train/../../escaped.bin"])
def test_unsafe_archive_members_are_refused(tmp_path, member):
    (tmp_path / "NMNIST").mkdir()
    files.unsafe_zip(tmp_path / "NMNIST" / "Train.zip", member)
    with pytest.raises(ev.EventFormatError, match="unsafe member") as err:
        ev.find_nmnist(tmp_path)
    assert "Train.zip" in str(err.value)
    assert not (tmp_path / "NMNIST" / "Train").exists() and not list(tmp_path.rglob("escaped.bin"))
    assert not list(tmp_path.rglob(".extract-*"))


def test_links_in_a_tar_are_refused(tmp_path):
    (tmp_path / "DVSGesture").mkdir()
    files.tar_with_link(tmp_path / "DVSGesture" / "DvsGesture.tar.gz")
    with pytest.raises(ev.EventFormatError, match="link"):
        ev.find_dvs_gesture(tmp_path)
    assert not (tmp_path / "DVSGesture" / "DvsGesture").exists()


@pytest.mark.parametrize(
    "name, fetch", [("nmnist", "Train.zip"), ("dvs_gesture", "DvsGesture.tar.gz"), ("cifar10_dvs", "airplane.zip")]
)
def test_a_missing_layout_says_what_to_fetch(tmp_path, name, fetch):
    with pytest.raises(ev.EventDataNotFound, match=fetch) as err:
        ev.event_splits(name, tmp_path)
    assert isinstance(err.value, FileNotFoundError) and str(tmp_path) in str(err.value)


def test_a_trial_list_naming_a_missing_recording(data_dir):
    (data_dir / "DVSGesture/DvsGesture/user03_led.aedat").unlink()
    with pytest.raises(ev.EventDataNotFound, match="user03_led.aedat"):
        ev.find_dvs_gesture(data_dir)
