"""Helpers to run a function on several gloo ranks in spawned processes (127.0.0.1 rendezvous only)."""

import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """One free port, chosen as :func:`free_ports` chooses (not ``bind(0)``: see there)."""
    return free_ports(1)[0]


_HANDED_OUT: set[int] = set()  # never hand the same port out twice in one test process


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports below Linux's ephemeral range (32768+), so that no port the OS or a server hands
    out on its own (Ray picks some of its ports itself) can land on one of them between choice and use."""
    import random

    rng = random.Random()
    chosen, held = [], []
    try:
        while len(chosen) < n:
            port = rng.randrange(20000, 32000)
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                chosen.append(port)
    finally:
        for s in held:
            s.close()
    return chosen


def _entry(rank, world, port, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raises if any rank fails."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")
