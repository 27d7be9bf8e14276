"""The MLflow Model Registry: a checkpoint logged with the ``mlflow.pytorch`` flavour and registered by name.

    model = mlflow.pytorch.load_model("models:/stbp-smoke/latest")   # a module, already in eval mode
    logits = model(images)   # [N, C, H, W] float32, normalised with the data set's mean/std (see the version)
    logits = model(frames)   # event data: [N, T, 2, H, W] float32 log(1 + event count) frames (see the version)

(torch's exported programs raise NotImplementedError on ``.eval()`` and ``.train()``; the formats that would allow
them, TorchScript and a pickled module, need ``torch.load(weights_only=False)``.)

The model is logged with its signature and an input example, exported with ``torch.export`` (MLflow's ``pt2``
format): it loads as a graph of torch operations, without unpickling any class and without this package. MLflow is
imported only when a model is registered: the core never needs it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..data.catalog import DATASETS
from ..data.events import SENSORS

__all__ = ["register_model", "input_shape", "describe"]

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
        with mlflow.start_run(run_id=run_id):  # a finished run is reopened and closed FINISHED again
            info = mlflow.pytorch.log_model(
                # two example images: the exported graph keeps the batch size free (one would fix it to 1)
                model,
                name="model",
                signature=signature,
                input_example=example.numpy(),
                serialization_format="pt2",
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
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
