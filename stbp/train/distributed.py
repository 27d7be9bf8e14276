"""Process-group setup that works the same under torchrun, Ray Train, and a plain single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "setup_distributed", "teardown_distributed", "all_reduce_sum"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when we created the process group and must destroy it

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device: str = "auto") -> DistEnv:
    """Join the process group that already exists (Ray Train), create one from torchrun's environment, or
    run single-process. Backend: NCCL on CUDA, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return DistEnv(rank, world, local_rank, _pick_device(device, local_rank), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(0, 1, 0, _pick_device(device, 0), owns_group=False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    store = _restart_safe_store(rank)
    kwargs = {} if store is None else dict(store=store, rank=rank, world_size=world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    return DistEnv(rank, world, local_rank, dev, owns_group=True)


def _restart_safe_store(rank: int) -> dist.Store | None:
    """torchrun's store, keyed by restart on one node; None: let init_process_group open its own.

    torchrun (torch 2.14) hands its workers one TCP store for the whole job, shared across restarts. The
    addresses that the ranks of a killed attempt published there stay behind, and a restarted rank can read
    its peer's stale address before the peer writes its new one: gloo then fails with "connection refused"
    (seen on a loaded machine), and NCCL could read a stale unique id. On one node, the restart count is the
    same for every rank, so a prefix with it gives each attempt clean keys. Across nodes the counts differ
    (an agent that did not fail restarts without counting), so there the fix is torch's own opt-out,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: a fresh store for every attempt.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            print(
                "[stbp] warning: torchrun on several nodes with restarts shares one store across attempts; a "
                "restarted job can read stale addresses. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun.",
                flush=True,
            )
        return None
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"stbp/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks in place (no-op on one rank); returns the tensor."""
    if env.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()
