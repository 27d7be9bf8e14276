"""Hyperparameter sweeps: Ray Tune drives Optuna over the training config; MLflow records every trial.

    from stbp.sweep import load_sweep, run_sweep
    sweep = load_sweep("sweeps/vth_aa.yaml", overrides={"epochs": 2})  # validated; nothing started
    run_sweep(sweep)                                                        # Ray, trials, MLflow, report

The modules, each importing only those above it:

    spec      the sweep file: its sections, loading and validation (no Ray, no MLflow)
    record    the MLflow record: the parent run, a child run per trial, the Tune callback, rows read back
    trial     the trial function (and its DDP variant under Ray Train)
    searcher  Optuna under Ray Tune, every sampled point numbered and repeated
    analysis  what the trials say: the working region, aa/v_th, the Pareto front (pure functions of the rows)
    plots     the pictures: the landscape, one-parameter slices, the Pareto front
    compare   learn or sweep: fixed against learned neurons, point by point
    report    the end of a sweep: CSV, table, plots, importances, best config, the registered model
    run       pre-flight checks, Ray, the searcher, the scheduler and the tuner: run_sweep
    schema    the JSON Schemas of a training config file and of a sweep file, for editors
"""

from .spec import METRICS, Sweep, SweepError, load_sweep, sweep_to_dict

__all__ = ["METRICS", "Sweep", "SweepError", "load_sweep", "run_sweep", "sweep_to_dict"]


def run_sweep(sweep: Sweep, **kwargs) -> int:
    """:func:`stbp.sweep.run.run_sweep`, imported when called (Ray and MLflow load only when a sweep runs)."""
    from .run import run_sweep

    return run_sweep(sweep, **kwargs)
