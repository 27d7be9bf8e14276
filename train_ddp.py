"""Train the spiking ResNet-19: ``python train_ddp.py`` or ``torchrun --standalone --nproc-per-node=N train_ddp.py``.

Without --preset (and without a --config file that names one), the preset fits the hardware: 'seed', the
reference's setting, where there are GPUs, else 'cpu'; the first line printed says which. Every config field is
an option, --field VALUE or --section.field VALUE (dashes work too: --batch-size); --schema prints the JSON
Schema of a --config file.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]):
    from stbp.config import build_config, config_parser, load_yaml, parse_args, train_schema

    raw = argparse.RawDescriptionHelpFormatter
    args, fields = parse_args(config_parser(schema=train_schema, description=__doc__, formatter_class=raw), argv)
    config, preset = getattr(args, "config", None), getattr(args, "preset", None)
    if preset is None and (config is None or "preset" not in load_yaml(config)):
        preset = hardware_preset()
    return build_config(preset=preset, yaml_path=config, cli=fields)


def hardware_preset() -> str:
    """``seed`` (the reference's setting) where CUDA GPUs are, else ``cpu``; said once, by rank 0."""
    import os

    import torch

    gpus = torch.cuda.device_count()
    preset, why = ("seed", f"the reference's setting, on {gpus} GPU(s)") if gpus else ("cpu", "no GPU here")
    if os.environ.get("RANK", "0") == "0":
        print(f"[stbp] preset {preset!r} ({why}); --preset NAME chooses another, e.g. gpu, cpu, tiny, cifar10")
    return preset


def main(argv: list[str] | None = None) -> int:
    from stbp.config import ConfigError
    from stbp.data import DataFormatError, DataNotFoundError
    from stbp.tracking import TrackingError
    from stbp.train import Preempted, TrainingDiverged, train
    from stbp.train.checkpoint import CheckpointError

    try:
        train(parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, DataNotFoundError, DataFormatError, TrackingError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # on every rank: a torchrun agent sees them all end alike
        print(f"[stbp] {e}; the same command resumes it there")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
