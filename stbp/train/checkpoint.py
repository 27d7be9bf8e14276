"""Checkpoints: atomic writes, safe loads (``weights_only=True``), and rebuilding a model from one.

A checkpoint is a plain dict of tensors and Python primitives (no pickled objects), so it loads with
``torch.load(path, weights_only=True)``::

    format        "stbp/1"
    model_kwargs  the keyword arguments of :func:`stbp.build_network` that rebuild the network (:func:`model_kwargs`;
                  ``arch`` its name, ``neuron`` a dict of :class:`~stbp.core.spec.NeuronSpec`'s fields; checkpoints
                  written before ``arch`` are ResNet-19s, and those written before NeuronSpec hold the neuron's
                  fields flat, under the config's names: both load too)
    model         the unwrapped model's state_dict
    config        the resolved training config (nested dict, see :mod:`stbp.config`)
    optimizer, epoch (epochs completed), early_stopping, best_val_acc, metrics (one dict per epoch),
    rng, mlflow_run_id

A run's checkpoints live in a :class:`CheckpointDir`, the only code that knows their file names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..core.model import build_network
from ..core.spec import FIELDS as NEURON_FIELDS
from ..core.spec import NeuronSpec

__all__ = [
    "model_kwargs",
    "stored_model_kwargs",
    "model_config_fields",
    "build_model_from_checkpoint",
    "CheckpointError",
    "CheckpointDir",
    "FORMAT",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
]

FORMAT = "stbp/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory, fsync, then rename.

    A reader (or a crash) never sees a half-written file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; checkpoints are shared with other users and nodes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; :class:`CheckpointError` if it is not a valid one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign object types...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not an stbp checkpoint (expected format {FORMAT!r})")
    return state


#: A checkpoint's model_kwargs besides ``neuron``: :func:`build_network`'s keywords (``hidden`` no config sets).
NETWORK_KWARGS = ("arch", "width", "in_channels", "num_classes", "timesteps", "readout", "hidden")
#: The network of a checkpoint whose model_kwargs name none: written before there was a choice.
LEGACY_ARCH = "resnet19"
#: Checkpoints written before :class:`NeuronSpec` hold the neuron's fields flat, under the config's names.
FLAT_NEURON_KWARGS = {name: name for name in NEURON_FIELDS if name != "fast"} | {"fast_lif": "fast"}


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """What a checkpoint stores to rebuild the network, :func:`build_network`'s keyword arguments as plain types (so
    that it loads with ``weights_only=True``): ``build_network(**model_kwargs(cfg))`` is the config's network."""
    m = cfg.model
    return {
        "arch": m.arch,
        "width": m.width,
        "in_channels": m.in_channels,
        "num_classes": m.num_classes,
        "timesteps": m.timesteps,
        "readout": m.readout,
        "neuron": dataclasses.asdict(m.neuron),
    }


def stored_model_kwargs(stored: dict[str, Any]) -> dict[str, Any]:
    """:func:`build_network`'s keyword arguments from a checkpoint's ``model_kwargs``, as :func:`model_kwargs`
    writes them or as older checkpoints did (no ``arch``: ResNet-19; before :class:`NeuronSpec`, neuron fields flat,
    ``fast_lif`` for ``fast``). A key none of them knows is left out."""
    kwargs: dict[str, Any] = {"arch": LEGACY_ARCH} | {k: stored[k] for k in NETWORK_KWARGS if k in stored}
    neuron = {FLAT_NEURON_KWARGS[k]: v for k, v in stored.items() if k in FLAT_NEURON_KWARGS}
    neuron |= {k: v for k, v in (stored.get("neuron") or {}).items() if k in NEURON_FIELDS}
    kwargs["neuron"] = NeuronSpec(**neuron)
    return kwargs


def model_config_fields(stored: dict[str, Any]) -> dict[str, Any]:
    """The config's model fields that a checkpoint's ``model_kwargs`` (either version) say, the neuron's under
    the config's names (``fast_lif``): what a checkpoint without its config was trained as."""
    kwargs = stored_model_kwargs(stored)
    neuron = dataclasses.asdict(kwargs.pop("neuron"))
    config_name = {spec_name: name for name, spec_name in FLAT_NEURON_KWARGS.items()}
    return kwargs | {config_name[k]: v for k, v in neuron.items()}


def build_model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    """The network a checkpoint's ``model_kwargs`` describe (:func:`stored_model_kwargs`), with its weights."""
    kwargs = stored_model_kwargs(state["model_kwargs"])
    model = build_network(**kwargs)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match the architecture {kwargs}: {e}") from e
    return model


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu"):
    """Rebuild the trained model and its config from a checkpoint written by training.

    Returns ``(model, config)``: the model in eval mode on ``map_location``, and the resolved
    :class:`stbp.config.Config` it was trained with.
    """
    from ..config import config_from_dict

    state = read_checkpoint(path, map_location)
    model = build_model_from_checkpoint(state).eval()
    return model, config_from_dict(state["config"])


class CheckpointDir:
    """A run's ``checkpoints/`` directory: ``last.pt`` (the previous one kept as ``last.prev.pt``, the fallback
    should ``last.pt`` be damaged) and ``best.pt``."""

    FILES = ("last.pt", "best.pt")  # what a copy (a Ray checkpoint) carries

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.last, self.prev, self.best = (self.path / n for n in ("last.pt", "last.prev.pt", "best.pt"))

    def save(self, state: dict[str, Any], best: bool) -> None:
        """``state`` as the new last.pt (and best.pt when ``best``), each written atomically."""
        if self.last.exists():
            os.replace(self.last, self.prev)
        save_checkpoint(state, self.last)
        if best:
            save_checkpoint(state, self.best)

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest readable of last.pt and last.prev.pt (with a warning when it falls back), or None."""
        candidates = [p for p in (self.last, self.prev) if p.exists()]
        for i, path in enumerate(candidates):
            try:
                return read_checkpoint(path), path
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise
                warnings.warn(f"{e}; falling back to the previous checkpoint {candidates[i + 1]}", stacklevel=2)
        return None

    def copy_to(self, target: str | os.PathLike) -> None:
        """Copy last.pt and best.pt (those present) into ``target``, each atomically: DDP ranks on one node may
        copy at once."""
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            if (self.path / name).exists():
                fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
                os.close(fd)
                shutil.copy2(self.path / name, tmp)
                os.replace(tmp, target / name)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Path]:
        """A temporary copy of the checkpoints, for a store that moves or deletes what it is given (Ray)."""
        with tempfile.TemporaryDirectory(prefix="stbp-ckpt-") as tmp:
            self.copy_to(tmp)
            yield Path(tmp)

    def restore_from(self, source: str | os.PathLike) -> None:
        """Make the checkpoints in ``source`` (a Ray checkpoint) this run's latest."""
        self.prev.unlink(missing_ok=True)  # a last.prev.pt newer than the restored last.pt would be a wrong fallback
        CheckpointDir(source).copy_to(self.path)
