"""A checkpoint as a NIR graph, and the graph checked against the checkpoint through SpikingJelly's importer.

    python -m stbp.export CHECKPOINT OUT.nir [--verify] [--samples N] [--data_dir DIR]
    python -m stbp.export --verify OUT.nir CHECKPOINT [--samples N] [--data_dir DIR]

The graph is built by :func:`stbp.core.nir_graph.to_nir` (tdBN and per-channel thresholds folded, every LIF a NIR
``LIF`` at ``dt = 1e-4``); what NIR cannot say (time steps, the input encoding and its normalisation, ``dt``, the
time-mean readout) goes into the graph's metadata and is printed. The check runs the first ``N`` test samples of the
checkpoint's data set through the project's model and SpikingJelly's import of the file, both in float64, and
reports the largest logit difference, the argmax agreement and every spiking layer's spike count on both sides.
Needs ``pip install -e '.[nir]'`` (and SpikingJelly, in the ``dev`` extra, for the check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..core.nir_graph import NIRExportError, lif_names, spikingjelly_run
from ..data import DataFormatError, DataNotFoundError, FrameSettings, load_dataset, model_input
from ..data.catalog import DATASETS
from ..tracking.registry import nir_graph
from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["export_checkpoint", "main", "verify_export"]

INSTALL = "NIR export needs the nir extra: pip install -e '.[nir]'"
CHECK = "--verify needs SpikingJelly 2.0: pip install spikingjelly==2.0.0 loguru (or the dev extra)"


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the checkpoint's network to ``out`` as NIR; returns the graph's metadata."""
    try:
        import nir
    except ImportError as e:
        raise ImportError(INSTALL) from e
    model, cfg = load_checkpoint(checkpoint)
    graph = nir_graph(model, cfg)
    nir.write(str(out), graph)
    return graph.metadata


def _inputs(cfg, data_dir, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` test samples, normalised as in training, float64, and their labels."""
    spec = DATASETS[cfg.data.dataset]
    if spec.streamed:
        raise ConfigError(f"--verify reads the in-memory data sets, not the image folders of {spec.name!r}")
    frames = FrameSettings.of(cfg) if spec.events else None
    root = data_dir if data_dir is not None else cfg.data.data_dir
    data = load_dataset(spec.name, root, download=cfg.data.download, frames=frames)
    return model_input(data.test_images[:samples], spec).double(), data.test_labels[:samples]


@torch.no_grad()
def _project_run(model, x: torch.Tensor) -> tuple[np.ndarray, dict[str, float]]:
    """The project's per-step output ``[T, N, K]`` and every spiking layer's spike count (by NIR node name)."""
    names, counts = lif_names(model), {}
    modules = dict(model.named_modules())

    def hook(name):
        def count(module, args, out):
            counts[name] = counts.get(name, 0.0) + float((out[0] if isinstance(out, tuple) else out).sum())

        return count

    handles = [modules[path].register_forward_hook(hook(node)) for path, node in names.items()]
    if model.maxpool is not None:
        handles.append(model.maxpool.register_forward_hook(hook("maxpool")))
    try:
        out = model(x, per_step=True)
    finally:
        for h in handles:
            h.remove()
    return out.numpy(), counts


def verify_export(path, checkpoint, samples: int = 1000, data_dir=None, batch: int = 100) -> dict[str, Any]:
    """The graph at ``path`` through SpikingJelly against the checkpoint's model (float64) on ``samples`` test
    samples: ``max_abs_logit_diff``, ``argmax_agreement`` (%), ``spikes_identical`` (every layer's count), the
    project's and SpikingJelly's ``spikes`` per layer, the test ``accuracy`` of both (%)."""
    model, cfg = load_checkpoint(checkpoint)
    model = model.double()
    x, y = _inputs(cfg, data_dir, samples)
    steps = model.timesteps
    outs, sj_outs, counts, sj_counts = [], [], {}, {}
    for xb in x.split(batch):
        out, c = _project_run(model, xb)
        seq = xb.transpose(0, 1) if xb.dim() == 5 else xb.unsqueeze(0).expand(steps, *xb.shape)
        sj_out, sj_c = spikingjelly_run(str(path), seq.contiguous().numpy())
        outs.append(out), sj_outs.append(sj_out)
        for total, part in ((counts, c), (sj_counts, sj_c)):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
    logits, sj_logits = np.concatenate(outs, 1).mean(0), np.concatenate(sj_outs, 1).mean(0)
    labels = y.numpy()
    return {
        "samples": len(labels),
        "max_abs_logit_diff": float(np.abs(logits - sj_logits).max()),
        "argmax_agreement": 100.0 * float((logits.argmax(1) == sj_logits.argmax(1)).mean()),
        "spikes_identical": counts == sj_counts,
        "spikes": counts,
        "spikingjelly_spikes": sj_counts,
        "accuracy": 100.0 * float((logits.argmax(1) == labels).mean()),
        "spikingjelly_accuracy": 100.0 * float((sj_logits.argmax(1) == labels).mean()),
    }


def _print_verification(r: dict[str, Any]) -> None:
    print(
        f"SpikingJelly 2.0 import (float64, step_mode='m') vs the checkpoint (float64) on {r['samples']} test samples:"
    )
    print(f"  argmax agreement {r['argmax_agreement']:.2f}%   max |logit difference| {r['max_abs_logit_diff']:.3g}")
    print(f"  test accuracy: project {r['accuracy']:.2f}%, SpikingJelly {r['spikingjelly_accuracy']:.2f}%")
    print(f"  spikes per layer (project / SpikingJelly): {'identical' if r['spikes_identical'] else 'DIFFERENT'}")
    width = max(len(n) for n in r["spikes"])
    for name, count in r["spikes"].items():
        other = r["spikingjelly_spikes"].get(name, float("nan"))
        print(f"  {name:<{width}}  {count:>12,.0f}  {other:>12,.0f}{'' if count == other else '  <-'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stbp.export",
        description="Write a checkpoint's network as a NIR graph (OUT.nir); with --verify, check the graph against "
        "the checkpoint through SpikingJelly's NIR importer. '--verify OUT.nir CHECKPOINT' checks a written file.",
    )
    p.add_argument(
        "paths", nargs=2, metavar="PATH", help="CHECKPOINT OUT.nir (or, with --verify first, OUT.nir CHECKPOINT)"
    )
    p.add_argument("--verify", action="store_true", help="check the graph against the checkpoint (SpikingJelly 2.0)")
    p.add_argument("--samples", type=int, default=1000, help="test samples the check runs (default 1000)")
    p.add_argument("--data_dir", "--data-dir", default=None, help="data root (default: $STBP_DATA_DIR, else ./data)")
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    verify_only = bool(raw) and raw[0] == "--verify"
    checkpoint, out = reversed(args.paths) if verify_only else args.paths
    try:
        if not verify_only:
            meta = export_checkpoint(checkpoint, out)
            print(f"wrote {out}: NIR graph of {checkpoint}")
            print("what NIR cannot say (in the graph's metadata):")
            for key, value in meta.items():
                print(f"  {key}: {value.tolist() if isinstance(value, np.ndarray) else value}")
        if args.verify:
            _print_verification(verify_export(out, checkpoint, args.samples, args.data_dir))
    except ImportError as e:
        needs = CHECK if args.verify and getattr(e, "name", "") in ("spikingjelly", "loguru") else INSTALL
        print(f"error: {e}" if needs in str(e) else f"error: {e} ({needs})", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, DataNotFoundError, DataFormatError, NIRExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
