"""The one training function: ``train(cfg)``. ``train_ddp.py`` and the Ray Tune trials both call it.

Per epoch: on-device shuffled shards -> :func:`train_step` with no host sync (metrics accumulate on the device; a
sync every ``log_interval`` steps checks for divergence and updates the display, :mod:`.progress`) -> one
all-reduce of sums and counts -> validation (:mod:`.evaluate`) -> :class:`EarlyStopping` -> checkpoints
(:mod:`.checkpoint`, rank 0) -> MLflow (:mod:`stbp.tracking.publishing`, rank 0) -> ``callback`` (every rank).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BOOKKEEPING_FIELDS, Config, ConfigError, config_to_dict, flatten_config
from ..core.learned import learned_means, learned_neurons, neuron_metrics
from ..core.model import channels_last, resnet19
from ..core.monitor import SPIKE_COST
from ..core.tdbn import convert_sync_tdbn
from ..data import FRAME_FIELDS, DeviceDataset, FrameSettings, check_frames, load_dataset
from ..data.catalog import DATASETS
from ..tracking.publishing import Publisher
from .checkpoint import CheckpointDir, CheckpointError, load_checkpoint, model_kwargs, read_checkpoint
from .distributed import DistEnv, all_reduce_sum, barrier, setup_distributed, teardown_distributed
from .evaluate import evaluate
from .progress import Progress
from .recipe import WeightEMA, amp_dtype, build_optimizer, lr_at

__all__ = [
    "train",
    "train_step",
    "tet_loss",
    "EarlyStopping",
    "TrainingDiverged",
    "Preempted",
    "Callback",
    "model_kwargs",
]

Callback = Callable[[int, dict[str, float], "str | None"], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite at ``epoch`` (1-based), ``step`` (1-based, within the epoch), ``lr``."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0, lr: float = float("nan")):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr

    def __reduce__(self):  # picklable with its fields: Ray sends it from a DDP rank to the trial
        return (type(self), (str(self), self.epoch, self.step, self.lr))


class Preempted(RuntimeError):
    """Training saw ``run.stop_file`` appear, saved last.pt mid-epoch (``epoch`` epochs and ``step`` steps done) and
    stopped: the same command resumes it exactly (what a SLURM job does on its warning signal, slurm/)."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.epoch, self.step = epoch, step

    def __reduce__(self):
        return (type(self), (str(self), self.epoch, self.step))


#: What continuing a run may change, since it stays the same experiment: how long it trains and stops, how it
#: runs and logs, where it records. A change of any other field (the model, loss, data, optimiser, seed) makes
#: another experiment, which a resume refuses rather than hide under the old run's name.
CONTINUABLE = (*BOOKKEEPING_FIELDS, "epochs", "patience", "log_interval", "eval_batch_size", "test_size", "amp")
CONTINUABLE += ("compile", "device", "fast_lif", "download", "firing_rates")


