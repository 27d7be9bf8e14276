"""Running a sweep: pre-flight checks (everything that can refuse does so before Ray starts), a private local Ray
cluster (or the one given), Optuna's searcher and ASHA under Ray Tune, then the report.

    sweep = load_sweep("sweeps/vth_aa.yaml", overrides={"epochs": 2})  # validated; nothing started
    run_sweep(sweep)                                                        # Ray, trials, MLflow, report
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from ..config import apply_overrides
from ..ports import free_port
from ..tracking import check_tracking_uri, resolve_tracking_uri
from .record import STATE_FILE, SweepCallback, collect_rows, mark_parent, open_sweep_record
from .report import report
from .searcher import make_searcher
from .spec import Resources, Sweep, SweepError, sweep_to_dict
from .trial import TrialPlan, stbp_trial, trial_dirname, trial_resources

__all__ = ["run_sweep", "SWEEP_FILE"]

#: The resolved sweep, saved in its Ray experiment directory: a resume must match it.
SWEEP_FILE = "sweep.yaml"
INDEX_FILE = "file-index.npz"  # an image folder's listing, made once for the sweep's trials


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SweepError(message)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # not Tune's iteration count, which a retried DDP trial restarts
        # ASHA puts rungs up to and including its max_t; ours lie below max_t, so that no rung sits on a
        # trial's last epoch, where stopping it would save nothing but its test evaluation.
        max_t=sweep.max_t - 1,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
        # A trial past the last rung runs to its end (test accuracy, FINISHED) rather than being stopped.
        stop_last_trials=False,
    )


def _tuner(sweep: Sweep, plan: TrialPlan, sweep_dir: Path, resume: bool):
    from ray import tune

    # Tune warns whenever checkpoints force frequent state snapshots: here that is by design (exact resume).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(tune.with_parameters(stbp_trial, plan=plan), trial_resources(sweep.resources))
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        # Finished trials stay finished; the searcher's state and the callbacks come back from the directory.
        # (Tune keeps no scheduler state: ASHA's rungs start empty again, so it stops less right after.)
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=None if sweep.multi_objective else sweep.metric,  # the searcher has them; no scheduler needs one
            mode=None if sweep.multi_objective else sweep.mode,
            search_alg=make_searcher(sweep),
            scheduler=_scheduler(sweep),
            num_samples=sweep.search.num_samples * sweep.search.repeats,  # trials: every point repeated
            trial_dirname_creator=trial_dirname,
            # A trial's worker process serves the next trial too: no new process importing torch, Ray and MLflow
            # and reading the data set per trial (every trial builds its own model, optimiser and run). Not for DDP
            # trials: Ray Train starts their workers afresh anyway, and Tune cannot reset their driver.
            reuse_actors=sweep.resources.workers == 1,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(sweep_dir.parent),
            callbacks=[SweepCallback(plan.record)],
            failure_config=tune.FailureConfig(max_failures=sweep.failures.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.checkpoints.num_to_keep),
            verbose=1,
        ),
    )


def _started(sweep_dir: Path) -> bool:
    """It has its MLflow parent (or Tune state): a sweep that stopped before starting is not one."""
    return (sweep_dir / STATE_FILE).exists() or any(sweep_dir.glob("experiment_state-*.json"))


def _instances(storage: Path, name: str) -> list[tuple[int, Path]]:
    """The sweeps of one name in ``storage`` (``name``, ``name-2``, ``name-3``...), in order."""
    found = [(1, storage / name)] + [
        (int(p.name[len(name) + 1 :]), p) for p in storage.glob(f"{name}-*") if p.name[len(name) + 1 :].isdigit()
    ]
    return sorted((n, p) for n, p in found if (p / SWEEP_FILE).is_file() or _started(p))


def _resolve_sweep(sweep: Sweep, storage: Path, resume: bool | str) -> Sweep:
    """The sweep this command runs. Afresh: the file's name, or the next ``name-N`` when sweeps of that name exist
    (nothing recorded is touched; one that stopped before it started is started again). ``resume=True``: the most
    recent sweep of the name; a string: that one."""
    runs = _instances(storage, sweep.name)
    if isinstance(resume, str):
        suffix = resume[len(sweep.name) + 1 :]
        _require(
            resume == sweep.name or (resume.startswith(f"{sweep.name}-") and suffix.isdigit()),
            f"--resume {resume}: not a sweep of this file, whose sweeps are named {sweep.name}, {sweep.name}-2, ...",
        )
        name = resume
    elif resume:
        _require(bool(runs), f"nothing to resume: no sweep {sweep.name!r} in {storage} (see --storage)")
        name = runs[-1][1].name
    elif not runs or not _started(runs[-1][1]):
        name = runs[-1][1].name if runs else sweep.name
    else:
        name = f"{sweep.name}-{runs[-1][0] + 1}"
    if name == sweep.name:
        return sweep
    # Another sweep of the same file: the same MLflow experiment, so that their trials compare side by side.
    return dataclasses.replace(sweep, name=name, mlflow=dataclasses.replace(sweep.mlflow, experiment=sweep.experiment))


def _check_sweep_dir(sweep: Sweep, sweep_dir: Path, resume: bool, tracking_uri: str) -> None:
    saved = sweep_dir / SWEEP_FILE
    if not resume:
        return
    _require(saved.is_file(), f"nothing to resume: no sweep {sweep.name!r} in {sweep_dir} (see --storage)")
    before, now = yaml.safe_load(saved.read_text()), sweep_to_dict(sweep)
    changed = [k for k in now if before.get(k) != now[k]]
    _require(
        not changed,
        f"the sweep differs from the one in {sweep_dir} in {', '.join(changed)}: resume it with the same "
        "sweep file and options",
    )
    state = sweep_dir / STATE_FILE
    recorded = json.loads(state.read_text())["tracking_uri"] if state.is_file() else tracking_uri
    _require(
        recorded == tracking_uri,
        f"this sweep is recorded in {recorded}, not {tracking_uri}: resume it from the directory it started "
        f"in, or pass --tracking_uri {recorded}",
    )


def _check_local_resources(res: Resources) -> None:
    """A local cluster is this machine: refuse a trial that could never be placed on it."""
    cpus = os.cpu_count() or 1
    _require(
        res.workers * res.cpus <= cpus,
        f"a trial needs resources.workers x resources.cpus = {res.workers * res.cpus:g} CPUs but this "
        f"machine has {cpus}; lower them, or join a bigger cluster with --address",
    )
    if res.gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        _require(
            gpus > 0,
            f"resources.gpus is {res.gpus:g} but this machine has no GPU: set resources.gpus: 0 to train on "
            "CPUs, or join a cluster with GPUs with --address",
        )
        _require(
            res.workers * res.gpus <= gpus,
            f"a trial needs resources.workers x resources.gpus = {res.workers * res.gpus:g} GPUs but this "
            f"machine has {gpus}",
        )


def _check_data(train) -> None:
    """The data set where the trials will look, fetched here once if allowed (not by every trial at once); event
    data integrated here into its frame cache, for the base config's frame settings."""
    from ..data import DataFormatError, DataNotFoundError, FrameSettings, load_dataset
    from ..data.catalog import DATASETS

    if DATASETS[train.data.dataset].streamed:
        return  # listed once by _list_folder
    frames = FrameSettings.of(train) if DATASETS[train.data.dataset].events else None
    try:
        load_dataset(train.data.dataset, train.data.data_dir, download=train.data.download, frames=frames)
    except DataNotFoundError as exc:
        raise SweepError(f"the trials would find no {train.data.dataset.upper().replace('_', '-')}: {exc}") from None
    except DataFormatError as exc:
        raise SweepError(f"the trials would read a malformed file: {exc}") from None


