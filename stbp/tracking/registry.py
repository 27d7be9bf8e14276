"""The MLflow Model Registry: a checkpoint logged with the ``mlflow.pytorch`` flavour and registered by name.

    model = mlflow.pytorch.load_model("models:/stbp-smoke/latest")   # a module, already in eval mode
    logits = model(images)   # [N, C, H, W] float32, normalised with the data set's mean/std (see the version)
    logits = model(frames)   # event data: [N, T, 2, H, W] float32 log(1 + event count) frames (see the version)

(torch's exported programs raise NotImplementedError on ``.eval()`` and ``.train()``; the formats that would allow
them, TorchScript and a pickled module, need ``torch.load(weights_only=False)``.)

The model is logged with its signature and an input example, exported with ``torch.export`` (MLflow's ``pt2``
format): it loads as a graph of torch operations, without unpickling any class and without this package. MLflow is
imported only when a model is registered: the core never needs it. Where ``nir`` is installed (``pip install -e
'.[nir]'``) the version carries the network as a NIR graph too, ``model.nir`` among the model's extra files
(:func:`nir_graph`; docs/export.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..data.catalog import DATASETS
from ..data.events import SENSORS

__all__ = ["register_model", "input_shape", "describe", "nir_graph", "nir_inputs"]

ARCH_NAMES = {"resnet19": "ResNet-19", "resnet18": "ResNet-18", "resnet34": "ResNet-34"}  # for the description


def register_model(model: torch.nn.Module, cfg: Any, tracking_uri: str, run_id: str, name: str) -> dict[str, Any]:
    """Log ``model`` (trained with the config ``cfg``; :func:`stbp.load_checkpoint` gives both) in run ``run_id`` as
    ``model`` and register it as a new version of ``name``; returns ``{"name", "version", "model_uri"}``."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    model = model.cpu().eval()
    shape = input_shape(cfg)
    example = torch.zeros(2, *shape)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # the fluent API's store, for this call only
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the caller prints what matters
    try:
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):  # a finished run is reopened
            info = mlflow.pytorch.log_model(  # and closed FINISHED again
                # two example images: the exported graph keeps the batch size free (one would fix it to 1)
                model,
                name="model",
                signature=signature,
                input_example=example.numpy(),
                serialization_format="pt2",
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                extra_files=_nir_file(model, cfg, Path(tmp)),  # model.nir, where nir is installed
            )
    finally:
        mlflow.set_tracking_uri(previous)
    client = MlflowClient(tracking_uri)
    version = str(info.registered_model_version)
    client.update_model_version(
        name,
        version,
        description=describe(cfg, shape),
    )
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}"}


def input_shape(cfg: Any) -> tuple[int, ...]:
    """One sample's shape as the model takes it: ``(C, H, W)`` images (image folders and ImageNet: the config's
    ``image_size`` crops, else the data set's), ``(T, 2, H, W)`` event frames."""
    spec = DATASETS[cfg.data.dataset]
    if not spec.events:
        size = cfg.data.image_size if spec.streamed and cfg.data.image_size else spec.size
        return (spec.channels, size, size)
    size = cfg.data.frame_size
    height, width = SENSORS[spec.name] if size is None else (size, size)
    return (cfg.model.timesteps, spec.channels, height, width)


def describe(cfg: Any, shape: tuple[int, ...]) -> str:
    """The model version's description: what it is, and the input it expects, exactly."""
    spec, m = DATASETS[cfg.data.dataset], cfg.model
    dims = ", ".join(str(d) for d in shape)
    if spec.events:
        inputs = (
            f"Input: [N, {dims}] float32: {shape[0]} frames a sample (events split by {cfg.data.frame_split}), "
            f"channel 0 the OFF and 1 the ON events of each pixel, a count c given as log(1 + c); no mean or std."
        )
    else:
        inputs = (
            f"Input: [N, {dims}] float32 images scaled to [0, 1], then normalised with mean {list(spec.mean)} "
            f"and std {list(spec.std)}."
        )
    n = m.neuron
    learned = [name for name, on in (("v_th", n.learn_v_th), ("tau", n.learn_tau)) if on]
    neuron = f" ({' and '.join(learned)} learned from these)" if learned else ""
    return (
        f"Spiking {ARCH_NAMES[m.arch]} (STBP, tdBN) on {spec.name}: "
        f"v_th {n.v_th:g}, aa {n.aa:g}, tau {n.tau:g}{neuron}, T {m.timesteps}, width {m.width:g}. {inputs} "
        f"Output: [N, {m.num_classes}] logits."
    )


def nir_inputs(cfg: Any) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """One time step's input ``(C, H, W)`` of the network ``cfg`` trained, and what a NIR graph of it cannot say
    (its metadata): time steps, ``dt``, the input's encoding and normalisation, the readout."""
    from ..core.nir_graph import DT

    spec, steps = DATASETS[cfg.data.dataset], cfg.model.timesteps
    shape = input_shape(cfg)
    meta: dict[str, Any] = {"dataset": spec.name, "arch": cfg.model.arch, "timesteps": steps, "dt": DT}
    if spec.events:
        shape = shape[1:]
        meta["encoding"] = f"event frames: at step t frame t of [T={steps}, N, 2, H, W], a count c as log(1 + c)"
    else:
        meta["encoding"] = f"direct: the same image at each of the T={steps} steps, (pixel / 255 - mean) / std"
        meta["mean"], meta["std"] = list(spec.mean), list(spec.std)
    meta["readout"] = "logits = mean over the T steps of the output"
    return shape, meta


def nir_graph(model: torch.nn.Module, cfg: Any):
    """``model`` (trained with ``cfg``) as a ``nir.NIRGraph`` (:func:`stbp.core.nir_graph.to_nir`), its input and
    encoding in the metadata. Needs ``nir``; raises :class:`~stbp.core.nir_graph.NIRExportError` for a network NIR
    cannot say exactly."""
    from ..core.nir_graph import to_nir

    shape, meta = nir_inputs(cfg)
    return to_nir(model, shape, meta)


def _nir_file(model: torch.nn.Module, cfg: Any, folder: Path) -> list[str] | None:
    """``folder/model.nir`` written for the registered version; None where ``nir`` is not installed or the network
    has no exact NIR form (the registered model is the same either way)."""
    from ..core.nir_graph import NIRExportError

    try:
        import nir
    except ImportError:
        return None
    try:
        graph = nir_graph(model, cfg)
    except NIRExportError:
        return None
    nir.write(str(folder / "model.nir"), graph)
    return [str(folder / "model.nir")]
