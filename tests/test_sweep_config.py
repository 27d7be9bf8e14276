"""The sweep file and tune.py's options are validated before anything starts: specific errors, no Ray."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from stbp.config import ConfigError
from stbp.sweep import SweepError, load_sweep, run_sweep, sweep_to_dict
from stbp.tracking import TrackingError
from tests._dist import free_port

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "train": {"preset": "tiny", "epochs": 2},
    "space": {
        "v_th": {"type": "uniform", "low": 0.2, "high": 0.8},
        "aa": {"type": "uniform", "low": 0.2, "high": 1.0},
    },
    "search": {"num_samples": 3, "points_to_evaluate": [{"v_th": 0.4, "aa": 0.5}]},
    "scheduler": {"type": "asha", "grace_period": 1},
}


def write(tmp_path, data=None, text=None) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return path


def with_change(tmp_path, dotted: str, value, remove: bool = False) -> Path:
    """BASE with one (dotted) key set or removed, written to a file."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if remove:
        node.pop(leaf)
    else:
        node[leaf] = value
    return write(tmp_path, data)


def error_of(path, **kwargs) -> str:
    with pytest.raises(SweepError) as info:
        load_sweep(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- the shipped sweeps


@pytest.mark.parametrize("name", ["vth_aa.yaml", "smoke.yaml"])
def test_shipped_sweeps_are_valid_and_contain_the_reference_point_with_room(name):
    sweep = load_sweep(ROOT / "sweeps" / name)
    space = sweep.space
    assert set(space) == {"v_th", "aa"}
    for param, ref in (("v_th", 0.4), ("aa", 0.5)):
        assert space[param].low < ref < space[param].high  # room on both sides
    assert {"v_th": 0.4, "aa": 0.5} in sweep.search.points_to_evaluate
    assert sweep.search.searcher == "optuna" and sweep.search.sampler == "tpe"
    assert sweep.metric == "val_acc" and sweep.mode == "max"


def test_the_shipped_energy_sweep_trades_accuracy_against_synaptic_operations_on_gpus():
    sweep = load_sweep(ROOT / "sweeps" / "vth_aa_energy.yaml")
    assert (sweep.metrics, sweep.modes, sweep.scheduler.type) == (("val_acc", "sops_per_image"), ("max", "min"), "none")
    assert {"v_th": 0.4, "aa": 0.5} in sweep.search.points_to_evaluate and sweep.resources.gpus == 1
    assert sweep.mlflow.registered_model == "stbp-vth_aa_energy"


def test_smoke_sweep_is_small_and_cpu_only():
    sweep = load_sweep(ROOT / "sweeps" / "smoke.yaml")
    assert sweep.train.preset == "cpu" and sweep.train.run.epochs <= 3
    assert 0 < sweep.train.data.train_size <= 8192  # a slice of the real MNIST
    assert 8 <= sweep.search.num_samples <= 12
    assert sweep.resources.gpus == 0 and sweep.resources.cpus == 1 and sweep.resources.workers == 1
    assert sweep.scheduler.type == "asha" and sweep.scheduler.grace_period == 2


def test_vth_aa_sweep_is_sized_for_gpus():
    sweep = load_sweep(ROOT / "sweeps" / "vth_aa.yaml")
    assert sweep.resources.gpus >= 1 and sweep.train.preset == "gpu"
    assert sweep.failures.max_failures >= 1


# ---------------------------------------------------------------- command-line overrides


def test_field_overrides_change_every_trials_base_config(tmp_path):
    sweep = load_sweep(
        write(tmp_path, BASE),
        overrides={"epochs": 3, "lr": 0.01},
        num_samples=5,
        tracking_uri="http://127.0.0.1:5999",
    )
    assert sweep.train.run.epochs == 3 and sweep.train.optim.lr == 0.01
    assert sweep.search.num_samples == 5
    assert sweep.mlflow.tracking_uri == "http://127.0.0.1:5999"
    assert sweep.train.tracking.mlflow is True  # a sweep always records its trials


def test_repeated_points_run_without_asha(tmp_path):
    sweep = load_sweep(write(tmp_path, {**BASE, "scheduler": "none", "search": {"num_samples": 3, "repeats": 3}}))
    assert (sweep.search.num_samples, sweep.search.repeats, sweep.scheduler.type) == (3, 3, "none")


GRID = {
    **BASE,
    "space": {
        "v_th": {"type": "choice", "values": [0.4, 1.45]},
        "aa": {"type": "choice", "values": [0.21, 0.5, 1.0]},
        "learn_v_th": {"type": "choice", "values": [False, True]},
    },
    "search": {"sampler": "grid", "num_samples": 12},
}


def test_a_grid_tries_every_combination_of_the_choices_once(tmp_path):
    sweep = load_sweep(write(tmp_path, GRID))
    points = sweep.search.points_to_evaluate
    assert len(points) == len({tuple(p.items()) for p in points}) == 12
    assert {(p["v_th"], p["aa"], p["learn_v_th"]) for p in points} == {
        (v, a, learn) for v in (0.4, 1.45) for a in (0.21, 0.5, 1.0) for learn in (False, True)
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"space": {**GRID["space"], "v_th": {"type": "uniform", "low": 0.2, "high": 0.8}}}, ["space.v_th", "uniform"]),
        ({"search": {"sampler": "grid", "num_samples": 8}}, ["search.num_samples", "12", "8"]),
        ({"search": {**GRID["search"], "points_to_evaluate": [{"v_th": 0.4}]}}, ["search.points_to_evaluate"]),
    ],
)
def test_a_grid_that_is_not_one_is_refused(tmp_path, change, named):
    message = error_of(write(tmp_path, {**GRID, **change}))
    assert all(part in message for part in named), message


