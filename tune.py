"""Sweep v_th, aa (or any training field) with Ray Tune + Optuna; every trial recorded in MLflow.

    python tune.py --sweep sweeps/vth_aa.yaml [--address ADDR] [--resume [NAME]] [--field VALUE ...]

The sweep file (validated before anything starts) is documented in sweeps/vth_aa.yaml; a training field given
here (e.g. --epochs 2) overrides the base config of every trial.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]):
    from stbp.config import config_parser, parse_args
    from stbp.sweep.schema import sweep_schema
    from stbp.sweep.spec import TRIAL_OWNED_FIELDS

    raw = argparse.RawDescriptionHelpFormatter
    parser = config_parser(TRIAL_OWNED_FIELDS, False, sweep_schema, description=__doc__, formatter_class=raw)
    add = parser.add_argument
    add("--sweep", required=True, metavar="FILE", help="the sweep file (YAML)")
    add("--address", help="join this Ray cluster (default: start a local one on this machine)")
    add("--resume", nargs="?", const=True, metavar="NAME", help="continue the latest sweep of the file, or NAME")
    add("--storage", help="directory of the Ray experiment directories (default ./ray_results)")
    add("--tracking_uri", help="MLflow tracking URI (overrides the sweep file's)")
    add("--num_samples", type=int, help="trials in all (overrides the file's)")
    add("--metric", help="what to optimise, or several for a Pareto front: val_acc,sops_per_image (natural modes)")
    return parse_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    from stbp.config import ConfigError
    from stbp.tracking import TrackingError

    try:
        args, fields = parse_args(sys.argv[1:] if argv is None else argv)
        from stbp.sweep import load_sweep, run_sweep

        metric = getattr(args, "metric", None)
        options = {k: getattr(args, k, None) for k in ("num_samples", "tracking_uri")}
        sweep = load_sweep(args.sweep, fields, metric=metric and [m.strip() for m in metric.split(",")], **options)
        return run_sweep(sweep, **{k: getattr(args, k, None) for k in ("address", "resume", "storage")})
    except (ConfigError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
