"""Helpers to run a function on several gloo ranks in spawned processes (127.0.0.1 rendezvous only)."""

import torch.distributed as dist
import torch.multiprocessing as mp

from stbp import ports


def free_port() -> int:
    """One free port (:func:`stbp.ports.free_port`: below the ephemeral range, not ``bind(0)``)."""
    return free_ports(1)[0]


_HANDED_OUT: set[int] = set()  # never hand the same port out twice in one test process


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports, each free when chosen by :func:`stbp.ports.free_port`, none handed out before."""
    chosen: list[int] = []
    while len(chosen) < n:
        port = ports.free_port()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            chosen.append(port)
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