def test_a_sweep_made_again_keeps_its_grid_and_its_file(tmp_path):
    """The next sweep of a file (name-2) is the sweep made again under its new name, validated again."""
    sweep = load_sweep(write(tmp_path, GRID))
    again = dataclasses.replace(sweep, name="t-2")
    assert (
        again.search.points_to_evaluate == sweep.search.points_to_evaluate
        and len(again.search.points_to_evaluate) == 12
    )
    assert (again.source, again.mode, again.mlflow.registered_model) == (str(tmp_path / "sweep.yaml"), "max", "stbp-t")


def test_defaults_max_t_to_epochs_and_mode_to_the_metric(tmp_path):
    sweep = load_sweep(write(tmp_path, {**BASE, "metric": "val_loss"}))
    assert sweep.mode == "min" and sweep.max_t == 2
    assert sweep.experiment == "sweep-t"


def test_resolved_sweep_records_the_overrides(tmp_path):
    data = sweep_to_dict(load_sweep(write(tmp_path, BASE), overrides={"epochs": 3}))
    assert data["train"]["run"]["epochs"] == 3
    assert data["space"]["v_th"] == {"type": "uniform", "low": 0.2, "high": 0.8}


# ---------------------------------------------------------------- errors, each naming the key


@pytest.mark.parametrize(
    ("dotted", "value", "named"),
    [
        ("serach", {}, ["serach", "did you mean 'search'"]),
        ("search.num_sample", 3, ["search.num_sample", "did you mean 'num_samples'"]),
        ("search.num_samples", "many", ["search.num_samples", "'many'"]),
        ("search.num_samples", 0, ["search.num_samples", "got 0"]),
        ("search.max_concurrent", 0, ["search.max_concurrent", "got 0"]),
        ("search.repeats", 0, ["search.repeats", "got 0"]),
        ("search.repeats", 3, ["scheduler", "asha", "scheduler: none"]),  # ASHA would stop replicates apart
        ("search.searcher", "hyperopt", ["search.searcher", "'hyperopt'"]),
        ("search.sampler", "cmaes", ["search.sampler", "'cmaes'"]),
        ("scheduler.type", "pbt", ["scheduler.type", "'pbt'"]),
        ("scheduler.grace_period", 2, ["scheduler.grace_period", "got 2", "scheduler: none"]),
        ("scheduler.max_t", 5, ["scheduler.max_t", "(5)"]),
        ("scheduler.reduction_factor", 1, ["scheduler.reduction_factor", "got 1"]),
        ("metric", "test_acc", ["metric", "'test_acc'"]),
        ("metric", "val_ac", ["metric", "'val_ac'", "did you mean 'val_acc'"]),
        ("mode", "maximum", ["mode", "'maximum'", "did you mean 'max'"]),
        ("resources.gpus", -1, ["resources.gpus", "got -1"]),
        ("resources.workers", 0, ["resources.workers", "got 0"]),
        ("resources.cpus", "two", ["resources.cpus", "'two'"]),
        ("resources.workers", 3, ["batch_size", "resources.workers (3)", "32"]),
        ("failures.max_failure", 1, ["failures.max_failure", "did you mean 'max_failures'"]),
        ("failures.max_failures", -2, ["failures.max_failures", "got -2"]),
        ("checkpoints.num_to_keep", 0, ["checkpoints.num_to_keep", "got 0"]),
        ("mlflow.tracking_url", "x", ["mlflow.tracking_url", "did you mean 'tracking_uri'"]),
        ("name", "my sweep", ["name", "'my sweep'"]),
        ("name", 3, ["name", "got 3"]),
    ],
)
def test_an_invalid_sweep_key_is_named_with_its_value(tmp_path, dotted, value, named):
    message = error_of(with_change(tmp_path, dotted, value))
    assert message.startswith(str(tmp_path / "sweep.yaml"))
    for part in named:
        assert part in message, message


