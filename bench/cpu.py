"""CPU benchmarks: training step of ResNet-19 (ours vs SpikingJelly 2.0 vs the reference structure), the data
loader against the model, and DDP with 1 vs 2 processes. Prints markdown tables (pasted into BENCHMARKS.md).

    python bench/cpu.py                      # default set: minutes on 2 quiet cores
    python bench/cpu.py --quick              # smoke of every part: tiny sizes, 2 repeats; run it first
    python bench/cpu.py --configs 1.0:4:16:fp32:2 1.0:6:16:fp32:2 --skip-loader --skip-ddp

A config is ``width:T:batch[:precision[:repeats]]``. Within a config the models run in alternation in this one
process (see ``common.alternate``); times are medians over repeats and "ours faster (median)" is the median of
the per-round ratios. On a machine shared with others' jobs, whose load only ever adds time, the minimum over
repeats is the least disturbed estimate, so "ours faster (min)" (ratio of the minima) is printed next to it.
The first step of each model is untimed: it warms up and measures the autograd saved-tensor bytes.
SpikingJelly is optional (``pip install --no-deps spikingjelly==2.0.0 'loguru>=0.7,<1'``); without it its
columns are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import common
import models
import sj_model
import torch
import torch.multiprocessing as mp

# (width, T, batch, precision, repeats): full width T=2 is the target figure; width 0.25 spans T and bf16.
DEFAULT_CONFIGS = ("1.0:2:16:fp32:5", "0.25:2:32:fp32:5", "0.25:4:32:fp32:4", "0.25:6:32:fp32:3", "0.25:2:32:bf16:3")
QUICK_CONFIGS = ("0.125:2:8:fp32:2", "0.125:2:8:bf16:2")


@dataclass
class Config:
    width: float
    timesteps: int
    batch: int
    precision: str = "fp32"
    repeats: int = 3

    @classmethod
    def parse(cls, spec: str) -> Config:
        parts = spec.split(":")
        if not 3 <= len(parts) <= 5:
            raise argparse.ArgumentTypeError(f"config {spec!r}: expected width:T:batch[:precision[:repeats]]")
        return cls(
            float(parts[0]),
            int(parts[1]),
            int(parts[2]),
            *(parts[3:4] or ["fp32"]),
            *([int(parts[4])] if len(parts) > 4 else []),
        )

    def __str__(self) -> str:
        return f"w={self.width:g} T={self.timesteps} B={self.batch} {self.precision}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a smoke run of every part")
    p.add_argument("--configs", nargs="+", type=Config.parse, help="width:T:batch[:precision[:repeats]] ...")
    p.add_argument("--models", default="ours,sj,ref", help="comma list of ours, sj, ref (default: all)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="I",
        help="profile one step of every model in config I (index; -1: none)",
    )
    p.add_argument("--skip-check", action="store_true", help="skip the equivalence self-check")
    p.add_argument("--skip-train", action="store_true", help="skip the training-step comparison")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--loader-batch", type=int, default=128, help="batch of the loader and of its model (cpu preset)")
    p.add_argument("--ddp-batch", type=int, default=64, help="global batch of the DDP runs")
    p.add_argument("--ddp-steps", type=int, default=8, help="timed steps per DDP run")
    p.add_argument("--ddp-rounds", type=int, default=3, help="rounds of (1 process, 2 processes)")
    p.add_argument("--threads", type=int, help="torch threads of the training-step runs (default: torch's)")
    p.add_argument("--json", help="also write every result to this JSON file")
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = [Config.parse(s) for s in (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)]
    if args.quick:
        args.loader_batch, args.ddp_batch, args.ddp_steps, args.ddp_rounds = 32, 16, 2, 1
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(models.NAMES)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {models.NAMES}")
    if "sj" in args.models and not sj_model.available():
        print(f"[bench] SpikingJelly not importable: skipping it ({sj_model.INSTALL_HINT})", flush=True)
        args.models.remove("sj")
    if "ours" not in args.models:
        args.models.insert(0, "ours")
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def mnist_tensors():
    """Real MNIST (``$STBP_DATA_DIR``) when present, else random uint8 images of the same shape (said so)."""
    from stbp.data import DataNotFoundError, DatasetTensors, load_dataset

    try:
        return load_dataset("mnist", download=False), "MNIST"
    except DataNotFoundError:
        g = torch.Generator().manual_seed(0)
        rand = lambda n: torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = lambda n: torch.randint(0, 10, (n,), generator=g)
        return DatasetTensors(rand(60000), labels(60000), rand(10000), labels(10000)), "synthetic (no MNIST found)"


def image_batch(tensors, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from stbp.data import normalize

    return normalize(tensors.train_images[:batch]), tensors.train_labels[:batch]


# ----------------------------------------------------------------------------------------------------------
# 1. Training step: ours vs SpikingJelly vs the reference structure
# ----------------------------------------------------------------------------------------------------------


def bench_config(cfg: Config, names: list[str], tensors, profile: bool) -> dict:
    """Saved-tensor bytes (first, untimed step), then step times in alternation; optionally a profile."""
    cpu = torch.device("cpu")
    x, y = image_batch(tensors, cfg.batch)
    steps, nets = {}, {}
    for name in names:
        nets[name] = models.build(name, cfg.width, cfg.timesteps, cpu)
        steps[name] = common.make_train_step(
            nets[name], models.prepare_input(name, x), y, cfg.precision, before=models.before_step(name, nets[name])
        )
    breakdown = {name: common.saved_tensor_breakdown(nets[name], steps[name]) for name in names}
    memory = {name: sum(b.values()) for name, b in breakdown.items()}
    load_before = common.uptime()
    times = common.alternate(steps, cfg.repeats, warmup=0)
    result = {
        "config": str(cfg),
        "width": cfg.width,
        "timesteps": cfg.timesteps,
        "batch": cfg.batch,
        "precision": cfg.precision,
        "repeats": cfg.repeats,
        "load_before": load_before,
        "load_after": common.uptime(),
        "saved_breakdown": breakdown,
        "models": {},
    }
    ours = times["ours"]
    for name in names:
        wall, cpu_s = times[name]["wall"], times[name]["cpu"]
        result["models"][name] = {
            "step_s": common.median(wall),
            "min_step_s": min(wall),
            "cpu_s": common.median(cpu_s),
            "images_per_s": cfg.batch / common.median(wall),
            "times": times[name],
            "saved_bytes": memory[name],
            "speedup_of_ours": common.paired_ratio(wall, ours["wall"]),
            # Others' load only ever adds time: the best of N is the least disturbed estimate of each.
            "min_speedup_of_ours": min(wall) / min(ours["wall"]),
            "cpu_speedup_of_ours": common.paired_ratio(cpu_s, ours["cpu"]),
            "memory_vs_ours": memory[name] / memory["ours"],
        }
    if profile:
        result["profile_ms"] = profile_models(nets, steps, rounds=3)
        result["ours_top_ops"] = common.top_ops(steps["ours"])
    return result


def profile_models(nets: dict, steps: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Per model, the median over ``rounds`` profiled steps (models in alternation) of each category's ms."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in nets}
    for _ in range(rounds):
        for name in nets:
            samples[name].append(common.step_breakdown(nets[name], steps[name], models.kind_of))
    out = {}
    for name, runs in samples.items():
        cats = {c for run in runs for c in run}
        out[name] = dict(
            sorted(((c, common.median(run.get(c, 0.0) for run in runs)) for c in cats), key=lambda kv: -kv[1])
        )
    return out


def step_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        for name, m in r["models"].items():
            rows.append(
                {
                    "config": r["config"],
                    "model": models.LABELS[name],
                    "median ms": 1e3 * m["step_s"],
                    "min ms": 1e3 * m["min_step_s"],
                    "img/s": m["images_per_s"],
                    "ours faster (median)": "-" if name == "ours" else f"{m['speedup_of_ours']:.2f}x",
                    "ours faster (min)": "-" if name == "ours" else f"{m['min_speedup_of_ours']:.2f}x",
                    "saved MiB": m["saved_bytes"] / 2**20,
                    "ours / its memory": "-" if name == "ours" else f"{1 / m['memory_vs_ours']:.2f}",
                }
            )
    return rows


def profile_rows(profile: dict) -> list[dict]:
    cats = sorted({c for p in profile.values() for c in p}, key=lambda c: -profile["ours"].get(c, 0.0))
    rows = []
    for c in cats:
        row = {"category": c}
        for name, p in profile.items():
            total = sum(p.values())
            row[f"{name} ms"] = p.get(c, 0.0)
            row[f"{name} %"] = 100 * p.get(c, 0.0) / total
        rows.append(row)
    rows.append({"category": "total", **{f"{n} ms": sum(p.values()) for n, p in profile.items()}})
    return rows


# ----------------------------------------------------------------------------------------------------------
# 2. The loader alone against the model
# ----------------------------------------------------------------------------------------------------------


def bench_loader(tensors, batch: int, repeats: int, batches_per_call: int = 20) -> dict:
    """Images/s out of ``DeviceDataset.train_batches`` (crop padding 4 + hflip) vs ours' training step at the
    ``cpu`` preset (width 0.125, T=2, same batch), timed in alternation."""
    from stbp.data import DeviceDataset

    cpu = torch.device("cpu")
    data = DeviceDataset(tensors, cpu)

    def batches():
        for epoch in itertools.count():
            yield from data.train_batches(epoch, batch, padding=4, hflip=True)

    stream = batches()

    def load() -> None:
        for x, _ in itertools.islice(stream, batches_per_call):
            x.sum()  # touch the batch, as the model would

    net = models.build("ours", 0.125, 2, cpu)
    x, y = image_batch(tensors, batch)
    step = common.make_train_step(net, models.prepare_input("ours", x), y)
    times = common.alternate({"loader": load, "model": step}, repeats, warmup=1)
    loader_t, model_t = times["loader"]["wall"], times["model"]["wall"]
    loader_ips = batch * batches_per_call / common.median(loader_t)
    model_ips = batch / common.median(model_t)
    # images/s ratio = (model seconds per image) / (loader seconds per image), paired round by round
    ratio = common.paired_ratio([t / batch for t in model_t], [t / (batch * batches_per_call) for t in loader_t])
    return {
        "batch": batch,
        "loader_images_per_s": loader_ips,
        "model_images_per_s": model_ips,
        "loader_over_model": ratio,
        "load": common.uptime(),
    }


# ----------------------------------------------------------------------------------------------------------
# 3. DDP on CPU: 1 vs 2 processes, same global batch
# ----------------------------------------------------------------------------------------------------------


def ddp_worker(rank: int, world: int, port: int, global_batch: int, steps: int, out_path: str) -> None:
    """One rank: gloo on 127.0.0.1, ``resnet19(width=0.125)`` under DDP, ``steps`` timed training steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cpu = torch.device("cpu")
        net = DDP(models.build("ours", 0.125, 2, cpu))
        g = torch.Generator().manual_seed(rank)
        per_rank = global_batch // world
        x = torch.randn(per_rank, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (per_rank,), generator=g)
        step = common.make_train_step(net, x, y)
        for _ in range(2):
            step()
        dist.barrier()
        times = [common.time_call(step) for _ in range(steps)]
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def run_ddp(world: int, global_batch: int, steps: int) -> list[float]:
    # Children read OMP_NUM_THREADS at start-up: 2 threads for one process, 1 each for two (2 cores in all).
    os.environ["OMP_NUM_THREADS"] = str(max(1, 2 // world))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.json")
        mp.spawn(ddp_worker, args=(world, common.free_port(), global_batch, steps, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def bench_ddp(global_batch: int, steps: int, rounds: int) -> dict:
    """Rounds of (1 process, 2 processes); per run the median step time, then medians over rounds and the
    median of the per-round ratios (each round's pair ran back to back, under about the same load)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    per_run: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(rounds):
            for world in (1, 2):
                per_run[world].append(common.median(run_ddp(world, global_batch, steps)))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    med = {w: common.median(t) for w, t in per_run.items()}
    return {
        "global_batch": global_batch,
        "steps_per_run": steps,
        "rounds": rounds,
        "run_step_s": per_run,
        "step_s": med,
        "images_per_s": {w: global_batch / t for w, t in med.items()},
        "speedup_2_over_1": common.paired_ratio(per_run[1], per_run[2]),
        "load": common.uptime(),
    }


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.machine_info()
    log(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)")
    log(f"load: {info['uptime']}")
    log(f"code: {info['code']}")
    report: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}

    if not args.skip_check:
        check = models.check_equivalence(args.models)
        report["equivalence"] = check
        for name, c in check.items():
            log(
                f"self-check {models.LABELS[name]} == ours: {c['spikes_compared']:,} spikes identical, "
                f"logits max diff {c['logit_err']:.1e}, gradients max rel diff {c['grad_err']:.1e} (float64)"
            )

    tensors, source = mnist_tensors()
    log(f"inputs: {source}")
    results = []
    for i, cfg in enumerate([] if args.skip_train else args.configs):
        log(f"[{i + 1}/{len(args.configs)}] {cfg}, {cfg.repeats} repeats: {', '.join(args.models)}")
        results.append(bench_config(cfg, args.models, tensors, profile=i == args.profile))
        log("   " + "  ".join(f"{n} {1e3 * m['step_s']:.0f} ms" for n, m in results[-1]["models"].items()))
    report["train_step"] = results

    if not args.skip_loader:
        log(f"loader vs model (batch {args.loader_batch})")
        report["loader"] = bench_loader(tensors, args.loader_batch, repeats=2 if args.quick else 3)
    if not args.skip_ddp:
        log(f"DDP 1 vs 2 processes (global batch {args.ddp_batch}, {args.ddp_steps} steps x {args.ddp_rounds})")
        report["ddp"] = bench_ddp(args.ddp_batch, args.ddp_steps, args.ddp_rounds)
    report["load_end"] = common.uptime()
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


def print_report(report: dict) -> None:
    info = report["machine"]
    print(f"\n## CPU benchmarks ({info['date']}): {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"code: {info['code']}; torch threads: {info['torch_threads']}")
    print(f"load at start: {info['uptime']}\nload at end:   {report['load_end']}\n")
    cols = [
        "config",
        "model",
        "median ms",
        "min ms",
        "img/s",
        "ours faster (median)",
        "ours faster (min)",
        "saved MiB",
        "ours / its memory",
    ]
    if report["train_step"]:
        print(common.table(step_rows(report["train_step"]), cols))
    if report["train_step"]:
        r = report["train_step"][0]
        print(f"\nSaved-tensor MiB by kind ({r['config']}; '0/1': floating tensors holding only spikes):\n")
        kinds = sorted({k for b in r["saved_breakdown"].values() for k in b})
        print(
            common.table(
                [
                    {"model": models.LABELS[n], **{k: b.get(k, 0) / 2**20 for k in kinds}}
                    for n, b in r["saved_breakdown"].items()
                ],
                ["model", *kinds],
            )
        )
    for r in report["train_step"]:
        if "profile_ms" in r:
            names = list(r["profile_ms"])
            print(
                f"\nSelf CPU time of one training step by category ({r['config']}; torch.profiler, median of 3 "
                "steps per model; the totals are the sums of the medians):\n"
            )
            print(
                common.table(
                    profile_rows(r["profile_ms"]), ["category"] + [f"{n} {u}" for n in names for u in ("ms", "%")]
                )
            )
            print(f"\nTop ops of ours by self CPU time (one more profiled step, {r['config']}):\n")
            print(common.table(r["ours_top_ops"], ["op", "calls", "ms", "%"]))
    if "loader" in report:
        ld = report["loader"]
        print(
            f"\nLoader (DeviceDataset.train_batches, crop padding 4 + hflip, batch {ld['batch']}): "
            f"{ld['loader_images_per_s']:,.0f} img/s; ours at the cpu preset (width 0.125, T=2): "
            f"{ld['model_images_per_s']:,.1f} img/s; loader / model = {ld['loader_over_model']:,.0f}x"
        )
    if "ddp" in report:
        dd = report["ddp"]
        print(
            f"\nDDP (gloo, width 0.125, T=2, global batch {dd['global_batch']}): 1 process x 2 threads "
            f"{dd['images_per_s'][1]:.1f} img/s, 2 processes x 1 thread {dd['images_per_s'][2]:.1f} img/s, "
            f"speed-up {dd['speedup_2_over_1']:.2f}x (median over {dd['rounds']} rounds; median step s per run: "
            + "; ".join(f"{w} proc " + ", ".join(f"{t:.2f}" for t in ts) for w, ts in dd["run_step_s"].items())
            + ")"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
