"""Micro-benchmarks behind the cpu-preset figures in BENCHMARKS.md ("Current figures" and "Analysis").

    python bench/micro.py step [--batch 128] [--width 0.125] [--contiguous] [--compile]  # a training step, median of 6
    python bench/micro.py eval [--width 0.125]                              # inference img/s per eval batch size
    python bench/micro.py cost [--width 0.125] [--batch 128]                # evaluation with/without the spike cost
    python bench/micro.py levers [--width 0.125] [--batch 128]              # train step: plain, +smoothing, +EMA
    python bench/micro.py lif                                               # fused LIF fwd+bwd, [2,128,16,28,28]
    python bench/micro.py ops                                               # bool vs float elementwise ops
    python bench/micro.py conv                                              # ResNet-19's convolutions: kernels, GFLOP/s

Compare two versions of stbp/ by running one, then the other, alternating (e.g. with ``git stash``).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from stbp.core.model import resnet19
from stbp.core.neuron import lif_fused


def median_s(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def step(batch: int, width: float, channels_last: bool, compile: bool = False) -> None:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = resnet19(width=width).to(memory_format=fmt)
    if compile:  # inductor; the first (compiling) step is timed on its own
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def one():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    first = time.perf_counter()
    one()
    first = time.perf_counter() - first
    s = median_s(one, 6, warmup=1)
    print(
        f"step: width {width} batch {batch} {'channels_last' if channels_last else 'contiguous'}"
        f"{' compiled' if compile else ''}: {s * 1e3:.0f} ms, {batch / s:.0f} img/s (first step {first:.1f} s)"
    )


@torch.no_grad()
def evaluate(width: float) -> None:
    model = resnet19(width=width).eval().to(memory_format=torch.channels_last)
    for batch in (2000, 500, 250, 128):
        x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        s = median_s(lambda x=x: model(x), 3, warmup=1)
        print(f"eval: width {width} batch {batch}: {batch / s:.0f} img/s")


def levers(width: float, batch: int) -> None:
    """stbp.train.train_step as the cpu preset runs it (bf16 where the CPU has it): plain, with label smoothing,
    and followed by the weight EMA's update; alternating, median of 7 rounds of 3 steps."""
    from stbp.config import build_config
    from stbp.train import train_step
    from stbp.train.recipe import WeightEMA, amp_dtype

    torch.manual_seed(0)
    model = resnet19(width=width).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    ema = WeightEMA(model, 0.999)
    amp = amp_dtype(build_config(preset="cpu"), torch.device("cpu"))
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    variants = {
        "plain": lambda: train_step(model, opt, x, y, amp),
        "smoothing": lambda: train_step(model, opt, x, y, amp, label_smoothing=0.1),
        "ema": lambda: (train_step(model, opt, x, y, amp), ema.update()),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(7):
        for name, fn in variants.items():
            t = time.perf_counter()
            for _ in range(3):
                fn()
            times[name].append((time.perf_counter() - t) / 3)
    med = {k: sorted(v)[3] for k, v in times.items()}
    print(
        f"train step, width {width}, batch {batch}, {amp or 'fp32'}: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms ({batch / v:.0f} img/s, {v / med['plain']:.2f}x)" for k, v in med.items())
    )


def cost(width: float, batch: int) -> None:
    """stbp.train.evaluate.evaluate over 1,024 images: plain, with firing rates and spike cost (the monitor's hooks,
    the SOP count), alternating, median of 5 rounds; the training step has no hooks either way."""
    from stbp.train.evaluate import evaluate as run_eval

    torch.manual_seed(0)
    model = resnet19(width=width).to(memory_format=torch.channels_last)
    x, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))
    batches = lambda: zip(x.split(batch), y.split(batch))  # noqa: E731
    times: dict[bool, list[float]] = {False: [], True: []}
    for flag in (False, True):  # warm-up
        run_eval(model, batches(), "val", firing_rates=flag)
    for _ in range(5):
        for flag in (False, True):
            t = time.perf_counter()
            run_eval(model, batches(), "val", firing_rates=flag)
            times[flag].append(time.perf_counter() - t)
    plain, counted = (sorted(times[f])[2] for f in (False, True))
    print(
        f"evaluate 1,024 images, width {width}, batch {batch}: plain {plain * 1e3:.0f} ms, with firing rates and "
        f"spike cost {counted * 1e3:.0f} ms ({counted / plain:.2f}x)"
    )