def _list_folder(train):
    """An image folder's or ImageNet's file index, listed here once for all trials (None for the other data sets)."""
    from ..data import DataFormatError, DataNotFoundError
    from ..data.catalog import DATASETS
    from ..data.folders import folder_index

    if not DATASETS[train.data.dataset].streamed:
        return None
    try:
        return folder_index(train.data.dataset, train.data.data_dir)  # every class: trials may take fewer
    except DataNotFoundError as exc:
        raise SweepError(f"the trials would find no {train.data.dataset}: {exc}") from None
    except DataFormatError as exc:
        raise SweepError(f"the trials would read a malformed image folder: {exc}") from None


def _with_index(train, sweep_dir: Path):
    """The base config, reading the folder's index that :func:`_checked_sweep` saved in the sweep's directory (the
    trials read that file, not the folder: one listing per sweep)."""
    path = sweep_dir / INDEX_FILE
    return apply_overrides(train, {"file_index": str(path)}) if path.is_file() else train


def _start_ray(address: str | None) -> None:
    import ray

    if address:
        ray.init(address=address)
        return
    # address="local": a private cluster, never a stray one left by `ray start` on this machine. Its
    # dashboard stays on, on 127.0.0.1: Ray Train frees a stopped trial's workers through the state API it
    # serves. Workers find that API through RAY_API_SERVER_ADDRESS, else by guessing (RAY_ADDRESS,
    # /tmp/ray/ray_current_cluster, any GCS process), which can pick another cluster on this machine.
    # (Ray 2.60 still binds its GCS and raylet on every interface; its token auth is what guards them.)
    try:
        port = free_port()
    except OSError as exc:
        raise SweepError(f"{exc} for the Ray dashboard") from None
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