def experiment_changes(stored: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{section.field: (stored, now)}`` for each field that a run's stored config (nested, as in a checkpoint)
    and ``cfg`` set differently and that :data:`CONTINUABLE` does not allow."""
    now = config_to_dict(cfg)
    return {
        f"{section}.{name}": (before, now[section][name])
        for section, fields in stored.items()
        if isinstance(fields, dict) and isinstance(now.get(section), dict)
        for name, before in fields.items()
        if name not in CONTINUABLE and name in now[section] and now[section][name] != before
    }


def tet_loss(outputs: Tensor, labels: Tensor, lamb: float, phi: float, label_smoothing: float = 0.0) -> Tensor:
    """TET's loss (Deng et al. 2022, eq. 8-10) of per-step outputs ``[T, N, C]``: the cross-entropy of every time
    step's output, averaged over steps, weighted ``1 - lamb``, plus ``lamb`` x the mean squared distance of the
    outputs from ``phi`` (the regulariser that keeps them from growing without bound)."""
    ce = F.cross_entropy(outputs.flatten(0, 1), labels.repeat(outputs.shape[0]), label_smoothing=label_smoothing)
    return (1 - lamb) * ce + lamb * F.mse_loss(outputs, torch.full_like(outputs, phi))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    amp: torch.dtype | None = None,
    grad_clip: float | None = None,
    tet: tuple[float, float] | None = None,
    label_smoothing: float = 0.0,
    rate: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimisation step: forward (under ``amp`` autocast when given), the loss in fp32 (cross-entropy of the
    time-mean output, or with ``tet = (lamb, phi)`` :func:`tet_loss`; either with ``label_smoothing``; with
    ``rate = (target, weight)`` plus ``weight * sum_l (rate_l - target)^2`` over the spiking layers' mean firing
    rates), backward, optional gradient-norm clipping, optimizer step. Returns the detached loss and time-mean
    logits; no host sync."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        options = {"per_step": True} if tet else {}  # (only what is used: the benchmarks' other models)
        outputs = model(x, **options, **({"rates": True} if rate else {}))
        if rate:
            outputs, rates = outputs
        if tet is None:
            logits = outputs.float()
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        else:
            outputs = outputs.float()
            loss, logits = tet_loss(outputs, y, *tet, label_smoothing=label_smoothing), outputs.mean(0)
        if rate:
            loss = loss + rate[1] * (rates - rate[0]).square().sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), logits.detach()


class EarlyStopping:
    """Stop after ``patience`` epochs in a row without a lower validation loss (``patience=0``: never)."""

    def __init__(self, patience: int):
        self.patience, self.best_val_loss, self.bad_epochs = patience, math.inf, 0

    def update(self, val_loss: float) -> None:
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "bad_epochs": self.bad_epochs, "patience": self.patience}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val_loss, self.bad_epochs = float(state["best_val_loss"]), int(state["bad_epochs"])


class _Trainer:
    def __init__(self, cfg: Config, env: DistEnv, callback: Callback | None):
        self.cfg, self.env, self.callback = cfg, env, callback
        self.device = env.device
        self.out = Path(cfg.run.output_dir).resolve()
        self.ckpts = CheckpointDir(self.out / "checkpoints")
        self.amp = amp_dtype(cfg, self.device)
        self.stopping = EarlyStopping(cfg.run.patience)
        self.tet = (cfg.optim.tet_lambda, cfg.optim.tet_phi) if cfg.optim.loss == "tet" else None
        self.rate = (cfg.optim.rate_target, cfg.optim.rate_weight) if cfg.optim.rate_weight else None
        self.start_epoch, self.history, self.best_val_acc = 0, [], -1.0
        self.start_step, self.partial = 0, None  # where a mid-epoch checkpoint stopped, its epoch's sums so far
        self.log = print if env.is_primary else (lambda *a, **k: None)
        self.progress = Progress(env.is_primary, cfg.run.epochs, cfg.run.batch_size)
        self.mlflow_run_id: str | None = cfg.tracking.run_id
        # Made by setup(), before the first step.
        self.data: DeviceDataset | None = None
        self.steps = 0  # training steps an epoch
        self.raw_model: nn.Module | None = None  # the network itself; model is what trains it (DDP, compiled)
        self.model: nn.Module | None = None
        self.ema: WeightEMA | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.publisher: Publisher | None = None

    # ---- set-up: everything that can refuse happens before the first step ----------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.run.batch_size % self.env.world_size:  # the global batch is split evenly over the ranks
            raise ConfigError(
                f"run.batch_size ({cfg.run.batch_size}) is not divisible by the {self.env.world_size} ranks"
            )
        spec = DATASETS[cfg.data.dataset]
        if cfg.model.in_channels != spec.channels or cfg.model.num_classes < spec.classes:
            raise ConfigError(
                f"{spec.name} has {spec.channels}-channel images of {spec.classes} classes: the model's "
                f"in_channels {cfg.model.in_channels} and num_classes {cfg.model.num_classes} do not fit"
            )
        frames = FrameSettings.of(cfg)
        check_frames(spec.name, frames)  # on every rank, before any file is read
        state = self._resume_state()
        if cfg.run.stop_file and self.env.is_primary:  # a stop request from before this start is answered already
            Path(cfg.run.stop_file).unlink(missing_ok=True)
        self.data = self._load_data(spec, frames if spec.events else None)
        self.steps = self.data.num_train_steps(cfg.run.batch_size, self.env.world_size)  # refuses too few batches
        self._build_model()
        self.optimizer = build_optimizer(cfg, self.raw_model)
        if state is not None:
            self._restore(state)
        self.publisher = Publisher(self._open_tracker(), self.out, self.ckpts)

    def _load_data(self, spec, frames: FrameSettings | None) -> DeviceDataset:
        cfg, env = self.cfg, self.env
        if env.is_primary:  # rank 0 may download (or integrate event frames); the others wait and then read
            tensors = load_dataset(spec.name, cfg.data.data_dir, download=cfg.data.download, frames=frames)
        barrier(env)
        if not env.is_primary:
            tensors = load_dataset(spec.name, cfg.data.data_dir, download=False, frames=frames)
        if cfg.data.test_size:
            n = cfg.data.test_size
            tensors = tensors._replace(test_images=tensors.test_images[:n], test_labels=tensors.test_labels[:n])
        return DeviceDataset(
            tensors,
            self.device,
            val_size=cfg.data.val_size,
            train_size=cfg.data.train_size,
            seed=cfg.run.seed,
            spec=spec,
        )

    def _build_model(self) -> None:
        """The network (seeded), its EMA, and what trains it: DDP across ranks, torch.compile when asked."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.run.seed)
        self.raw_model = resnet19(**model_kwargs(cfg)).to(self.device, memory_format=torch.channels_last)
        if cfg.model.sync_bn and env.world_size > 1:
            convert_sync_tdbn(self.raw_model)
        self.ema = WeightEMA(self.raw_model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        model: nn.Module = self.raw_model
        if env.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.run.compile and self.device.type == "cpu" and env.is_primary:
            warnings.warn(
                "compile=true on a CPU: torch.compile (inductor) made this model's training step 5-6x "
                "slower than eager on an AVX2 CPU (torch 2.14; BENCHMARKS.md). It is meant for CUDA.",
                stacklevel=3,
            )
        self.model = torch.compile(model) if cfg.run.compile else model

    def _resume_state(self) -> dict | None:
        resume = self.cfg.run.resume
        if resume == "never":
            return None
        found = self.ckpts.load_latest() if resume == "auto" else (read_checkpoint(resume), resume)
        if found is None:
            return None
        state, path = found
        changed = experiment_changes(state.get("config") or {"model": state.get("model_kwargs", {})}, self.cfg)
        if changed:
            raise CheckpointError(
                f"cannot resume from {path}: that run is another experiment ("
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                + "). Train the new setting in a new directory (--output_dir NEW), or start this one over "
                "(--resume never); more epochs, patience and logging may change on a resume"
            )
        return state

    def _restore(self, state: dict) -> None:
        self.raw_model.load_state_dict(state.get("train_model", state["model"]))
        if self.ema is not None:  # "model" holds the EMA's weights when the checkpoint was trained with one
            self.ema.load_state_dict({"module": state["model"], "updates": state.get("ema_updates", 0)})
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.start_step, self.partial = int(state.get("step", 0)), state.get("partial")
        self.stopping.load_state_dict(state["early_stopping"])
        self.best_val_acc = float(state["best_val_acc"])
        self.history = list(state["metrics"])
        self.mlflow_run_id = self.mlflow_run_id or state.get("mlflow_run_id")
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        within = f", step {self.start_step} of epoch {self.start_epoch + 1}" if self.start_step else ""
        self.log(f"[stbp] resumed from epoch {self.start_epoch}{within} ({self.ckpts.path})")

    def _open_tracker(self):
        from ..tracking import NullTracker, git_commit, make_tracker

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
        tracker = make_tracker(
            cfg.tracking.mlflow,
            cfg.tracking.tracking_uri,
            cfg.tracking.experiment,
            run_id=self.mlflow_run_id,
            run_name=cfg.tracking.run_name,
            tags=tags,
            pending_path=self.out / "mlflow_pending.jsonl",
        )
        self.mlflow_run_id = tracker.run_id
        flat = flatten_config(cfg)
        # The frame settings are parameters of event runs only; their split_hash names the exact train and test
        # samples, so that only runs on the same split are compared.
        skip = BOOKKEEPING_FIELDS if self.data.split_hash else (*BOOKKEEPING_FIELDS, *FRAME_FIELDS)
        params = {k: v for k, v in flat.items() if k not in skip}
        tracker.log_params({**params, **({"split_hash": self.data.split_hash} if self.data.split_hash else {})})
        tracker.set_tags({k: str(flat[k]) for k in ("output_dir", "data_dir") if flat[k] is not None})
        return tracker

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.setup()
        self.log(
            f"[stbp] {cfg.data.dataset}: {self.data.n_train} train / {self.data.n_val} val images, "
            f"{env.world_size} rank(s) on {self.device}, {'bf16 autocast' if self.amp else 'fp32'}, "
            f"{sum(p.numel() for p in self.raw_model.parameters()):,} parameters"
        )
        try:
            return self._finish(stopped_early=self._train_epochs())
        except Preempted:
            if env.is_primary:
                self.publisher.stopped()
            raise
        except BaseException:
            if env.is_primary:
                self.publisher.failed()
            raise

    def _train_epochs(self) -> bool:
        """Train from ``start_epoch`` on, validating, checkpointing and publishing each epoch; whether early
        stopping ended the run."""
        cfg, env = self.cfg, self.env
        for epoch in range(self.start_epoch, cfg.run.epochs):
            if self.stopping.should_stop:
                return True
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            t_val = time.perf_counter()
            metrics.update(self.evaluate("val"), val_time_s=time.perf_counter() - t_val)
            metrics.update(epoch_time_s=time.perf_counter() - t0, epoch=epoch + 1)
            metrics.update(neuron_metrics(learned_neurons(self.eval_model)), **learned_means(self.eval_model))
            self.stopping.update(metrics["val_loss"])
            is_best = metrics["val_acc"] > self.best_val_acc
            self.best_val_acc = max(self.best_val_acc, metrics["val_acc"])
            self.history.append(metrics)
            if env.is_primary:
                self.ckpts.save(self._state(epoch + 1), best=is_best)
                self.publisher.epoch(epoch + 1, metrics, self.history, is_best)
            self.progress.epoch_done(metrics)
            barrier(env)
            if self.callback is not None:
                self.callback(epoch + 1, dict(metrics), str(self.ckpts.path) if env.is_primary else None)
        return self.stopping.should_stop and len(self.history) < cfg.run.epochs

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, env, dev = self.cfg, self.env, self.device
        self.model.train()
        first = self.start_step if epoch == self.start_epoch else 0  # > 0: resumed mid-epoch
        done = self.partial if first and self.partial is not None else (0.0, 0, 0)  # all ranks' sums so far
        sums = done if env.is_primary else (0.0, 0, 0)  # counted once in the all-reduce below
        loss_sum = torch.tensor(float(sums[0]), device=dev, dtype=torch.float64)
        correct = torch.tensor(int(sums[1]), device=dev, dtype=torch.int64)
        first_bad = torch.full((), -1, device=dev, dtype=torch.int64)
        seen = int(sums[2])
        batches = self.data.train_batches(
            epoch,
            cfg.run.batch_size,
            env.world_size,
            env.rank,
            padding=cfg.data.crop_padding,
            hflip=cfg.data.hflip,
            seed=cfg.run.seed,
            start_step=first,
        )
        self.progress.start(epoch, self.steps)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(batches, first):
            lr = lr_at(cfg, epoch + step / self.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(
                self.model,
                self.optimizer,
                channels_last(x),
                y,
                self.amp,
                cfg.optim.grad_clip,
                self.tet,
                cfg.optim.label_smoothing,
                self.rate,
            )
            if self.ema is not None:
                self.ema.update()
            # Device-side bookkeeping only: no .item() in the step.
            loss_sum += loss.double() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            seen += y.shape[0]
            if (step + 1) % cfg.run.log_interval == 0 or step + 1 == self.steps:
                self._check_divergence(first_bad, epoch, lr)  # the one sync per log interval
                self.progress.update(step + 1, loss_sum.item() / seen, lr, time.perf_counter() - t0)
                if step + 1 < self.steps and self._stop_requested():
                    self._stop(epoch, step + 1, torch.stack([loss_sum, correct.double(), loss_sum.new_tensor(seen)]))
        self.progress.close()
        totals = all_reduce_sum(
            torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=dev, dtype=torch.float64)]), env
        ).tolist()
        elapsed = time.perf_counter() - t0
        return {
            "train_loss": totals[0] / totals[2],
            "train_acc": 100.0 * totals[1] / totals[2],
            "images_per_s": (totals[2] - done[2]) / elapsed,
            "lr": lr,
        }

    def _stop_requested(self) -> bool:
        """Whether ``run.stop_file`` exists (as rank 0 sees it; every rank gets its answer: one collective)."""
        if self.cfg.run.stop_file is None:
            return False
        seen = self.env.is_primary and Path(self.cfg.run.stop_file).exists()
        return bool(all_reduce_sum(torch.tensor([float(seen)], device=self.device), self.env).item())

    def _stop(self, epoch: int, step: int, sums: Tensor) -> None:
        """Save last.pt ``step`` steps into epoch ``epoch`` (0-based) with the epoch's sums so far over all ranks
        (loss x images, correct, images), and stop."""
        loss, correct, seen = all_reduce_sum(sums, self.env).tolist()
        if self.env.is_primary:
            self.ckpts.save(self._state(epoch, step, (loss, int(correct), int(seen))), best=False)
            Path(self.cfg.run.stop_file).unlink(missing_ok=True)
        barrier(self.env)
        raise Preempted(f"stopped at step {step} of epoch {epoch + 1} on {self.cfg.run.stop_file}", epoch, step)

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

    @property
    def eval_model(self) -> nn.Module:
        return self.raw_model if self.ema is None else self.ema.module

    def evaluate(self, split: str) -> dict[str, float]:
        batches = self.data.eval_batches(split, self.cfg.run.eval_batch_size, self.env.world_size, self.env.rank)
        return evaluate(
            self.eval_model, batches, split, amp=self.amp, env=self.env, firing_rates=self.cfg.run.firing_rates
        )  # counted in evaluation only

    def _state(self, epoch: int, step: int = 0, partial: tuple | None = None) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model_kwargs": model_kwargs(self.cfg),
            "model": self.eval_model.state_dict(),  # what evaluation scores: best.pt is the model to use
            **({"train_model": self.raw_model.state_dict(), "ema_updates": self.ema.updates} if self.ema else {}),
            "config": config_to_dict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            **({"step": step, "partial": list(partial)} if step else {}),
            "early_stopping": self.stopping.state_dict(),
            "best_val_acc": self.best_val_acc,
            "metrics": self.history,
            "rng": rng,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        if not self.history:
            raise RuntimeError("no epoch was trained (is the run already complete? see summary.json)")
        best = read_checkpoint(self.ckpts.best, map_location=self.device)  # shared storage
        self.eval_model.load_state_dict(best["model"])
        test = self.evaluate("test")
        rates = {k[len("firing_rate/") :]: v for k, v in test.items() if k.startswith("firing_rate/")}
        summary = {
            "test_acc": test["test_acc"],
            "test_loss": test["test_loss"],
            "best_val_acc": self.best_val_acc,
            "best_epoch": int(best["epoch"]),
            "epochs_run": len(self.history),
            "stopped_early": stopped_early,
            "images_per_s": sum(m["images_per_s"] for m in self.history) / len(self.history),
            "world_size": self.env.world_size,
            "mlflow_run_id": self.mlflow_run_id,
            **({"split_hash": self.data.split_hash} if self.data.split_hash else {}),
            **{k: test[k] for k in SPIKE_COST if k in test},  # on the test set
            "firing_rates": rates,
            **({"learned_neurons": learned} if (learned := learned_neurons(self.eval_model)) else {}),
            "output_dir": str(self.out),
        }
        if self.env.is_primary:
            if name := self.cfg.tracking.register_model:
                summary["registered_model"] = self._register(name)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.publisher.finish(len(self.history), test, rates, self.out / "summary.json", self.history)
            cost = (
                f", {test['sops_per_image']:,.0f} synaptic operations per image ({test['energy_uj_per_image']:.3f} uJ)"
                if "sops_per_image" in test
                else ""
            )
            self.log(
                f"[stbp] test accuracy {test['test_acc']:.2f}% (best epoch {summary['best_epoch']}){cost}; "
                f"model {self.ckpts.best}; summary in {self.out / 'summary.json'}"
            )
        return summary

    def _register(self, name: str) -> str | None:
        """best.pt in the MLflow Model Registry as a new version of ``name``; its URI (None without MLflow)."""
        model, cfg = load_checkpoint(self.ckpts.best)
        found = self.publisher.register(name, self.mlflow_run_id, model, cfg)
        if found is None:
            return None
        self.log(f'[stbp] registered as {found["model_uri"]}: mlflow.pytorch.load_model("models:/{name}/latest")')
        return found["model_uri"]


def train(cfg: Config, callback: Callback | None = None) -> dict[str, Any]:
    """Train ResNet-19 on ``cfg.data.dataset`` as ``cfg`` says; returns the summary (also written to ``summary.json``).

    ``callback(epoch, metrics, checkpoint_dir)`` runs on every rank after each epoch (``checkpoint_dir`` on rank
    0 only). Under torchrun or Ray Train the existing distributed environment is used.
    """
    env = setup_distributed(cfg.run.device)
    try:
        return _Trainer(cfg, env, callback).run()
    finally:
        teardown_distributed(env)