def lif() -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 128, 16, 28, 28) * 0.5 + 0.3).requires_grad_()
    grad = torch.randn_like(x)

    def one():
        lif_fused(x, 0.4, 0.5, 0.25).backward(grad)
        x.grad = None

    print(f"lif: fused forward+backward on {list(x.shape)}: {median_s(one, 7, warmup=1) * 1e3:.1f} ms")


def ops() -> None:
    """Why the LIF avoids bool arithmetic: torch's CPU paths for bool tensors against their float/uint8 twins."""
    torch.manual_seed(0)
    u = torch.randn(128, 16, 28, 28)
    mask = torch.rand(128, 16, 28, 28) > 0.8
    for name, fn in (
        ("u.masked_fill(mask, 0)", lambda: u.masked_fill(mask, 0)),
        ("u * (1 - mask as float)", lambda: u * (1 - mask.view(torch.uint8).to(u.dtype))),
        ("mask.to(float32)", lambda: mask.to(torch.float32)),
        ("mask.view(uint8).to(float32)", lambda: mask.view(torch.uint8).to(torch.float32)),
        ("u.clone()", lambda: u.clone()),
    ):
        print(f"ops: {name} on {list(u.shape)}: {median_s(fn, 9) * 1e3:.2f} ms")


def _conv_kernels(x, w, g, stride: int) -> dict:
    """(forward, backward) callables for one convolution through each of torch's CPU kernels."""
    aten = torch.ops.aten
    st, pad, one, zero = [stride, stride], [1, 1], [1, 1], [0, 0]
    kernels = {}
    for name, fmt in (("oneDNN NCHW", torch.contiguous_format), ("oneDNN channels_last", torch.channels_last)):
        xx, ww, gg = (t.contiguous(memory_format=fmt) for t in (x, w, g))
        kernels[name] = (
            functools.partial(aten.convolution, xx, ww, None, st, pad, one, False, zero, 1),
            functools.partial(
                aten.convolution_backward, gg, xx, ww, None, st, pad, one, False, zero, 1, [True, True, False]
            ),
        )
    kernels["im2col + BLAS"] = (
        functools.partial(aten._slow_conv2d_forward, x, w, [3, 3], None, st, pad),
        functools.partial(aten._slow_conv2d_backward, g, x, w, [3, 3], st, pad, [True, True, False]),
    )
    return kernels


def conv() -> None:
    """The full-width network's 3x3 convolutions at T*B = 32, forward and backward (input and weight gradients),
    through each CPU kernel torch has: oneDNN on NCHW and on channels_last, and im2col + BLAS
    (``_slow_conv2d``). The inputs are 0/1 spikes at a 15% rate."""
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    print(
        f"conv: for scale, a 2048^3 fp32 matmul (MKL) runs at {2 * 2048**3 / median_s(lambda: a @ b, 5) / 1e9:.0f} "
        "GFLOP/s"
    )
    n = 32
    for cin, cout, hw, stride in ((128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1), (512, 512, 7, 1)):
        out_hw = (hw - 1) // stride + 1
        x = (torch.rand(n, cin, hw, hw) < 0.15).float()
        w = torch.randn(cout, cin, 3, 3) * 0.05
        g = torch.randn(n, cout, out_hw, out_hw)
        gflop = 2 * n * cout * cin * 9 * out_hw * out_hw / 1e9  # forward; the backward does twice this
        for name, (fwd, bwd) in _conv_kernels(x, w, g, stride).items():
            f, b = median_s(fwd, 5, warmup=1), median_s(bwd, 5, warmup=1)
            print(
                f"conv: {cin}->{cout} {hw}x{hw} stride {stride} N={n} {name}: forward {f * 1e3:.1f} ms "
                f"({gflop / f:.0f} GFLOP/s), backward {b * 1e3:.1f} ms ({2 * gflop / b:.0f} GFLOP/s)"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("step", "eval", "cost", "levers", "lif", "ops", "conv"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--contiguous", action="store_true", help="contiguous instead of channels_last")
    p.add_argument("--compile", action="store_true", help="step: torch.compile the model (inductor)")
    args = p.parse_args()
    if args.what == "step":
        step(args.batch, args.width, not args.contiguous, args.compile)
    elif args.what == "eval":
        evaluate(args.width)
    elif args.what == "cost":
        cost(args.width, args.batch)
    elif args.what == "levers":
        levers(args.width, args.batch)
    elif args.what == "lif":
        lif()
    elif args.what == "conv":
        conv()
    else:
        ops()


if __name__ == "__main__":
    main()
