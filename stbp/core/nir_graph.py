"""A trained :class:`~stbp.core.model.SpikingResNet` as a NIR graph (the Neuromorphic Intermediate Representation,
``nir``, imported inside the functions: the core loads without it), exact up to floating-point rounding.

What changes on the way, every step exact in real arithmetic:

- tdBN (eval mode, running statistics) is folded into the convolution before it, threshold factor included:
  ``s_c = gamma_c * alpha * v_th / sqrt(var_c + eps)``, ``W' = s_c W``, ``b' = beta_c - s_c mean_c``.
- The neuron ``u_t = beta u_{t-1} (1 - o_{t-1}) + x_t``, spike ``u_t > v_th``, hard reset to 0, is NIR's
  ``LIF(tau, r, v_leak, v_threshold, v_reset)`` with ``dt = 1e-4``, ``tau = dt / (1 - beta)``,
  ``r = 1 / (1 - beta)`` and ``v_leak = v_reset = 0``, discretised as SpikingJelly and snnTorch do (``v <- v - v
  dt/tau + x``). NIR has no time step: ``dt`` goes to the graph's metadata.
- A per-channel threshold (importers take one per layer) is divided into the incoming weights and biases and the
  layer fires at 1 (exact: the reset is to 0 and the decay linear); on an identity shortcut that takes a diagonal 1x1
  ``Conv2d`` (no importer maps ``Scale``).
- Thresholds are stored as the next float64 above: ``v >= stored`` (SpikingJelly) is then ``v > v_th`` exactly,
  and ``v > stored`` (NIR, snnTorch) differs from it only when ``v`` equals the stored value.
- The residual sum is two edges into the block's second LIF; global average pooling is ``AvgPool2d(kernel = stride
  = (H, W))`` and ``Flatten``; linear layers are ``Affine``; the ImageNet stem's 3x3 stride-2 max pool, over
  spikes, is a ``Conv2d`` summing each channel's window (zero padding: spikes are >= 0) into a LIF that fires at
  0.5: the max of 0s and 1s is 1 exactly when their sum is >= 1 (NIR has no MaxPool).
- Direct encoding convolves the image once and repeats the result; in NIR the image is the input at every step, the
  same thing. Event models take frame ``t`` at step ``t``. The logits (mean over time of the output) stay outside.

:func:`spikingjelly_run` reads a written graph with SpikingJelly and imports nothing of ``stbp`` (a test runs its
source where ``stbp`` cannot be imported).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor, nn

from .model import BasicBlock, SpikingResNet
from .neuron import LIF
from .tdbn import TdBN

__all__ = ["DT", "NIRExportError", "lif_names", "spikingjelly_run", "to_nir"]

#: The time step the graph's LIF constants assume (the importers' default), in seconds.
DT = 1e-4


class NIRExportError(ValueError):
    """The model has something NIR (or this exporter) cannot say exactly; the message names it."""


def _arr(x: Tensor | float) -> np.ndarray:
    return (x.detach().double().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)).copy()


def _per_channel(v: Tensor | float, channels: int) -> np.ndarray:
    """A threshold (float, scalar or ``[C]`` tensor) as ``[C]`` float64."""
    return np.broadcast_to(_arr(v), (channels,)).astype(np.float64)


def _fold(conv: nn.Conv2d, bn: TdBN, v_th: Tensor | float, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``conv`` then ``bn`` (normalising to ``alpha * v_th``) as one weight and bias, divided by ``theta`` [C]."""
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.bias is not None:
        raise NIRExportError(f"a convolution with groups, dilation or bias is not exported: {conv}")
    var, mean = _arr(bn.running_var), _arr(bn.running_mean)
    scale = _arr(bn.weight) * bn.alpha * _per_channel(v_th, bn.num_features) / np.sqrt(var + bn.eps)
    weight = _arr(conv.weight) * (scale / theta)[:, None, None, None]
    bias = (_arr(bn.bias) - scale * mean) / theta
    return weight, bias


def _threshold(lif: LIF, channels: int) -> tuple[np.ndarray, float]:
    """What the inputs of ``lif`` are divided by [C], and the one threshold the layer fires at."""
    v = lif.threshold()
    if isinstance(v, Tensor) and v.dim() == 1:
        return _per_channel(v, channels), 1.0
    return np.ones(channels), float(_arr(v))


