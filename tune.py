"""Sweep v_th, aa (or any training field) with Ray Tune + Optuna; every trial recorded in MLflow.

    python tune.py --sweep sweeps/vth_aa.yaml [--address ADDR] [--resume [NAME]] [--storage DIR]
                   [--tracking_uri URI] [--num_samples N] [--metric M[,M2]] [--field value ...]
    python tune.py --schema        # the JSON Schema of a sweep file (sweeps/sweep.schema.json)

``--field value`` overrides the base training config of every trial (e.g. ``--epochs 2``); the sweep file
(validated before anything starts) is documented in sweeps/vth_aa.yaml.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--sweep", help="the sweep file (YAML)")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of a sweep file and exit")
    parser.add_argument("--address", help="join this Ray cluster (default: start a local one on this machine)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="NAME",
        help="continue the most recent sweep of the file's name, or the sweep NAME (e.g. smoke-2)",
    )
    parser.add_argument("--storage", help="directory of the Ray experiment directories (default ./ray_results)")
    parser.add_argument("--tracking_uri", "--tracking-uri", help="MLflow tracking URI (overrides the sweep file)")
    parser.add_argument("--num_samples", "--num-samples", type=int, help="trials in all (overrides the file)")
    parser.add_argument(
        "--metric",
        help="what to optimise (overrides the file's metric and mode): one metric, or several separated "
        "by commas for a multi-objective sweep, e.g. val_acc,sops_per_image (each with its natural mode; ASHA off)",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from stbp.config import ConfigError
    from stbp.sweep import load_sweep, run_sweep
    from stbp.tracking import TrackingError

    args, train_cli = parse_args(sys.argv[1:] if argv is None else argv)
    if args.schema:
        import json

        from stbp.schema import sweep_schema

        print(json.dumps(sweep_schema(), indent=2))
        return 0
    if not args.sweep:
        print("error: --sweep FILE is required (see --help)", file=sys.stderr)
        return 2
    try:
        metric = [m.strip() for m in args.metric.split(",")] if args.metric else None
        sweep = load_sweep(args.sweep, train_cli, args.num_samples, args.tracking_uri, metric=metric)
        return run_sweep(sweep, address=args.address, resume=args.resume, storage=args.storage)
    except (ConfigError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