@pytest.mark.parametrize(
    ("param", "spec", "named"),
    [
        ("v_th", {"type": "uniform", "low": 0.8, "high": 0.2}, ["space.v_th", "low=0.8, high=0.2"]),
        ("v_th", {"type": "uniform", "low": 0.5, "high": 0.5}, ["space.v_th", "low must be < high"]),
        ("v_th", {"type": "loguniform", "low": 0.0, "high": 1.0}, ["space.v_th", "low > 0", "low=0.0"]),
        ("v_th", {"type": "normal", "low": 0.1, "high": 1.0}, ["space.v_th", "'normal'", "'uniform'"]),
        ("v_th", {"type": "uniform", "low": "a", "high": 1.0}, ["space.v_th", "low", "'a'"]),
        ("v_th", {"type": "uniform", "low": 0.1, "hi": 1.0}, ["space.v_th", "hi", "did you mean 'high'"]),
        ("v_th", {"type": "uniform", "low": -0.5, "high": 1.0}, ["space.v_th.low", "model.v_th", "-0.5"]),
        ("v_th", {"type": "choice", "values": []}, ["space.v_th", "values", "[]"]),
        ("readout", {"type": "choice", "values": ["mean", "max"]}, ["space.readout.values[1]", "'max'"]),
        ("timesteps", {"type": "int", "low": 1.5, "high": 4}, ["space.timesteps", "low", "1.5"]),
        ("width", {"type": "int", "low": 1, "high": 4}, None),  # ints are valid floats
        ("timesteps", {"type": "uniform", "low": 1.0, "high": 4.0}, ["space.timesteps.low", "model.timesteps", "1.0"]),
        ("vth", {"type": "uniform", "low": 0.1, "high": 1.0}, ["space", "'vth'", "did you mean 'v_th'"]),
        ("output_dir", {"type": "choice", "values": ["a"]}, ["space", "'output_dir'"]),
    ],
)
def test_an_invalid_search_space_is_named_with_its_value(tmp_path, param, spec, named):
    data = {**BASE, "space": {param: spec}, "search": {"num_samples": 2}}
    if named is None:
        load_sweep(write(tmp_path, data))
        return
    message = error_of(write(tmp_path, data))
    for part in named:
        assert part in message, message


@pytest.mark.parametrize(
    ("points", "named"),
    [
        ([{"v_th": 0.1, "aa": 0.5}], ["search.points_to_evaluate[0].v_th", "0.1", "uniform[0.2, 0.8]"]),
        ([{"v_th": 0.4}], ["search.points_to_evaluate[0]", "aa"]),
        ([{"v_th": 0.4, "aa": 0.5, "lr": 0.1}], ["search.points_to_evaluate[0]", "lr"]),
        ({"v_th": 0.4}, ["search.points_to_evaluate"]),
        ([{"v_th": 0.4, "aa": 0.5}] * 4, ["search.num_samples", "(3)", "4 points"]),
    ],
)
def test_invalid_points_to_evaluate_are_named(tmp_path, points, named):
    message = error_of(write(tmp_path, {**BASE, "search": {"num_samples": 3, "points_to_evaluate": points}}))
    for part in named:
        assert part in message, message