def _lif(lif: LIF, shape: tuple[int, ...], fires_at: float):
    """NIR's LIF for ``lif`` (decay ``beta``) over ``shape`` (without batch), firing above ``fires_at``."""
    import nir

    beta = float(_arr(lif.decay()))
    if not 0 < beta < 1:
        raise NIRExportError(f"a decay factor of {beta} has no NIR LIF with dt = {DT} (it needs 0 < tau < 1)")
    full = lambda value: np.full(shape, value, dtype=np.float64)
    return nir.LIF(
        tau=full(DT / (1 - beta)),
        r=full(1 / (1 - beta)),
        v_leak=full(0.0),
        v_threshold=full(np.nextafter(fires_at, math.inf)),
        v_reset=full(0.0),
    )


def _conv(weight: np.ndarray, bias: np.ndarray, conv: nn.Conv2d | None, hw: tuple[int, int], **geometry):
    """NIR's ``Conv2d`` of ``weight`` and ``bias`` with ``conv``'s stride and padding (or ``geometry``'s), on ``hw``
    inputs, and its output's ``(H, W)``."""
    import nir

    stride = tuple(conv.stride) if conv is not None else geometry["stride"]
    padding = tuple(conv.padding) if conv is not None else geometry["padding"]
    node = nir.Conv2d(hw, weight, stride, padding, (1, 1), 1, bias)
    k = weight.shape[-2:]
    out = tuple((hw[i] + 2 * padding[i] - k[i]) // stride[i] + 1 for i in range(2))
    return node, out


class _Builder:
    """The graph's nodes (by name) and edges, as they are added."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, name: str, node: Any, *sources: str) -> str:
        self.nodes[name] = node
        self.edges += [(s, name) for s in sources]
        return name

    def conv_lif(self, src: str, name: str, conv, bn, lif: LIF, hw) -> tuple[str, tuple[int, int]]:
        """``conv`` (``bn`` folded) into ``lif``: stem or a block's first half."""
        theta, fires_at = _threshold(lif, bn.num_features)
        node, hw = _conv(*_fold(conv, bn, lif.threshold(), theta), conv, hw)
        self.add(f"{name}conv1", node, src)
        shape = (bn.num_features, *hw)
        return self.add(f"{name}lif1", _lif(lif, shape, fires_at), f"{name}conv1"), hw


def _block(b: _Builder, src: str, name: str, block: BasicBlock, hw: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """A :class:`BasicBlock`: two branches, two edges into ``lif2``."""
    cin = block.conv1.in_channels
    mid, hw_out = b.conv_lif(src, name, block.conv1, block.bn1, block.lif1, hw)
    cout = block.bn2.num_features
    theta, fires_at = _threshold(block.lif2, cout)
    v_th = block.lif2.threshold()
    node, _ = _conv(*_fold(block.conv2, block.bn2, v_th, theta), block.conv2, hw_out)
    b.add(f"{name}conv2", node, mid)
    sources = [f"{name}conv2"]
    if isinstance(block.shortcut, nn.Identity):
        if np.all(theta == 1):
            sources.append(src)
        else:  # x / theta_c: a diagonal 1x1 convolution
            weight = np.diag(1 / theta)[:, :, None, None]
            node, _ = _conv(weight, np.zeros(cin), None, hw, stride=(1, 1), padding=(0, 0))
            sources.append(b.add(f"{name}shortcut", node, src))
    else:
        conv, bn = block.shortcut
        node, _ = _conv(*_fold(conv, bn, v_th, theta), conv, hw)
        sources.append(b.add(f"{name}shortcut", node, src))
    return b.add(f"{name}lif2", _lif(block.lif2, (cout, *hw_out), fires_at), *sources), hw_out


def _max_pool(b: _Builder, src: str, pool: nn.MaxPool2d, lif: LIF, channels: int, hw) -> tuple[str, tuple]:
    """A max pool over spikes: each window's sum (a Conv2d, identity across channels) into a LIF firing at 0.5."""
    k, s, p = (pool.kernel_size, pool.stride, pool.padding)
    k, s, p = ((v, v) if isinstance(v, int) else tuple(v) for v in (k, s, p))
    if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
        raise NIRExportError(f"a max pool with dilation or ceil_mode has no exact NIR form: {pool}")
    weight = np.zeros((channels, channels, *k))
    weight[np.arange(channels), np.arange(channels)] = 1.0
    node, hw = _conv(weight, np.zeros(channels), None, hw, stride=s, padding=p)
    b.add("maxpool_sum", node, src)
    return b.add("maxpool", _lif(lif, (channels, *hw), 0.5), "maxpool_sum"), hw


def _head(b: _Builder, src: str, model: SpikingResNet, channels: int, hw: tuple[int, int]) -> str:
    """Global average pool, flatten, [fc1, lif_fc1,] classifier [, lif_out]."""
    import nir

    b.add("pool", nir.AvgPool2d(hw, hw, (0, 0)), src)
    src = b.add("flatten", nir.Flatten({"input": np.array([channels, 1, 1])}, -3, -1), "pool")
    if model.fc1 is not None:
        theta, fires_at = _threshold(model.lif_fc1, model.fc1.out_features)
        weight, bias = _arr(model.fc1.weight) / theta[:, None], _arr(model.fc1.bias) / theta
        b.add("fc1", nir.Affine(weight, bias), src)
        src = b.add("lif_fc1", _lif(model.lif_fc1, (model.fc1.out_features,), fires_at), "fc1")
    fc = model.classifier
    theta, fires_at = (
        (np.ones(fc.out_features), 0.0) if model.lif_out is None else _threshold(model.lif_out, fc.out_features)
    )
    name = "fc2" if model.fc1 is not None else "fc"
    src = b.add(name, nir.Affine(_arr(fc.weight) / theta[:, None], _arr(fc.bias) / theta), src)
    if model.lif_out is not None:
        src = b.add("lif_out", _lif(model.lif_out, (fc.out_features,), fires_at), src)
    return src


def to_nir(model: SpikingResNet, input_shape: tuple[int, int, int], metadata: dict[str, Any] | None = None):
    """``model`` as a ``nir.NIRGraph`` whose input is one time step's ``input_shape`` ``(C, H, W)``: the image (direct
    encoding, the same at every step) or that step's event frame. Its output is the classifier's (or ``lif_out``'s)
    output at each step; the logits are their mean over the ``timesteps`` steps (in ``metadata``, with ``dt``, the
    readout and what the caller adds). Raises :class:`NIRExportError` for what it cannot say exactly."""
    import nir

    if not isinstance(model, SpikingResNet):
        raise NIRExportError(f"only SpikingResNet is exported, got {type(model).__name__}")
    if model.training:
        raise NIRExportError("the model is in training mode (tdBN uses batch statistics): call model.eval() first")
    b = _Builder()
    src = b.add("input", nir.Input({"input": np.array(input_shape)}))
    src, hw = b.conv_lif(src, "", model.conv1, model.bn1, model.lif1, tuple(input_shape[1:]))
    channels = model.bn1.num_features
    if model.maxpool is not None:
        src, hw = _max_pool(b, src, model.maxpool, model.lif1, channels, hw)
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            src, hw = _block(b, src, f"stages_{i}_{j}_", block, hw)
            channels = block.bn2.num_features
    src = _head(b, src, model, channels, hw)
    b.add("output", nir.Output({"output": np.array([model.classifier.out_features])}), src)
    meta = {"timesteps": model.timesteps, "dt": DT, "readout": f"{model.readout}: logits = mean over time of output"}
    return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata={**meta, **(metadata or {})})


def lif_names(model: SpikingResNet) -> dict[str, str]:
    """The graph's LIF node for each spiking layer of ``model`` (module path -> node name; the max pool's LIF,
    ``maxpool``, has no module of its own: it is the pooled output of ``lif1``)."""
    return {path: path.replace(".", "_") for path, m in model.named_modules() if isinstance(m, LIF)}


def spikingjelly_run(path: str, inputs, dt: float = 1e-4, full: bool = False) -> tuple[Any, dict[str, Any]]:
    """The graph at ``path`` read by SpikingJelly 2.0 (``import_from_nir(path, dt, float64, step_mode='m')``) on
    ``inputs`` ``[T, N, C, H, W]``: its output ``[T, N, K]`` and every LIF node's spike count (``full``: its spikes
    ``[T, N, ...]``), numpy arrays. Imports numpy, torch and SpikingJelly only (no ``stbp``)."""
    import numpy as np
    import torch
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    net = import_from_nir(path, dt=dt, dtype=torch.float64, step_mode="m")
    spikes: dict[str, Any] = {}

    def hook(name):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            spikes[name] = out.numpy().copy() if full else float(out.sum())

        return record

    for name, module in net.named_modules():
        if type(module).__name__ == "_NIRStatefulModule":  # SpikingJelly's wrapper of a neuron
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        out = net(torch.from_numpy(np.asarray(inputs, dtype=np.float64)))
    out = out[0] if isinstance(out, tuple) else out
    return out.numpy(), spikes
