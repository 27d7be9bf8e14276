"""The three implementations under test, built alike, and the check that they compute the same thing.

- ``ours``: :func:`stbp.resnet19` (time folded into the batch, fused LIF), channels_last as ``stbp.train`` runs it;
- ``sj``: :mod:`sj_model` (SpikingJelly 2.0 multi-step layers), channels_last too; optional;
- ``ref``: :mod:`reference_model` (time last, per-layer time loops), in its own layout, as the original ran.
"""

from __future__ import annotations

from collections.abc import Callable

import common  # noqa: F401  (puts the repository root on sys.path)
import reference_model
import sj_model
import torch
import torch.nn.functional as F
from torch import nn

from stbp import LIF, TdBN, resnet19

NAMES = ("ours", "sj", "ref")
LABELS = {"ours": "stbp (ours)", "sj": "SpikingJelly 2.0", "ref": "reference structure"}


def build(
    name: str,
    width: float,
    timesteps: int,
    device: torch.device,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    v_th: float = 0.4,
    aa: float = 0.5,
    tau: float = 0.25,
) -> nn.Module:
    """A fresh model ``name`` on ``device`` (same seed, same initial weights for all three)."""
    torch.manual_seed(seed)
    kw = dict(timesteps=timesteps, v_th=v_th, aa=aa, tau=tau, width=width)
    ours = resnet19(**kw).to(dtype)
    if name == "ours":
        return ours.to(device, memory_format=torch.channels_last)
    if name == "ref":
        ref = reference_model.reference_resnet19(**kw).to(dtype)
        ref.load_state_dict(ours.state_dict())
        return ref.to(device)
    if name == "sj":  # weights converted in the final dtype, so that tdBN's alpha*v_th rounds as ours does
        sj = sj_model.load_from_stbp(sj_model.sj_resnet19(**kw).to(dtype), ours)
        return sj.to(device, memory_format=torch.channels_last)
    raise ValueError(f"unknown model {name!r}; choose from {NAMES}")


def prepare_input(name: str, x: torch.Tensor) -> torch.Tensor:
    """The images in the layout each model is run with."""
    return x if name == "ref" else x.contiguous(memory_format=torch.channels_last)


def before_step(name: str, model: nn.Module) -> Callable[[], None] | None:
    """SpikingJelly keeps membrane state in its neurons: reset it before every step (``functional.reset_net``)."""
    return model.reset_state if name == "sj" else None


def kind_of(module: nn.Module) -> str | None:
    """Profiler category of a leaf module: conv (conv and linear), batch-norm, neuron; None for the rest."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch-norm"
    if isinstance(module, (LIF, reference_model.LIFSpike)) or type(module).__name__ == "LIFNode":
        return "neuron"
    return None


def _spike_outputs(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    """Forward hooks collecting every neuron layer's output as ``[T, N, ...]``."""
    outs: list[torch.Tensor] = []

    def hook(mod, args, out):
        out = out.detach()
        outs.append(out.movedim(-1, 0) if isinstance(mod, reference_model.LIFSpike) else out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if kind_of(m) == "neuron"]
    return outs, handles


def check_equivalence(
    names: list[str], width: float = 0.125, timesteps: int = 3, batch: int = 4, seed: int = 0
) -> dict:
    """Same weights, same input (float64, train mode) -> same spikes in every layer, same logits, same gradients.

    Returns ``{name: {"spike_mismatch": fraction, "logit_err": max abs, "grad_err": max rel}}`` against ``ours``
    and raises AssertionError where they differ beyond rounding.
    """
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=g)
    results, base = {}, None
    for name in ["ours", *[n for n in names if n != "ours"]]:
        model = build(name, width, timesteps, cpu, seed, torch.float64).train()
        if name == "sj":
            model.reset_state()
        outs, handles = _spike_outputs(model)
        logits = model(prepare_input(name, x))
        for h in handles:
            h.remove()
        F.cross_entropy(logits, y).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        if name == "sj":  # compare tdBN weight gradients in stbp's parametrisation (w_sj = w * alpha * v_th)
            ours = build("ours", width, timesteps, cpu, seed)
            for k, m in ours.named_modules():
                if isinstance(m, TdBN):
                    grads[f"{k}.weight"] = grads[f"{k}.weight"] * (m.alpha * ours.lif1.threshold())
        if base is None:
            base = (outs, logits.detach(), grads)
            continue
        results[name] = _compare(name, base, (outs, logits.detach(), grads))
    return results


def _compare(name: str, base, other) -> dict:
    outs0, logits0, grads0 = base
    outs1, logits1, grads1 = other
    assert len(outs0) == len(outs1), f"{name}: {len(outs1)} neuron layers, ours has {len(outs0)}"
    total = sum(o.numel() for o in outs0)
    mismatched = sum(int((a != b.reshape(a.shape)).sum()) for a, b in zip(outs0, outs1))
    logit_err = float((logits0 - logits1).abs().max())
    grad_err = max(float((grads0[k] - grads1[k]).norm() / grads0[k].norm().clamp_min(1e-30)) for k in grads0)
    res = {"spike_mismatch": mismatched / total, "logit_err": logit_err, "grad_err": grad_err, "spikes_compared": total}
    assert mismatched == 0, f"{name}: {mismatched} of {total} spikes differ from ours"
    assert logit_err < 1e-10 and grad_err < 1e-10, f"{name}: differs from ours: {res}"
    return res


def train_flops_per_image(width: float, timesteps: int, in_channels: int = 1, size: int = 28) -> float:
    """Analytic training FLOPs per image: conv and linear multiply-adds of one forward of ``stbp``'s ResNet-19
    (read off the layer shapes; the stem counted once, as it runs), x2 FLOPs per MAC, x3 for forward + backward.
    Batch-norm, neurons and the optimizer are left out (they are memory-bound, not FLOP-bound)."""
    model = resnet19(in_channels=in_channels, timesteps=timesteps, width=width).eval()
    macs = 0

    def hook(mod, args, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            macs += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, in_channels, size, size))
    for h in handles:
        h.remove()
    return 2.0 * 3.0 * macs