def test_invalid_train_fields_are_named_under_train(tmp_path):
    message = error_of(with_change(tmp_path, "train.lr", -1.0))
    assert "train: " in message and "optim.lr" in message and "-1.0" in message
    assert "did you mean 'epochs'" in error_of(with_change(tmp_path, "train.epoch", 2))
    assert "'huge'" in error_of(with_change(tmp_path, "train.preset", "huge"))
    message = error_of(write(tmp_path, BASE), overrides={"batch_size": "many"})
    assert "run.batch_size" in message and "'many'" in message


def test_fields_each_trial_sets_cannot_be_given(tmp_path):
    assert "train.output_dir" in error_of(with_change(tmp_path, "train.output_dir", "x"))
    assert "train.run_id" in error_of(write(tmp_path, BASE), overrides={"run_id": "abc"})


def test_num_samples_below_one_from_the_command_line_is_refused(tmp_path):
    message = error_of(write(tmp_path, BASE), num_samples=0)
    assert "search.num_samples" in message and "got 0" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "mapping"),
        ("name: [unclosed", "is not valid YAML"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_a_sweep_file_that_is_not_a_yaml_mapping_is_refused(tmp_path, text, expected):
    message = error_of(write(tmp_path, text=text))
    assert "sweep file" in message and expected in message


def test_a_missing_sweep_file_is_refused(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")


def test_required_keys_are_named(tmp_path):
    message = error_of(with_change(tmp_path, "space", None, remove=True))
    assert "space" in message and "missing" in message


def test_sweep_errors_are_config_errors():
    assert issubclass(SweepError, ConfigError)


# ---------------------------------------------------------------- run_sweep refuses before Ray starts


@pytest.fixture
def no_ray_started():
    import ray

    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "Ray was started before the error"


def test_gpus_on_a_machine_without_them_are_refused_before_ray(tmp_path, monkeypatch, no_ray_started):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    sweep = load_sweep(with_change(tmp_path, "resources.gpus", 1))
    with pytest.raises(SweepError, match="resources.gpus is 1 but this machine has no GPU"):
        run_sweep(sweep, storage=tmp_path / "ray")
    assert not (tmp_path / "ray").exists()


def test_more_cpus_per_trial_than_the_machine_has_are_refused(tmp_path, no_ray_started):
    sweep = load_sweep(with_change(tmp_path, "resources.cpus", 10_000))
    with pytest.raises(SweepError, match="CPUs but this machine has"):
        run_sweep(sweep, storage=tmp_path / "ray")


def test_missing_data_offline_is_refused_before_ray(tmp_path, no_ray_started):
    sweep = load_sweep(write(tmp_path, BASE), {"data_dir": str(tmp_path / "nowhere"), "download": False})
    with pytest.raises(SweepError, match=r"(?s)the trials would find no MNIST.*download=False.*nowhere"):
        run_sweep(sweep, storage=tmp_path / "ray")
    assert not (tmp_path / "ray").exists()


def test_an_unreachable_tracking_server_is_refused_before_ray(tmp_path, no_ray_started):
    sweep = load_sweep(write(tmp_path, BASE), tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match="unreachable"):
        run_sweep(sweep, storage=tmp_path / "ray")


def test_running_a_sweep_again_names_a_new_one_and_resume_picks_the_latest_or_the_named(tmp_path):
    from stbp.sweep.run import _resolve_sweep

    sweep, storage = load_sweep(write(tmp_path, BASE)), tmp_path / "ray"
    assert _resolve_sweep(sweep, storage, False).name == "t"  # the first
    for name in ("t", "t-2"):  # started: the MLflow parent is recorded
        (storage / name).mkdir(parents=True)
        (storage / name / "mlflow_parent.json").write_text("{}")
    third = _resolve_sweep(sweep, storage, False)
    assert (third.name, third.experiment) == ("t-3", sweep.experiment)  # one experiment: trials compare
    assert _resolve_sweep(sweep, storage, True).name == "t-2"  # --resume: the most recent
    assert _resolve_sweep(sweep, storage, "t").name == "t"  # --resume t: that one
    (storage / "t-3").mkdir()
    (storage / "t-3" / "sweep.yaml").write_text("{}")  # stopped before it started: started again, not skipped
    assert _resolve_sweep(sweep, storage, False).name == "t-3"
    with pytest.raises(SweepError, match="--resume other: not a sweep of this file"):
        _resolve_sweep(sweep, storage, "other")


def test_resume_without_a_sweep_to_resume_is_refused(tmp_path, no_ray_started):
    sweep = load_sweep(write(tmp_path, BASE))
    with pytest.raises(SweepError, match="nothing to resume"):
        run_sweep(sweep, storage=tmp_path / "ray", resume=True)


def test_resume_with_a_different_sweep_is_refused(tmp_path, no_ray_started):
    first = load_sweep(write(tmp_path, BASE))
    (tmp_path / "ray" / "t").mkdir(parents=True)
    (tmp_path / "ray" / "t" / "sweep.yaml").write_text(yaml.safe_dump(sweep_to_dict(first)))
    changed = load_sweep(write(tmp_path, BASE), overrides={"epochs": 3})
    with pytest.raises(SweepError, match="differs from the one in .* in train"):
        run_sweep(changed, storage=tmp_path / "ray", resume=True)


def test_tune_py_reports_a_bad_sweep_file_and_exits_2_without_starting_ray(tmp_path):
    path = write(
        tmp_path,
        text=textwrap.dedent("""\
        name: t
        train: {preset: tiny}
        space: {v_th: {type: loguniform, low: 0, high: 1}}
    """),
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune.py"), "--sweep", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: " in proc.stderr and "space.v_th" in proc.stderr and "low > 0" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not PORT_RANGE.exists(), reason="Linux only")
def test_dashboard_port_is_free_and_outside_the_ports_the_kernel_hands_out():
    from stbp.ports import ephemeral_ports, free_port

    low, high = ephemeral_ports()
    assert (low, high) == tuple(int(p) for p in PORT_RANGE.read_text().split())
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < 32768 and not low <= p <= high for p in ports), ports  # nor Ray's worker ports
    assert len(ports) > 1  # drawn at random, not a fixed port two sweeps on one machine would share
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free when returned


# ---------------------------------------------------------------- multi-objective sweeps

MULTI = {**BASE, "metric": ["val_acc", "sops_per_image"], "scheduler": "none", "search": {"num_samples": 3}}


def test_a_metric_list_is_a_multi_objective_sweep_with_natural_modes(tmp_path):
    sweep = load_sweep(write(tmp_path, MULTI))
    assert (sweep.metrics, sweep.modes, sweep.multi_objective) == (("val_acc", "sops_per_image"), ("max", "min"), True)
    given = load_sweep(write(tmp_path, {**MULTI, "mode": ["max", "max"], "search": {"sampler": "nsga2"}}))
    assert given.modes == ("max", "max") and given.search.sampler == "nsga2"
    one = load_sweep(write(tmp_path, {**BASE, "metric": ["val_loss"]}))  # a list of one is one metric
    assert (one.metric, one.mode, one.multi_objective) == ("val_loss", "min", False)
    assert sweep_to_dict(sweep)["metric"] == ["val_acc", "sops_per_image"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"mode": ["max"]}, ["mode", "'max'"]),
        ({"mode": "max"}, ["mode", "'max'"]),
        ({"metric": ["val_acc", "sops_per_imag"]}, ["metric[1]", "'sops_per_imag'", "did you mean 'sops_per_image'"]),
        ({"metric": ["val_acc", "val_acc"]}, ["metric", "['val_acc', 'val_acc']"]),
        ({"mode": ["max", "down"]}, ["mode[1]", "'down'"]),
        ({"scheduler": {"type": "asha", "grace_period": 1}}, ["scheduler", "asha", "scheduler: none"]),
        ({"train": {"preset": "tiny", "epochs": 2, "firing_rates": False}}, ["train.firing_rates"]),
    ],
)
def test_a_bad_metric_list_is_named(tmp_path, change, named):
    message = error_of(write(tmp_path, {**MULTI, **change}))
    for part in named:
        assert part in message, message


def test_one_metric_override_makes_the_smoke_sweep_multi_objective_and_says_asha_is_off(capsys):
    sweep = load_sweep(ROOT / "sweeps" / "smoke.yaml", metric=["val_acc", "sops_per_image"])
    assert sweep.metrics == ("val_acc", "sops_per_image") and sweep.modes == ("max", "min")
    assert sweep.scheduler.type == "none" and "ASHA (which ranks trials by one) is off" in capsys.readouterr().out
    single = load_sweep(ROOT / "sweeps" / "smoke.yaml", metric=["sops_per_image"])
    assert (single.metric, single.mode, single.scheduler.type) == ("sops_per_image", "min", "asha")