def _checked_sweep(
    sweep: Sweep, address: str | None, resume: bool | str, storage: str | os.PathLike | None
) -> tuple[Sweep, Path, str]:
    """Everything that can refuse, before Ray starts: the tracking store, the sweep's name and directory, and (on
    this machine) its resources and data. The sweep as it runs (its name settled), its directory, the store."""
    tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri)
    check_tracking_uri(tracking_uri)
    storage = Path(storage or "ray_results").expanduser().resolve()
    sweep = _resolve_sweep(sweep, storage, resume)
    sweep_dir = storage / sweep.name
    _check_sweep_dir(sweep, sweep_dir, resume, tracking_uri)
    print(f"[sweep] {'continuing' if resume else 'starting'} sweep {sweep.name!r} in {sweep_dir}", flush=True)
    if not address:
        _check_local_resources(sweep.resources)
        _check_data(sweep.train)
    if not (resume and (sweep_dir / INDEX_FILE).is_file()) and (index := _list_folder(sweep.train)) is not None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        index.save(sweep_dir / INDEX_FILE)  # refused above, before anything else is written, if it cannot be read
    elif not tracking_uri.startswith(("http://", "https://")):
        print(
            f"[sweep] warning: trials on other nodes cannot write to {tracking_uri}; give --tracking_uri "
            "of an MLflow tracking server (and --storage on storage all nodes share)"
        )
    return sweep, sweep_dir, tracking_uri


def _outcome(sweep: Sweep, record, sweep_dir: Path) -> int:
    """The report of a sweep whose every trial ended (0), or how to continue an interrupted one (130)."""
    # MLflow, not Tune's result grid, tells whether every trial ended: Tune marks the trials it stops on
    # an interrupt as terminated too.
    rows = collect_rows(record, sweep)
    done = sum(row.ended for row in rows)
    if done < sweep.search.num_samples:
        mark_parent(record, "KILLED")
        print(
            f"\nSweep {sweep.name!r} interrupted after {done} of {sweep.search.num_samples} trials; continue "
            f"it with the same command plus --resume (its state is in {sweep_dir})."
        )
        return 130
    return report(sweep, record, rows, sweep_dir)


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    resume: bool | str = False,
    storage: str | os.PathLike | None = None,
) -> int:
    """Run a sweep; returns the exit status (0 done, 130 interrupted).

    A sweep whose name was run before in ``storage`` (default ``./ray_results``, which holds the Ray experiment
    directories) runs as ``<name>-2``, ``-3``...; ``resume=True`` continues the most recent one instead, and
    ``resume="<name>-2"`` that one. Everything that can refuse does so before Ray starts. ``address`` joins an
    existing Ray cluster instead of starting a local one.
    """
    import ray

    from ..data import resolve_data_dir

    sweep, sweep_dir, tracking_uri = _checked_sweep(sweep, address, resume, storage)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    train = _with_index(sweep.train, sweep_dir)
    saved = sweep_dir / SWEEP_FILE
    if not resume:
        saved.write_text(yaml.safe_dump(sweep_to_dict(sweep), sort_keys=False))
    record = open_sweep_record(sweep, tracking_uri, sweep_dir, saved)
    plan = TrialPlan(
        base=train,
        sweep_dir=str(sweep_dir),
        record=record,
        resources=sweep.resources,
        keep_checkpoints=sweep.checkpoints.num_to_keep,
        data_dir=str(resolve_data_dir(sweep.train.data.data_dir)),
        metrics=sweep.metrics,
        repeats=sweep.search.repeats,
    )
    try:
        _start_ray(address)
        _tuner(sweep, plan, sweep_dir, resume).fit()
    except BaseException:
        mark_parent(record, "FAILED")  # a --resume reopens it
        raise
    finally:
        ray.shutdown()
    return _outcome(sweep, record, sweep_dir)
