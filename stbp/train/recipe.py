"""The training recipe around the model: optimizer, learning-rate schedule, precision and an EMA of the weights.

Everything here is a function of the validated :class:`~stbp.config.Config`; nothing is global.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..config import Config

__all__ = ["lr_at", "build_optimizer", "amp_dtype", "cpu_has_native_bf16", "WeightEMA"]


def lr_at(cfg: Config, progress: float) -> float:
    """Learning rate at ``progress`` epochs into training (fractional: schedules move every step). A linear
    warm-up of ``warmup_epochs`` (may be fractional) comes first; the cosine schedule then spans the rest."""
    o, epochs = cfg.optim, cfg.run.epochs
    if o.warmup_epochs and progress < o.warmup_epochs:
        return o.lr * (progress + 1e-3) / o.warmup_epochs
    if o.schedule == "step":
        return o.lr * o.lr_gamma ** math.floor(progress / o.lr_step_epochs)
    if o.schedule == "cosine":
        span = max(epochs - o.warmup_epochs, 1e-9)
        return 0.5 * o.lr * (1 + math.cos(math.pi * min((progress - o.warmup_epochs) / span, 1.0)))
    return o.lr


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters. Learned neuron parameters (a LIF's ``tau_logit`` and
    ``log_v_th``) are a group of their own without weight decay: it would pull tau towards 0.5 and v_th towards 1."""
    neuron = [p for name, p in model.named_parameters() if name.endswith(("tau_logit", "log_v_th"))]
    params: list = list(model.parameters())
    if neuron:
        rest = [p for p in params if all(p is not q for q in neuron)]
        params = [{"params": rest}, {"params": neuron, "weight_decay": 0.0}]
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: where CPU bf16 autocast is a speed-up rather than an emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where ``cfg.run.amp`` asks for it (``auto``: on CUDA with bf16, and on CPUs with native bf16)."""
    if cfg.run.amp == "off":
        return None
    if cfg.run.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


class WeightEMA:
    """An exponential moving average of a model's parameters and floating-point buffers (tdBN's running
    statistics), in a copy of the model that evaluation uses: ``avg <- d * avg + (1 - d) * w`` after every step.

    The decay warms up as ``d_n = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as timm's ModelEmaV2
    does), so early updates follow the fast-moving weights; short CPU runs would otherwise average in the random
    start. The update is on-device foreach arithmetic with the step count kept on the host: no sync.
    ``torch.optim.swa_utils.AveragedModel`` would compare its device-side counter on every update (a sync on CUDA).
    """

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self._tensors(self.module), self._tensors(model), strict=True))
        # Split once: an update is then one foreach call per kind, not a Python loop over tensors.
        floats = [(a, w) for a, w in pairs if a.is_floating_point()]
        ints = [(a, w) for a, w in pairs if not a.is_floating_point()]  # e.g. tdBN's num_batches_tracked
        self._avg, self._src = [a for a, _ in floats], [w for _, w in floats]
        self._int_avg, self._int_src = [a for a, _ in ints], [w for _, w in ints]

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*model.parameters(), *model.buffers())]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg, self._src, 1.0 - d)
        if self._int_avg:
            torch._foreach_copy_(self._int_avg, self._int_src)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
