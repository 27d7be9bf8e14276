"""The one training function: ``train(cfg)``. ``train_ddp.py`` and the Ray Tune trials both call it.

Per epoch: on-device shuffled shards -> :func:`~.step.train_step` with no host sync (:class:`~.step.EpochSums`
accumulate on the device; a sync every ``log_interval`` steps checks for divergence and updates the display,
:mod:`.progress`) -> one all-reduce of sums and counts -> validation (:mod:`.evaluate`) -> early stopping ->
checkpoints (:mod:`.checkpoint` and :mod:`.resume`, rank 0) -> MLflow (:mod:`stbp.tracking.publishing`, rank 0) ->
``callback`` (every rank).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, ConfigError, apply_overrides
from ..core.learned import learned_means, learned_neurons, neuron_metrics
from ..core.model import build_network, channels_last
from ..core.monitor import SPIKE_COST
from ..core.tdbn import convert_sync_tdbn
from ..data import DeviceDataset, FrameSettings, check_frames, load_dataset
from ..data.catalog import DATASETS, DatasetSpec
from ..data.folders import FolderIndex, folder_index, folder_root
from ..data.stream import StreamedDataset, default_workers
from ..tracking import open_training_run
from ..tracking.publishing import Publisher
from .checkpoint import CheckpointDir, load_checkpoint, model_kwargs, read_checkpoint
from .distributed import DistEnv, all_reduce_sum, barrier, setup_distributed, teardown_distributed
from .evaluate import evaluate
from .progress import Progress
from .recipe import WeightEMA, amp_dtype, build_optimizer, lr_at
from .resume import EarlyStopping, Preempted, RunState, checkpoint_state, restore, resume_state
from .step import EpochSums, LossOptions, check_divergence, train_step

__all__ = ["train", "Callback", "Trainer"]

Callback = Callable[[int, dict[str, float], "str | None"], None]


def folder_listing(cfg: Config, env: DistEnv, spec: DatasetSpec) -> tuple[Config, FolderIndex | None]:
    """An image folder's (or ImageNet's) file index, and ``cfg`` with the classes it has and its image size; rank 0
    prepares ImageNet from its archives when only those are there, then every rank lists the folder (or reads the
    index a sweep wrote). ``(cfg, None)`` for the data sets held in memory."""
    if not spec.streamed:
        return cfg, None
    d = cfg.data
    if env.is_primary:
        folder_root(spec, d.data_dir, prepare=True)
    barrier(env)
    index = folder_index(spec.name, d.data_dir, d.classes, d.file_index, prepare=False)
    return apply_overrides(cfg, {"num_classes": len(index.classes), "image_size": d.image_size or spec.size}), index


def streamed_dataset(cfg: Config, env: DistEnv, spec: DatasetSpec, index: FolderIndex) -> StreamedDataset:
    """The folder ``index`` lists, streamed to this rank's device by its decoding processes."""
    d = cfg.data
    workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if d.workers is None else d.workers
    return StreamedDataset(
        index, env.device, spec=spec, image_size=d.image_size, val_size=d.val_size, train_size=d.train_size,
        test_size=d.test_size, seed=cfg.run.seed, workers=workers,
    )  # fmt: skip


def check_shapes(cfg: Config, spec: DatasetSpec) -> None:
    """The model's input channels and classes fit the data set's (checked before any file is read)."""
    if cfg.model.in_channels != spec.channels or cfg.model.num_classes < spec.classes:
        raise ConfigError(
            f"{spec.name} has {spec.channels}-channel images of {spec.classes} classes: the model's "
            f"in_channels {cfg.model.in_channels} and num_classes {cfg.model.num_classes} do not fit"
        )


def device_dataset(cfg: Config, env: DistEnv, spec, frames: FrameSettings | None) -> DeviceDataset:
    """``cfg``'s data set on this rank's device: rank 0 reads it first (it may download it or integrate event
    frames), the others then read what it left."""
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
        env.device,
        val_size=cfg.data.val_size,
        train_size=cfg.data.train_size,
        seed=cfg.run.seed,
        spec=spec,
    )


