"""Experiment tracking for rank 0: MLflow through its client when installed, otherwise nothing.

MLflow is imported lazily: training works on a machine with only torch (the GPU box), with a one-line
notice. The default store is MLflow 3's embedded one, ``sqlite:///<absolute cwd>/mlflow.db`` (absolute, so
that Ray trials with their own working directories write to the same place). A tracking server that does not
answer is refused at start-up, before any training. If the store fails mid-run, training goes on: the failed
calls are kept in ``output_dir/mlflow_pending.jsonl`` and reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "TrackingError",
    "default_tracking_uri",
    "resolve_tracking_uri",
    "check_tracking_uri",
    "experiment_id",
    "Tracker",
    "NullTracker",
    "make_tracker",
    "open_training_run",
]

# Never log these as params or tags, wherever they come from.
_SECRET_WORDS = ("token", "secret", "password", "key", "credential")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///relative.db would resolve in each process's own cwd: pin it to an absolute path now.
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Refuse an http(s) tracking server that does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered {url} with HTTP {r.status}")
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({e}); start it, fix --tracking_uri, "
            "or unset it to use the local store"
        ) from e


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name``: restored if deleted, created if missing (by whichever process is
    first: another may create it at the same moment)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:  # the tag says "training runs" to MLflow 3's UI (it otherwise assumes GenAI traces)
            return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _is_secret(name: str) -> bool:
    return any(word in name.lower() for word in _SECRET_WORDS)


class NullTracker:
    """Tracking switched off or MLflow not installed."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def logged_steps(self, key: str) -> set[int] | None:
        """The steps at which the run holds metric ``key`` (None: unknown)."""
        return None


class Tracker(NullTracker):
    """One MLflow run, written through ``MlflowClient`` (no global active-run state)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_id: str | None,
        run_name: str | None,
        tags: dict[str, str],
        pending_path: Path,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        self._pending: list = []
        tags = {k: str(v) for k, v in tags.items() if not _is_secret(k)}
        self.pending_path = pending_path
        self.owns_run = run_id is None
        if run_id is None:
            run = self.client.create_run(experiment_id(self.client, experiment), run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        else:
            self.run_id = run_id
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")  # a resumed run continues, not a new one
            self.set_tags(tags)
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id

    def _safe(self, what: str, fn, *args, record: dict | None = None, **kwargs) -> None:
        """Call the store; on failure keep the call (replayed before the next one) and write it to disk."""
        self._pending.append((what, fn, args, kwargs))
        while self._pending:
            name, f, a, kw = self._pending[0]
            try:
                f(*a, **kw)
            except Exception as e:  # never let tracking kill a training run
                warnings.warn(
                    f"MLflow {name} failed ({type(e).__name__}: {e}); training goes on, the call is "
                    f"retried later and recorded in {self.pending_path}",
                    stacklevel=3,
                )
                self.pending_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.pending_path, "a") as fh:
                    fh.write(json.dumps({"what": what, "time": time.time(), **(record or {})}) + "\n")
                return
            self._pending.pop(0)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [(k, str(v)[:6000]) for k, v in params.items() if not _is_secret(k)]
        new = [Param(k, v) for k, v in items if k not in existing]
        changed = {k: (existing[k], v) for k, v in items if k in existing and existing[k] != v}
        if changed:  # MLflow params are immutable; a resume with different settings says so
            self.set_tags({f"changed_on_resume.{k}": f"{a} -> {b}" for k, (a, b) in changed.items()})
        for i in range(0, len(new), 100):
            self._safe("log_params", self.client.log_batch, self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(ms), 1000):
            self._safe(
                "log_metrics",
                self.client.log_batch,
                self.run_id,
                metrics=ms[i : i + 1000],
                record={"step": step, "metrics": {m.key: m.value for m in ms[i : i + 1000]}},
            )

    def logged_steps(self, key: str) -> set[int] | None:
        try:
            return {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except Exception:  # the store is unreachable: the calls already made are replayed from _pending
            return None

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._safe("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        safe = [RunTag(k, str(v)) for k, v in tags.items() if not _is_secret(k)]
        if safe:
            self._safe("set_tags", self.client.log_batch, self.run_id, tags=safe)

    def finish(self, status: str = "FINISHED") -> None:
        self._safe("set_terminated", self.client.set_terminated, self.run_id, status)
        if self._pending:
            print(
                f"[stbp] {len(self._pending)} MLflow call(s) could not be delivered; their data is in "
                f"{self.pending_path}"
            )


def make_tracker(
    enabled: bool,
    uri: str | None,
    experiment: str,
    *,
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    pending_path: Path,
) -> NullTracker:
    """A :class:`Tracker` when enabled and MLflow is importable, else a :class:`NullTracker` (with a notice)."""
    if not enabled:
        return NullTracker()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("[stbp] MLflow is not installed: training without experiment tracking (pip install mlflow)")
        return NullTracker()
    uri = resolve_tracking_uri(uri)
    check_tracking_uri(uri)
    # MLflow's HTTP client retries a dead server for minutes by default; a training run should not stall on it.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        return Tracker(uri, experiment, run_id=run_id, run_name=run_name, tags=tags or {}, pending_path=pending_path)
    except Exception as e:
        raise TrackingError(f"cannot open MLflow run at {uri}: {type(e).__name__}: {e}") from e


FOLDER_FIELDS = ("image_size", "classes")  # parameters of the runs on image folders and ImageNet only


def open_training_run(
    cfg, *, primary: bool, world_size: int, device: str, run_id: str | None, split_hash: str | None, out: Path
) -> NullTracker:
    """The tracker of a training run as this rank sees it: nothing off the ``primary`` rank; there, the MLflow run
    ``run_id`` (a resume, a sweep's trial) or a new one, tagged with the code, torch, ``world_size`` and ``device``
    (and ``cfg``'s tags), with ``cfg``'s fields as parameters. Where a run's records go (output and data directory,
    the tracking settings, an image folder's file index) is tagged, not a parameter; the frame settings are
    parameters of event runs only and the image size and classes of image-folder runs only, beside their
    ``split_hash``, which names the exact train and test samples, so that only runs on one split compare."""
    import torch

    from ..config import BOOKKEEPING_FIELDS, flatten_config
    from ..data import FRAME_FIELDS
    from ..data.catalog import DATASETS

    if not primary:
        return NullTracker()
    t = cfg.tracking
    tags = {"git_commit": git_commit() or "unknown", "torch_version": torch.__version__}
    tags.update(world_size=str(world_size), device=device, **t.tags)
    tracker = make_tracker(
        t.mlflow, t.tracking_uri, t.experiment, run_id=run_id, run_name=t.run_name, tags=tags,
        pending_path=out / "mlflow_pending.jsonl",
    )  # fmt: skip
    flat = flatten_config(cfg)
    spec = DATASETS[cfg.data.dataset]
    skip = (*BOOKKEEPING_FIELDS, *(() if spec.events else FRAME_FIELDS), *(() if spec.streamed else FOLDER_FIELDS))
    params = {k: v for k, v in flat.items() if k not in skip}
    tracker.log_params({**params, **({"split_hash": split_hash} if split_hash else {})})
    tracker.set_tags({k: str(flat[k]) for k in ("output_dir", "data_dir", "file_index") if flat[k] is not None})
    return tracker
