"""The one training function: ``train(cfg)``. ``train_ddp.py`` and the Ray Tune trials both call it.

Per epoch: on-device shuffled shards -> forward/backward with no host sync in the step (metrics accumulate on
the device; a sync every ``log_interval`` steps checks for divergence and updates the progress bar) -> one
all-reduce of sums and counts -> validation -> early stopping -> checkpoint (rank 0) -> MLflow (rank 0) ->
``callback`` (every rank).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict, flatten_config
from .data import DeviceMNIST, load_mnist
from .distributed import DistEnv, all_reduce_sum, barrier, setup_distributed, teardown_distributed
from .model import MODEL_KWARGS, resnet19
from .monitor import FiringRateMonitor
from .tdbn import convert_sync_tdbn

__all__ = ["train", "TrainingDiverged", "Callback", "lr_at", "model_kwargs", "cpu_has_native_bf16"]

Callback = Callable[[int, dict[str, float], "str | None"], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite at ``epoch`` (1-based), ``step`` (1-based, within the epoch), ``lr``."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0, lr: float = float("nan")):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr

    def __reduce__(self):  # picklable with its fields: Ray sends it from a DDP rank to the trial
        return (type(self), (str(self), self.epoch, self.step, self.lr))


def model_kwargs(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {k: getattr(m, k) for k in MODEL_KWARGS}


def lr_at(cfg: Config, progress: float) -> float:
    """Learning rate at ``progress`` epochs into training (fractional: schedules move every step)."""
    o, epochs = cfg.optim, cfg.run.epochs
    if o.warmup_epochs and progress < o.warmup_epochs:
        return o.lr * (progress + 1e-3) / o.warmup_epochs
    if o.schedule == "step":
        return o.lr * o.lr_gamma ** math.floor(progress / o.lr_step_epochs)
    if o.schedule == "cosine":
        span = max(epochs - o.warmup_epochs, 1e-9)
        return 0.5 * o.lr * (1 + math.cos(math.pi * min((progress - o.warmup_epochs) / span, 1.0)))
    return o.lr


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: where CPU bf16 autocast is a speed-up rather than an emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.run.amp == "off":
        return None
    if cfg.run.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def _build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


class _Trainer:
    def __init__(self, cfg: Config, env: DistEnv, callback: Callback | None):
        self.cfg, self.env, self.callback = cfg, env, callback
        self.device = env.device
        self.out = Path(cfg.run.output_dir).resolve()
        self.ckpt_dir = self.out / "checkpoints"
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.log = print if env.is_primary else (lambda *a, **k: None)

    # ---- set-up: everything that can refuse happens before the first step ----------------------------
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.run.batch_size % env.world_size:
            raise ConfigError(
                f"batch_size {cfg.run.batch_size} (global) is not divisible by the {env.world_size} ranks"
            )
        resume_state = self._find_resume_state()
        if env.is_primary:  # rank 0 may download; the others wait and then read the files
            tensors = load_mnist(cfg.data.data_dir, download=cfg.data.download)
        barrier(env)
        if not env.is_primary:
            tensors = load_mnist(cfg.data.data_dir, download=False)
        if cfg.data.test_size:
            n = cfg.data.test_size
            tensors = tensors._replace(test_images=tensors.test_images[:n], test_labels=tensors.test_labels[:n])
        self.data = DeviceMNIST(tensors, self.device, val_size=cfg.data.val_size,
                                train_size=cfg.data.train_size, seed=cfg.run.seed)
        self.steps = self.data.num_train_steps(cfg.run.batch_size, env.world_size)  # refuses too few batches

        torch.manual_seed(cfg.run.seed)
        self.raw_model = resnet19(**model_kwargs(cfg)).to(self.device, memory_format=torch.channels_last)
        if resume_state is not None:
            self.raw_model.load_state_dict(resume_state["model"])
        if cfg.model.sync_bn and env.world_size > 1:
            convert_sync_tdbn(self.raw_model)
        model: nn.Module = self.raw_model
        if env.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.run.compile and self.device.type == "cpu" and env.is_primary:
            warnings.warn(
                "compile=true on a CPU: torch.compile (inductor) made this model's training step 5-6x slower "
                "than eager on an AVX2 CPU (torch 2.14; BENCHMARKS.md). It is meant for CUDA.",
                stacklevel=2,
            )
        self.model = torch.compile(model) if cfg.run.compile else model
        self.optimizer = _build_optimizer(cfg, self.raw_model.parameters())

        self.start_epoch, self.history = 0, []
        self.best_val_acc, self.best_val_loss, self.bad_epochs = -1.0, math.inf, 0
        self.mlflow_run_id = cfg.tracking.run_id
        if resume_state is not None:
            self._restore(resume_state)
        self.tracker = self._make_tracker()

    def _find_resume_state(self) -> dict | None:
        resume = self.cfg.run.resume
        if resume == "never":
            return None
        if resume != "auto":
            return self._check_arch(read_checkpoint(resume), resume)
        last, prev = self.ckpt_dir / "last.pt", self.ckpt_dir / "last.prev.pt"
        candidates = [p for p in (last, prev) if p.exists()]
        for i, path in enumerate(candidates):
            try:
                state = read_checkpoint(path)
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise
                warnings.warn(f"{e}; falling back to the previous checkpoint {candidates[i + 1]}", stacklevel=2)
                continue
            return self._check_arch(state, path)
        return None

    def _check_arch(self, state: dict, path) -> dict:
        mine = model_kwargs(self.cfg)
        theirs = state.get("model_kwargs", {})
        diff = {k: (theirs.get(k), mine[k]) for k in ("in_channels", "num_classes", "width")
                if theirs.get(k) != mine[k]}
        if diff:
            raise CheckpointError(
                f"cannot resume from {path}: it holds another architecture "
                + ", ".join(f"{k}={a} (config: {b})" for k, (a, b) in diff.items())
                + "; use another output_dir or --resume never"
            )
        return state

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        es = state["early_stopping"]
        self.best_val_loss, self.bad_epochs = float(es["best_val_loss"]), int(es["bad_epochs"])
        self.best_val_acc = float(state["best_val_acc"])
        self.history = list(state["metrics"])
        self.mlflow_run_id = self.mlflow_run_id or state.get("mlflow_run_id")
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        self.log(f"[stbp] resumed from epoch {self.start_epoch} ({self.ckpt_dir})")

    def _make_tracker(self):
        from .tracking import NullTracker, git_commit, make_tracker

        if not self.env.is_primary:
            return NullTracker()
        cfg = self.cfg
        tags = {
            "git_commit": git_commit() or "unknown",
            "torch_version": torch.__version__,
            "world_size": str(self.env.world_size),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            **cfg.tracking.tags,
        }
        tracker = make_tracker(cfg.tracking.mlflow, cfg.tracking.tracking_uri, cfg.tracking.experiment,
                               run_id=self.mlflow_run_id, run_name=cfg.tracking.run_name, tags=tags,
                               pending_path=self.out / "mlflow_pending.jsonl")
        self.mlflow_run_id = tracker.run_id
        tracker.log_params({k: v for k, v in flatten_config(cfg).items() if k not in ("run_id", "tags")})
        return tracker

    # ---- the loop ----------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, env, dev = self.cfg, self.env, self.device
        self.model.train()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        first_bad = torch.full((), -1, device=dev, dtype=torch.int64)
        seen = 0
        batches = self.data.train_batches(epoch, cfg.run.batch_size, env.world_size, env.rank,
                                          padding=cfg.data.crop_padding, hflip=cfg.data.hflip, seed=cfg.run.seed)
        bar = self._progress(epoch)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(batches):
            lr = lr_at(cfg, epoch + step / self.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            # Device-side bookkeeping only: no .item() in the step.
            detached = loss.detach()
            loss_sum += detached.double() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(detached), step, first_bad)
            seen += y.shape[0]
            if (step + 1) % cfg.run.log_interval == 0 or step + 1 == self.steps:
                self._check_divergence(first_bad, epoch, lr)  # the one sync per log interval
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(step + 1 - bar.n)
        if bar is not None:
            bar.close()
        totals = all_reduce_sum(torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=dev,
                                             dtype=torch.float64)]), env).tolist()
        elapsed = time.perf_counter() - t0
        return {"train_loss": totals[0] / totals[2], "train_acc": 100.0 * totals[1] / totals[2],
                "images_per_s": totals[2] / elapsed, "lr": lr}

    def _check_divergence(self, first_bad: torch.Tensor, epoch: int, lr: float) -> None:
        bad = first_bad.clone()
        if self.env.world_size > 1:  # every rank must stop together
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        step = int(bad)
        if step >= 0:
            raise TrainingDiverged(
                f"loss became NaN/Inf at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); "
                "lower --lr, set --grad_clip, or check v_th/aa",
                epoch=epoch + 1,
                step=step + 1,
                lr=lr,
            )

    def _progress(self, epoch: int):
        if not (self.env.is_primary and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.cfg.run.epochs}", leave=False,
                    dynamic_ncols=True)

    @torch.no_grad()
    def evaluate(self, split: str, firing_rates: bool = False) -> dict[str, float]:
        """Loss and accuracy on ``split`` (and the firing rate of every LIF layer), reduced over ranks."""
        # The monitor's hooks live only for this evaluation, never during training steps.
        with FiringRateMonitor(self.raw_model) if firing_rates else contextlib.nullcontext() as monitor:
            return self._evaluate(split, monitor)

    def _evaluate(self, split: str, monitor: FiringRateMonitor | None) -> dict[str, float]:
        env, dev = self.env, self.device
        model = self.raw_model
        model.eval()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.float64)
        count = 0
        for x, y in self.data.eval_batches(split, self.cfg.run.eval_batch_size, env.world_size, env.rank):
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                logits = model(x.contiguous(memory_format=torch.channels_last)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += y.shape[0]
        parts = [loss_sum, correct, torch.tensor(float(count), device=dev, dtype=torch.float64)]
        if monitor is not None:
            spikes, counts = monitor.totals()
            parts += [spikes.double(), torch.tensor(counts, device=dev, dtype=torch.float64)]
        totals = all_reduce_sum(torch.cat([p.reshape(-1) for p in parts]), env).tolist()
        n = totals[2]
        out = {f"{split}_loss": totals[0] / n, f"{split}_acc": 100.0 * totals[1] / n}
        if monitor is not None:
            k = len(monitor.names)
            for name, s, c in zip(monitor.names, totals[3 : 3 + k], totals[3 + k :]):
                out[f"firing_rate/{name}"] = s / c if c else 0.0
        return out

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model_kwargs": model_kwargs(self.cfg),
            "model": self.raw_model.state_dict(),
            "config": config_to_dict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"schedule": self.cfg.optim.schedule, "epoch": epoch},
            "epoch": epoch,
            "early_stopping": {"best_val_loss": self.best_val_loss, "bad_epochs": self.bad_epochs,
                               "patience": self.cfg.run.patience},
            "best_val_acc": self.best_val_acc,
            "metrics": self.history,
            "rng": rng,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def _save(self, epoch: int, is_best: bool) -> None:
        state = self._checkpoint_state(epoch)
        last = self.ckpt_dir / "last.pt"
        if last.exists():  # keep the previous good one: a damaged last.pt falls back to it
            os.replace(last, self.ckpt_dir / "last.prev.pt")
        save_checkpoint(state, last)
        if is_best:
            save_checkpoint(state, self.ckpt_dir / "best.pt")

    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.setup()
        self.log(
            f"[stbp] {self.data.n_train} train / {self.data.n_val} val images, {env.world_size} rank(s) on "
            f"{self.device}, {'bf16 autocast' if self.amp_dtype else 'fp32'}, "
            f"{sum(p.numel() for p in self.raw_model.parameters()):,} parameters"
        )
        stopped_early = False
        try:
            for epoch in range(self.start_epoch, cfg.run.epochs):
                if cfg.run.patience and self.bad_epochs >= cfg.run.patience:
                    stopped_early = True
                    break
                t0 = time.perf_counter()
                metrics = self._train_epoch(epoch)
                metrics.update(self.evaluate("val", cfg.run.firing_rates))  # counted in evaluation only
                metrics["epoch_time_s"] = time.perf_counter() - t0
                metrics["epoch"] = epoch + 1
                improved = metrics["val_loss"] < self.best_val_loss
                self.best_val_loss = min(self.best_val_loss, metrics["val_loss"])
                self.bad_epochs = 0 if improved else self.bad_epochs + 1
                is_best = metrics["val_acc"] > self.best_val_acc
                self.best_val_acc = max(self.best_val_acc, metrics["val_acc"])
                self.history.append(metrics)
                if env.is_primary:
                    self._save(epoch + 1, is_best)
                    self.tracker.log_metrics(metrics, step=epoch + 1)
                    self.tracker.log_artifact(self.ckpt_dir / "last.pt", "checkpoints")
                    if is_best:
                        self.tracker.log_artifact(self.ckpt_dir / "best.pt", "checkpoints")
                self.log(
                    f"epoch {epoch + 1}/{cfg.run.epochs}  train loss {metrics['train_loss']:.4f} "
                    f"acc {metrics['train_acc']:.2f}%  val loss {metrics['val_loss']:.4f} "
                    f"acc {metrics['val_acc']:.2f}%  lr {metrics['lr']:.2e}  "
                    f"{metrics['images_per_s']:.0f} img/s  {metrics['epoch_time_s']:.1f}s", flush=True
                )
                barrier(env)
                if self.callback is not None:
                    self.callback(epoch + 1, dict(metrics), str(self.ckpt_dir) if env.is_primary else None)
            else:
                stopped_early = bool(cfg.run.patience and self.bad_epochs >= cfg.run.patience
                                     and len(self.history) < cfg.run.epochs)
            summary = self._finish(stopped_early)
        except BaseException:
            if env.is_primary and self.tracker.run_id and getattr(self.tracker, "owns_run", False):
                self.tracker.finish("FAILED")
            raise
        return summary

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        env = self.env
        if not self.history:
            raise RuntimeError("no epoch was trained (is the run already complete? see summary.json)")
        best = read_checkpoint(self.ckpt_dir / "best.pt", map_location=self.device)  # shared storage
        self.raw_model.load_state_dict(best["model"])
        test = self.evaluate("test", self.cfg.run.firing_rates)
        rates = {k[len("firing_rate/") :]: v for k, v in test.items() if k.startswith("firing_rate/")}
        summary = {
            "test_acc": test["test_acc"],
            "test_loss": test["test_loss"],
            "best_val_acc": self.best_val_acc,
            "best_epoch": int(best["epoch"]),
            "epochs_run": len(self.history),
            "stopped_early": stopped_early,
            "images_per_s": sum(m["images_per_s"] for m in self.history) / len(self.history),
            "world_size": env.world_size,
            "mlflow_run_id": self.mlflow_run_id,
            "firing_rates": rates,
            "output_dir": str(self.out),
        }
        if env.is_primary:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.tracker.log_metrics({"test_acc": test["test_acc"], "test_loss": test["test_loss"]},
                                     step=len(self.history))
            self.tracker.log_artifact(self.out / "summary.json")
            chart = _firing_rate_chart(rates, self.out / "firing_rates.png")
            if chart is not None:
                self.tracker.log_artifact(chart)
            self.tracker.finish("FINISHED")
            self.log(f"[stbp] test accuracy {test['test_acc']:.2f}% (best epoch {summary['best_epoch']}); "
                     f"summary in {self.out / 'summary.json'}")
        return summary


def _firing_rate_chart(rates: dict[str, float], path: Path) -> Path | None:
    """A bar chart of the mean firing rate per spiking layer (PNG), or None without matplotlib."""
    if not rates:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rates)), 4))
    ax.bar(range(len(rates)), list(rates.values()), color="tab:blue")
    ax.set_xticks(range(len(rates)), list(rates), rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("mean firing rate (spikes / neuron / step)")
    ax.set_title("Firing rate per spiking layer (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train(cfg: Config, callback: Callback | None = None) -> dict[str, Any]:
    """Train ResNet-19 on MNIST as ``cfg`` says; returns the summary (also written to ``summary.json``).

    ``callback(epoch, metrics, checkpoint_dir)`` runs on every rank after each epoch (``checkpoint_dir`` on rank
    0 only). Under torchrun or Ray Train the existing distributed environment is used.
    """
    env = setup_distributed(cfg.run.device)
    try:
        return _Trainer(cfg, env, callback).run()
    finally:
        teardown_distributed(env)
