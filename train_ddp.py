"""Train the spiking ResNet-19: ``python train_ddp.py`` or ``torchrun --nproc-per-node=N train_ddp.py``.

    train_ddp.py [--config FILE.yaml] [--preset NAME] [--field value ...]
    train_ddp.py --help | --schema

Without ``--preset`` (and without a config file that names one), the preset fits the hardware: ``seed``, the
reference's setting, where there are GPUs, else ``cpu``; the first line printed says which.
Every config field can be given as ``--field value`` (dashes or underscores, or dotted: ``--model.v_th``);
``--help`` lists them with their defaults, ``--schema`` prints the JSON Schema of a config file.
"""

from __future__ import annotations

import sys


def parse_args(argv: list[str]):
    from stbp.config import ConfigError, build_config, load_yaml, preset_names

    config_path = preset = None
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        key, _, inline = arg.partition("=")
        if key in ("--config", "--preset"):
            value = inline or next(it, None)
            if value is None:
                raise ConfigError(f"{key} needs a value")
            if key == "--config":
                config_path = value
            else:
                preset = value
        elif arg in ("-h", "--help", "--help-fields"):
            from stbp.schema import fields_help

            print(__doc__)
            print("presets (stbp/presets/):", ", ".join(preset_names()))
            print(fields_help())
            sys.exit(0)
        elif arg == "--schema":
            import json

            from stbp.schema import train_schema

            print(json.dumps(train_schema(), indent=2))
            sys.exit(0)
        else:
            rest.append(arg)
    if preset is None and (config_path is None or "preset" not in load_yaml(config_path)):
        preset = hardware_preset()
    return build_config(preset=preset, yaml_path=config_path, cli=rest)


def hardware_preset() -> str:
    """``seed`` (the reference's setting) where CUDA GPUs are, else ``cpu``; said once, by rank 0."""
    import os

    import torch

    gpus = torch.cuda.device_count()
    preset, why = ("seed", f"the reference's setting, on {gpus} GPU(s)") if gpus else ("cpu", "no GPU here")
    if os.environ.get("RANK", "0") == "0":
        print(
            f"[stbp] preset {preset!r} ({why}); --preset NAME chooses another, e.g. gpu, cpu, tiny, cifar10", flush=True
        )
    return preset


def main(argv: list[str] | None = None) -> int:
    from stbp.checkpoint import CheckpointError
    from stbp.config import ConfigError
    from stbp.data import DataFormatError, DataNotFoundError
    from stbp.tracking import TrackingError
    from stbp.train import TrainingDiverged, train

    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ConfigError, DataNotFoundError, DataFormatError, TrackingError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
