"""Shared helpers of the benchmarks: timing in alternation, saved-tensor memory, profiler breakdown, machine info.

Scripts in ``bench/`` are run as ``python bench/<name>.py``; importing this module puts the repository root on
``sys.path`` so they find ``stbp`` (and ``bench`` siblings) even where the project is not pip-installed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------------------


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5, 15 min), or the load averages alone where it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    """``lscpu``'s model name (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def code_state() -> str:
    """The commit, and the stbp/ files changed since it (the benchmarks time whatever stbp is checked out)."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("diff", "--name-only", "HEAD", "--", "stbp").splitlines()
    if not dirty:
        return commit
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in sorted(dirty) if (ROOT / f).is_file()))
    return f"{commit} + uncommitted {', '.join(sorted(dirty))} (sha256 {digest.hexdigest()[:12]})"


def machine_info(device: torch.device | None = None) -> dict:
    """What a figure needs next to it: date, CPU, cores, threads, load, torch, GPU, code."""
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "uptime": uptime(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "code": code_state(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(report: dict, path: str) -> None:
    """A benchmark's report as JSON at ``path`` (its folder made; what JSON cannot hold written as text)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, below the kernel's ephemeral range (for a gloo rendezvous)."""
    from stbp.ports import free_port

    return free_port()


# ----------------------------------------------------------------------------------------------------------
# Training steps and timing
# ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
    before: Callable[[], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:
    """One training step exactly as ``stbp.train`` runs it (:func:`stbp.train.train_step`: forward under optional
    bf16 autocast, cross-entropy in fp32, backward, Adam step), then a device sync. ``before`` runs first
    (SpikingJelly's reset_net)."""
    from stbp.train import train_step

    opt = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    amp = {"bf16": torch.bfloat16, "fp32": None}.get(precision, "bad")
    if amp == "bad":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    model.train()

    def step() -> None:
        if before is not None:
            before()
        train_step(model, opt, x, y, amp)
        sync(x.device)

    return step


def time_call(fn: Callable[[], None]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call_cpu(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of one call. CPU time counts every thread of this process (spin-waits
    included) but not the time others' processes held the cores: a second view, less sensitive to load."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def alternate(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, dict[str, list]]:
    """Wall and CPU seconds per call of each function, timed in alternation (A B C, B C A, ...) in this process.

    Returns ``{name: {"wall": [...], "cpu": [...]}}``. On a shared machine the load drifts during a run;
    interleaving the candidates (and rotating who goes first) exposes them to the same drift, so their ratio is
    meaningful even when the absolute times are not.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, dict[str, list]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu = time_call_cpu(fns[name])
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of ``slow[r] / fast[r]``: each round's pair ran back to back under the same load."""
    return statistics.median(s / f for s, f in zip(slow, fast))


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def saved_tensor_breakdown(model: nn.Module, step: Callable[[], None]) -> dict[str, int]:
    """Bytes of the tensors autograd keeps for backward during one training step ("activation memory"), by kind:
    ``"<dtype> 0/1"`` for floating tensors holding only zeros and ones (spikes), ``"<dtype>"`` otherwise.

    Every tensor that any autograd node saves passes through ``saved_tensors_hooks``; each distinct storage is
    counted once (a view keeps its whole base alive, so the base's size is what it costs), and the parameters'
    own storages are left out (they exist whether or not we train). Deterministic and device-independent,
    unlike the CPU allocator's resident size.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and (ptr not in seen or seen[ptr][0] < storage.nbytes()):
            kind = str(t.dtype).replace("torch.", "")
            if t.is_floating_point() and bool(((t == 0) | (t == 1)).all()):
                kind += " 0/1"
            seen[ptr] = (storage.nbytes(), kind)
        return t  # keeping the tensor alive means no two live saved storages share an address

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    out: dict[str, int] = {}
    for nbytes, kind in seen.values():
        out[kind] = out.get(kind, 0) + nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def saved_tensor_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Total of :func:`saved_tensor_breakdown`."""
    return sum(saved_tensor_breakdown(model, step).values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """``(peak, growth)``: the CUDA allocator's peak during ``step`` (weights, optimizer state and gradients
    included), and that peak less what was allocated before the step (activations and temporaries)."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - base


# ----------------------------------------------------------------------------------------------------------
# Where the time goes
# ----------------------------------------------------------------------------------------------------------

# Backward autograd nodes by name fragment -> category (forward ops are categorised by the module they run in).
# First match wins: stbp's SpikeConv2d is a convolution, not a neuron.
_BACKWARD_KINDS = (
    ("Convolution", "conv"),
    ("SpikeConv", "conv"),
    ("Addmm", "conv"),
    ("Mm", "conv"),
    ("BatchNorm", "batch-norm"),
    ("LIF", "neuron"),
    ("Spike", "neuron"),
    ("rect", "neuron"),
    ("Surrogate", "neuron"),
)


def step_breakdown(model: nn.Module, step: Callable[[], None], kind_of: Callable[[nn.Module], str | None]) -> dict:
    """Self CPU time of one step by category: conv (and linear), batch-norm, neuron, other elementwise,
    optimizer, other. Forward ops belong to the module (``kind_of``) they run in; backward ops to their autograd
    node's name; un-attributed elementwise work (residual adds, copies, loss) is "other"."""
    from torch.profiler import ProfilerActivity, profile, record_function

    handles = []
    for m in model.modules():
        kind = kind_of(m)
        if kind is None:
            continue
        ctx: dict[str, object] = {}

        def pre(mod, args, kind=kind, ctx=ctx):
            ctx["rf"] = record_function(f"bench::{kind}")
            ctx["rf"].__enter__()

        def post(mod, args, out, ctx=ctx):
            ctx.pop("rf").__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        for h in handles:
            h.remove()
    totals: dict[str, float] = {}
    for ev in prof.events():
        totals[_category(ev)] = totals.get(_category(ev), 0.0) + ev.self_cpu_time_total / 1e3  # ms
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def top_ops(step: Callable[[], None], n: int = 10) -> list[dict]:
    """The ``n`` aten ops with the most self CPU time in one profiled ``step``: name, calls, ms, % of the step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return [
        {"op": e.key, "calls": e.count, "ms": e.self_cpu_time_total / 1e3, "%": 100 * e.self_cpu_time_total / total}
        for e in rows[:n]
    ]


def _category(ev) -> str:
    node = ev
    while node is not None:
        name = node.name
        if name.startswith("bench::"):
            return name[len("bench::") :]
        if name.startswith("autograd::engine::evaluate_function:"):
            for frag, kind in _BACKWARD_KINDS:
                if frag in name:
                    return kind
            return "other elementwise"
        if name.startswith("Optimizer."):
            return "optimizer"
        node = node.cpu_parent
    return "other"


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) in ``columns`` order; floats to 3 significant digits (whole
    numbers from 100 up)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