class Trainer:
    """One run of ``cfg`` on this rank (``env``): :meth:`setup` refuses what it can before the first step, then
    :meth:`run` trains, validates, checkpoints and publishes each epoch and tests the best model at the end."""

    def __init__(self, cfg: Config, env: DistEnv, callback: Callback | None):
        self.cfg, self.env, self.callback = cfg, env, callback
        self.device = env.device
        self.out = Path(cfg.run.output_dir).resolve()
        self.ckpts = CheckpointDir(self.out / "checkpoints")
        self.amp = amp_dtype(cfg, self.device)
        self.loss = LossOptions.of(cfg)
        self.state = RunState(EarlyStopping(cfg.run.patience), mlflow_run_id=cfg.tracking.run_id)
        self.log = print if env.is_primary else (lambda *a, **k: None)
        self.progress = Progress(env.is_primary, cfg.run.epochs, cfg.run.batch_size)
        # Made by setup(), before the first step.
        self.data: DeviceDataset | StreamedDataset | None = None
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
        check_shapes(cfg, spec)
        cfg, index = folder_listing(cfg, self.env, spec)  # an image folder's classes are its own
        self.cfg = cfg
        frames = FrameSettings.of(cfg)
        check_frames(spec.name, frames)  # on every rank, before any file is read
        saved = resume_state(cfg, self.ckpts)
        if cfg.run.stop_file and self.env.is_primary:  # a stop request from before this start is answered already
            Path(cfg.run.stop_file).unlink(missing_ok=True)
        if index is not None:
            self.data = streamed_dataset(cfg, self.env, spec, index)
        else:
            self.data = device_dataset(cfg, self.env, spec, frames if spec.events else None)
        self.steps = self.data.num_train_steps(cfg.run.batch_size, self.env.world_size)  # refuses too few batches
        self._build_model()
        self.optimizer = build_optimizer(cfg, self.raw_model)
        if saved is not None:
            restore(saved, self.raw_model, self.ema, self.optimizer, self.state, self.device)
            run = self.state
            within = f", step {run.start_step} of epoch {run.start_epoch + 1}" if run.start_step else ""
            self.log(f"[stbp] resumed from epoch {run.start_epoch}{within} ({self.ckpts.path})")
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        tracker = open_training_run(
            cfg, primary=self.env.is_primary, world_size=self.env.world_size, device=device,
            run_id=self.state.mlflow_run_id, split_hash=self.data.split_hash, out=self.out,
        )  # fmt: skip
        self.state.mlflow_run_id = tracker.run_id
        self.publisher = Publisher(tracker, self.out, self.ckpts).caught_up(self.state.history)

    def _build_model(self) -> None:
        """The network (seeded), its EMA, and what trains it: DDP across ranks, torch.compile when asked."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.run.seed)
        self.raw_model = build_network(**model_kwargs(cfg)).to(self.device, memory_format=torch.channels_last)
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
                "compile=true on a CPU: torch.compile (inductor) made this model's training step several times "
                "slower than eager on an AVX2 CPU (BENCHMARKS.md, 'torch.compile'). It is meant for CUDA.",
                stacklevel=3,
            )
        self.model = torch.compile(model) if cfg.run.compile else model

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
        """Train from the run's ``start_epoch`` on, validating, checkpointing and publishing each epoch; whether
        early stopping ended the run."""
        cfg, env, run = self.cfg, self.env, self.state
        for epoch in range(run.start_epoch, cfg.run.epochs):
            if run.stopping.should_stop:
                return True
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            t_val = time.perf_counter()
            metrics.update(self.evaluate("val"), val_time_s=time.perf_counter() - t_val)
            metrics.update(epoch_time_s=time.perf_counter() - t0, epoch=epoch + 1)
            metrics.update(neuron_metrics(learned_neurons(self.eval_model)), **learned_means(self.eval_model))
            run.stopping.update(metrics["val_loss"])
            is_best = metrics["val_acc"] > run.best_val_acc
            run.best_val_acc = max(run.best_val_acc, metrics["val_acc"])
            run.history.append(metrics)
            if env.is_primary:
                self.ckpts.save(self._checkpoint(epoch + 1), best=is_best)
                self.publisher.epoch(epoch + 1, metrics, run.history, is_best)
            self.progress.epoch_done(metrics)
            barrier(env)
            if self.callback is not None:
                self.callback(epoch + 1, dict(metrics), str(self.ckpts.path) if env.is_primary else None)
        return run.stopping.should_stop and len(run.history) < cfg.run.epochs

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        self.model.train()
        first = self.state.start_step if epoch == self.state.start_epoch else 0  # > 0: resumed mid-epoch
        done = self.state.partial if first and self.state.partial is not None else (0.0, 0, 0)  # all ranks' sums
        sums = EpochSums(self.device, *(done if env.is_primary else ()))  # counted once in the all-reduce below
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
        for step, (x, y) in enumerate(self.progress.timed(batches), first):
            lr = lr_at(cfg, epoch + step / self.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(
                self.model, self.optimizer, channels_last(x), y, self.amp, cfg.optim.grad_clip, self.loss
            )
            if self.ema is not None:
                self.ema.update()
            sums.add(step, loss, logits, y)  # on the device: no .item() in the step
            if (step + 1) % cfg.run.log_interval == 0 or step + 1 == self.steps:
                check_divergence(sums.first_bad, epoch, lr, env.world_size)  # the one sync per log interval
                self.progress.update(step + 1, sums.mean_loss(), lr, time.perf_counter() - t0)
                if step + 1 < self.steps and self._stop_requested():
                    self._stop(epoch, step + 1, sums.stacked())
        self.progress.close()
        loss, correct, seen = all_reduce_sum(sums.stacked(), env).tolist()
        return {
            "train_loss": loss / seen,
            "train_acc": 100.0 * correct / seen,
            "images_per_s": (seen - done[2]) / (time.perf_counter() - t0),
            "data_wait": self.progress.waited / (time.perf_counter() - t0),
            "lr": lr,
        }

    def _stop_requested(self) -> bool:
        """Whether ``run.stop_file`` exists (as rank 0 sees it; every rank gets its answer: one collective)."""
        if self.cfg.run.stop_file is None:
            return False
        seen = self.env.is_primary and Path(self.cfg.run.stop_file).exists()
        return bool(all_reduce_sum(torch.tensor([float(seen)], device=self.device), self.env).item())

    def _stop(self, epoch: int, step: int, sums: torch.Tensor) -> None:
        """Save last.pt ``step`` steps into epoch ``epoch`` (0-based) with the epoch's sums so far over all ranks
        (loss x images, correct, images), and stop."""
        loss, correct, seen = all_reduce_sum(sums, self.env).tolist()
        if self.env.is_primary:
            self.ckpts.save(self._checkpoint(epoch, step, (loss, int(correct), int(seen))), best=False)
            Path(self.cfg.run.stop_file).unlink(missing_ok=True)
        barrier(self.env)
        raise Preempted(f"stopped at step {step} of epoch {epoch + 1} on {self.cfg.run.stop_file}", epoch, step)

    @property
    def eval_model(self) -> nn.Module:
        return self.raw_model if self.ema is None else self.ema.module

    def evaluate(self, split: str) -> dict[str, float]:
        batches = self.data.eval_batches(split, self.cfg.run.eval_batch_size, self.env.world_size, self.env.rank)
        return evaluate(
            self.eval_model, batches, split, amp=self.amp, env=self.env, firing_rates=self.cfg.run.firing_rates
        )  # counted in evaluation only

    def _checkpoint(self, epoch: int, step: int = 0, partial: tuple | None = None) -> dict[str, Any]:
        return checkpoint_state(
            self.cfg, self.state, self.raw_model, self.ema, self.optimizer, self.device, epoch, step, partial
        )

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        history = self.state.history
        if not history:
            raise RuntimeError("no epoch was trained (is the run already complete? see summary.json)")
        best = read_checkpoint(self.ckpts.best, map_location=self.device)  # shared storage
        self.eval_model.load_state_dict(best["model"])
        test = self.evaluate("test")
        rates = {k[len("firing_rate/") :]: v for k, v in test.items() if k.startswith("firing_rate/")}
        summary = {
            "test_acc": test["test_acc"],
            "test_loss": test["test_loss"],
            "best_val_acc": self.state.best_val_acc,
            "best_epoch": int(best["epoch"]),
            "epochs_run": len(history),
            "stopped_early": stopped_early,
            "images_per_s": sum(m["images_per_s"] for m in history) / len(history),
            "world_size": self.env.world_size,
            "mlflow_run_id": self.state.mlflow_run_id,
            **({"split_hash": self.data.split_hash} if self.data.split_hash else {}),
            **{k: test[k] for k in SPIKE_COST if k in test},  # on the test set
            "firing_rates": rates,
            **({"learned_neurons": learned} if (learned := learned_neurons(self.eval_model)) else {}),
            "output_dir": str(self.out),
        }
        if self.env.is_primary:
            self._publish(summary, test, rates)
        return summary

    def _publish(self, summary: dict[str, Any], test: dict[str, float], rates: dict[str, float]) -> None:
        """The end of the run on rank 0: the model registered when asked, summary.json, MLflow, the last line."""
        if name := self.cfg.tracking.register_model:  # best.pt as a new version of the model (None without MLflow)
            found = self.publisher.register(name, self.state.mlflow_run_id, *load_checkpoint(self.ckpts.best))
            summary["registered_model"] = found and found["model_uri"]
            if found:
                self.log(
                    f'[stbp] registered as {found["model_uri"]}: mlflow.pytorch.load_model("models:/{name}/latest")'
                )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        history = self.state.history
        self.publisher.finish(len(history), test, rates, self.out / "summary.json", history)
        cost = (
            f", {test['sops_per_image']:,.0f} synaptic operations per image ({test['energy_uj_per_image']:.3f} uJ)"
            if "sops_per_image" in test
            else ""
        )
        self.log(
            f"[stbp] test accuracy {test['test_acc']:.2f}% (best epoch {summary['best_epoch']}){cost}; "
            f"model {self.ckpts.best}; summary in {self.out / 'summary.json'}"
        )


def train(cfg: Config, callback: Callback | None = None) -> dict[str, Any]:
    """Train ResNet-19 on ``cfg.data.dataset`` as ``cfg`` says; returns the summary (also written to ``summary.json``).

    ``callback(epoch, metrics, checkpoint_dir)`` runs on every rank after each epoch (``checkpoint_dir`` on rank
    0 only). Under torchrun or Ray Train the existing distributed environment is used.
    """
    env = setup_distributed(cfg.run.device)
    try:
        return Trainer(cfg, env, callback).run()
    finally:
        teardown_distributed(env)
