"""Free TCP ports on 127.0.0.1 for the servers we start ourselves (the sweep's Ray dashboard; in the tests, MLflow
servers and rendezvous): chosen where nothing else takes ports without asking.

A port picked with ``bind(0)`` is free when picked but lies in the kernel's ephemeral range (32768-60999 on Linux
by default), where every socket bound to port 0 is numbered: a CI run lost such a port to one of the dozens of
sockets Ray opens in the seconds before its dashboard bound it. Ports are therefore drawn at random from
:data:`PORTS`: above Ray's worker ports (10002-19999 by default) and below the ephemeral range.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["PORTS", "ephemeral_ports", "free_port"]

PORTS = range(20000, 32768)


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux; the IANA range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A port of :data:`PORTS`, below the ephemeral range, that is free on 127.0.0.1 now. Raises OSError if the 64
    ports tried are all taken."""
    low, _ = ephemeral_ports()
    ports = [p for p in PORTS if p < low] or list(PORTS)
    for port in random.Random().sample(ports, min(64, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on 127.0.0.1 in {ports[0]}-{ports[-1]}")
