"""A trial, run in a Ray worker: the one training function, :func:`stbp.train.train`, with the sweep's base config
plus the trial's sampled values, reporting each epoch (and its checkpoints) to Tune. With ``resources.workers > 1``
the trial drives a Ray Train ``TorchTrainer`` whose ranks train under DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, apply_overrides, config_from_dict, config_to_dict
from ..core.monitor import SPIKE_COST
from ..train.checkpoint import CheckpointDir
from .record import POINT_TAG, REPLICATE_TAG, SweepRecord, child_run, fail_child
from .spec import Resources

__all__ = ["TrialPlan", "stbp_trial", "trial_config", "trial_resources", "trial_dirname", "restore_checkpoint"]

#: Reported to Tune in this order: its live table shows the first four.
TUNE_METRICS = (
    "val_acc",
    "val_loss",
    "train_acc",
    "train_loss",
    "epoch",
    "lr",
    "epoch_time_s",
    "images_per_s",
    *SPIKE_COST,
)


@dataclass(frozen=True)
class TrialPlan:
    """What every trial needs, pickled to the trial processes."""

    base: Config  # the sweep's base training config
    sweep_dir: str
    record: SweepRecord
    resources: Resources
    keep_checkpoints: int
    data_dir: str
    metrics: tuple[str, ...]  # what Tune's scheduler and searcher read from every trial's results
    repeats: int = 1  # trainings of every sampled point


#: What the searcher (:class:`stbp.sweep.searcher.PointSearcher`) adds to a trial's sampled values.
POINT_KEY, REPLICATE_KEY = "__point__", "__trial_index__"


def split_params(params: dict) -> tuple[dict, int, int]:
    """A trial's sampled values (numpy scalars as Python ones), its point's number (1, 2, ...; 0 where the
    searcher numbered none) and its replicate (0, 1, ...)."""
    values = {k: v.item() if hasattr(v, "item") else v for k, v in params.items()}
    return values, int(values.pop(POINT_KEY, 0)), int(values.pop(REPLICATE_KEY, 0))


def trial_title(sweep_name: str, values: dict, point: int, replicate: int, repeats: int) -> str:
    """What the runs table shows: ``smoke-03 v_th=0.4 aa=0.5`` (``#2`` for a second replicate)."""
    shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return f"{sweep_name}-{point:02d} {shown}" + (f" #{replicate + 1}" if repeats > 1 else "")


def trial_config(plan: TrialPlan, params: dict, trial_dir: Path, run_id: str, run_name: str) -> Config:
    """The base config with the trial's values; its outputs in the trial's directory, its run in MLflow; the
    replicates of a point train from the seeds ``seed``, ``seed + 1``, ..."""
    values, _, replicate = split_params(params)
    values.update(
        seed=values.get("seed", plan.base.run.seed) + replicate,
        output_dir=str(trial_dir / "train"),
        resume="auto",  # a retried or restored trial continues from its checkpoint
        run_id=run_id,
        run_name=run_name,
        tracking_uri=plan.record.tracking_uri,
        mlflow=True,
        data_dir=plan.data_dir,  # absolute: trials run in their own working directories
        # Which worker process ran it: workers are reused from trial to trial (reuse_actors).
        tags={**plan.base.tracking.tags, "worker_pid": str(os.getpid())},
    )
    return apply_overrides(plan.base, values)


def stbp_trial(params: dict, plan: TrialPlan) -> None:
    """One trial: open its child run, then train (here, or under DDP when ``workers > 1``)."""
    from ray import tune

    from ..train import TrainingDiverged, train

    ctx = tune.get_context()
    # Trial outputs live in the trial's directory of the sweep (not Ray's per-session staging directory),
    # so that a resumed sweep finds them.
    trial_dir = Path(plan.sweep_dir) / Path(ctx.get_trial_dir()).name
    values, point, replicate = split_params(params)
    title = trial_title(plan.record.sweep_name, values, point, replicate, plan.repeats)
    tags = {POINT_TAG: f"{point:02d}", REPLICATE_TAG: str(replicate)} if point else {}
    run_id = child_run(plan.record, ctx.get_trial_id(), title, values, tags)
    cfg = trial_config(plan, params, trial_dir, run_id, title)
    try:
        if plan.resources.workers == 1:
            restore_checkpoint(tune.get_checkpoint(), cfg)
            train(cfg, callback=_report_to_tune)
        else:
            _fit_ddp(plan, cfg, trial_dir)
    except TrainingDiverged as exc:
        # Deterministic: a retry from the last checkpoint (failures.max_failures) would diverge again. The
        # trial ends here, its run FAILED with the reason, and the sweep goes on.
        fail_child(plan.record, run_id, f"TrainingDiverged: {exc}")
        print(f"[sweep] trial {ctx.get_trial_name()} diverged, not retried: {exc}", flush=True)
        # Tune needs the metric in a trial's last result (even one that diverged before its first report); NaN
        # makes Optuna record the trial as failed rather than as a value to learn from.
        tune.report({**dict.fromkeys(plan.metrics, float("nan")), "epoch": exc.epoch})


def _report(report, checkpoint_cls, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    """Report Tune's metrics (firing rates go to MLflow only) and a copy of the checkpoints (Ray moves what it
    persists)."""
    metrics = {k: metrics[k] for k in TUNE_METRICS if k in metrics}
    if checkpoint_dir is None:
        return report(metrics)
    with CheckpointDir(checkpoint_dir).snapshot() as copy:
        report(metrics, checkpoint=checkpoint_cls.from_directory(str(copy)))


def _report_to_tune(epoch: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    from ray import tune

    _report(tune.report, tune.Checkpoint, metrics, checkpoint_dir)


def _report_to_train(epoch: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    import ray.train

    # Every rank reports (Ray Train waits for all of them); only rank 0 has a checkpoint.
    _report(ray.train.report, ray.train.Checkpoint, metrics, checkpoint_dir)


def restore_checkpoint(checkpoint, cfg: Config) -> None:
    """Put the checkpoint Ray restored into the run's checkpoint directory, where ``resume='auto'`` continues."""
    if checkpoint is not None:
        with checkpoint.as_directory() as source:
            CheckpointDir(Path(cfg.run.output_dir) / "checkpoints").restore_from(source)


def _ddp_worker(loop_config: dict) -> None:
    """One DDP rank under Ray Train: train() joins the process group Ray Train set up."""
    import ray.train

    from ..train import train

    cfg = config_from_dict(loop_config["config"])
    restore_checkpoint(ray.train.get_checkpoint(), cfg)
    train(cfg, callback=_report_to_train)


def _fit_ddp(plan: TrialPlan, cfg: Config, trial_dir: Path) -> None:
    """Drive a Ray Train run of ``workers`` ranks; its reports reach Tune through TuneReportCallback."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = plan.resources
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"config": config_to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if res.gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers, use_gpu=res.gpus > 0, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name="ddp",  # stable: a retried trial's Ray Train run resumes from its own last checkpoint
            storage_path=str(trial_dir),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=plan.keep_checkpoints),
            # Retries are Tune's (failures.max_failures): it reruns this function, which resumes.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as exc:
        diverged = diverged_rank(exc)
        if diverged is not None:
            raise diverged from None  # every rank diverged together: the trial handles it as one
        raise


def diverged_rank(exc) -> Exception | None:
    """The TrainingDiverged raised by a rank of a failed Ray Train run, if that is why it failed."""
    from ..train import TrainingDiverged

    for failure in exc.worker_failures.values():
        base = getattr(failure, "_base_exc", failure)  # Ray wraps a worker's exception with its traceback
        if isinstance(base, TrainingDiverged):
            return base
    return None


def trial_resources(res: Resources) -> dict[str, float]:
    if res.workers == 1:
        return {"cpu": res.cpus, "gpu": res.gpus}
    # The trial itself only drives Ray Train, whose workers hold the CPUs/GPUs; Ray needs some resource in
    # a request, and a CPU here would starve the workers on a machine the trial exactly fills.
    return {"cpu": 0, "memory": 1 << 20}


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
