"""Writers of the official event file formats, bit for bit: what :mod:`.readers` reads, written straight from the
formats' descriptions (one event at a time, with struct and shifts), for files that must be right rather than fast:
test data, benchmark data, small demonstration sets.

- N-MNIST ``.bin``: 5-byte records x, y, p<<7 | ts[22:16], ts[15:8], ts[7:0] (Orchard et al. 2015, readme).
- DVS128 Gesture ``.aedat``: AEDAT 3.1, a '#' text header up to '#!END-HEADER\\r\\n', then packets of a 28-byte
  little-endian header and 8-byte polarity events (valid | p<<1 | y<<2 | x<<17, then the low 31 timestamp bits; the
  bits above go in the packet's eventTSOverflow), plus a labels CSV per recording.
- CIFAR10-DVS ``.aedat``: AEDAT 2.0, a '#' text header, then big-endian (address, timestamp) uint32 pairs with the
  DVS128 address p | x<<1 | y_sensor<<8, where the sensor counts y from the bottom (y_sensor = 127 - y).

The writers take events as :data:`~.readers.EVENT_DTYPE` arrays and return the file's bytes. :func:`class_events`
makes events to write in which each class fires mostly in its own cell of a 4x4 grid over the sensor, so that frames
of them carry the class and a network can learn it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .readers import EVENT_DTYPE

__all__ = [
    "AEDAT2_HEADER",
    "AEDAT31_HEADER",
    "aedat2_bytes",
    "aedat31_bytes",
    "aedat31_packet",
    "class_events",
    "nmnist_bytes",
    "polarity_event",
    "write_gesture_labels",
]


def class_events(label: int, hw: tuple[int, int], n: int, t0: int, duration: int, seed: int) -> np.ndarray:
    """``n`` events in time order over [t0, t0 + duration): 90% in the class's grid cell, the rest anywhere."""
    rng = np.random.default_rng(seed)
    height, width = hw
    ch, cw = height // 4, width // 4
    row, col = divmod(label % 16, 4)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["t"] = np.sort(rng.integers(t0, t0 + duration, n))
    ev["x"] = col * cw + rng.integers(0, cw, n)
    ev["y"] = row * ch + rng.integers(0, ch, n)
    noise = rng.random(n) < 0.1
    ev["x"][noise] = rng.integers(0, width, noise.sum())
    ev["y"][noise] = rng.integers(0, height, noise.sum())
    ev["p"] = rng.integers(0, 2, n)
    return ev


# N-MNIST


def nmnist_bytes(events: np.ndarray) -> bytes:
    """An N-MNIST ``.bin`` file: timestamps below 2**23 us, x and y below 256."""
    out = bytearray()
    for t, x, y, p in events.tolist():
        if not (0 <= t < 1 << 23 and 0 <= x < 256 and 0 <= y < 256 and p in (0, 1)):
            raise ValueError(f"an N-MNIST record cannot hold the event (t={t}, x={x}, y={y}, p={p})")
        out += bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])
    return bytes(out)


# AEDAT 3.1 (DVS128 Gesture)

AEDAT31_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"


def aedat31_packet(event_type: int, events: list[bytes], overflow: int, valid: int) -> bytes:
    """One packet: its 28-byte header (type, source 1, event size, timestamp offset 4, ``overflow``, the number of
    events, of them ``valid``), then the events."""
    size = len(events[0]) if events else 8
    head = struct.pack("<hhiiiiii", event_type, 1, size, 4, overflow, len(events), len(events), valid)
    return head + b"".join(events)


def polarity_event(t: int, x: int, y: int, p: int, valid: bool = True) -> bytes:
    """One 8-byte polarity event (the low 31 bits of ``t``: the packet holds the rest)."""
    return struct.pack("<II", int(valid) | p << 1 | y << 2 | x << 17, t & 0x7FFFFFFF)


def aedat31_bytes(events: np.ndarray, per_packet: int = 64) -> bytes:
    """Polarity packets of at most ``per_packet`` events (a new one where the timestamp overflow changes), each
    with one invalid event at a bogus address, and a special-event packet (type 0) before each: both of which a
    reader skips, as it must in the data set's own files."""
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


def write_gesture_labels(path: Path, rows: list[tuple[int, int, int]]) -> None:
    """A recording's labels CSV: one (class, 1-based; start, end in microseconds) row per gesture."""
    path.write_text("class,startTime_usec,endTime_usec\n" + "".join(f"{c},{s},{e}\n" for c, s, e in rows))


# AEDAT 2.0 (CIFAR10-DVS)

AEDAT2_HEADER = (
    b"#!AER-DAT2.0\r\n"
    b"# This is a raw AE data file - do not edit\r\n"
    b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
    b"# Timestamps tick is 1 us\r\n"
)


def aedat2_bytes(events: np.ndarray, external_at: int | None = 0) -> bytes:
    """The header and the records, with an external event (address bit 15) before event ``external_at`` (None: no
    such event), which a reader must skip."""
    records = [struct.pack(">II", p | x << 1 | (127 - y) << 8, t) for t, x, y, p in events.tolist()]
    if external_at is not None:
        records.insert(external_at, struct.pack(">II", 1 << 15 | 3, 0))
    return AEDAT2_HEADER + b"".join(records)
