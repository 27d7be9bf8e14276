"""The sweep file and tune.py's options are validated before anything starts: specific errors, no Ray."""

from __future__ import annotations

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
        train_cli=["--epochs", "3", "--lr=0.01"],
        num_samples=5,
        tracking_uri="http://127.0.0.1:5999",
    )
    assert sweep.train.run.epochs == 3 and sweep.train.optim.lr == 0.01
    assert sweep.search.num_samples == 5
    assert sweep.mlflow.tracking_uri == "http://127.0.0.1:5999"
    assert sweep.train.tracking.mlflow is True  # a sweep always records its trials


def test_defaults_max_t_to_epochs_and_mode_to_the_metric(tmp_path):
    sweep = load_sweep(write(tmp_path, {**BASE, "metric": "val_loss"}))
    assert sweep.mode == "min" and sweep.max_t == 2
    assert sweep.experiment == "sweep-t"


def test_resolved_sweep_records_the_overrides(tmp_path):
    data = sweep_to_dict(load_sweep(write(tmp_path, BASE), train_cli=["--epochs", "3"]))
    assert data["train"]["run"]["epochs"] == 3
    assert data["space"]["v_th"] == {"type": "uniform", "low": 0.2, "high": 0.8}


# ---------------------------------------------------------------- errors, each naming the key


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        (
            "serach",
            {},
            ["unknown sweep key serach", "did you mean 'search'", "valid keys: name, train, space"],
        ),
        ("search.num_sample", 3, ["unknown sweep key search.num_sample", "did you mean 'num_samples'"]),
        ("search.num_samples", "many", ["search.num_samples expects an int", "'many'"]),
        ("search.num_samples", 0, ["search.num_samples must be >= 1, got 0"]),
        ("search.max_concurrent", 0, ["search.max_concurrent must be >= 1"]),
        ("search.searcher", "hyperopt", ["search.searcher must be one of 'optuna'", "'hyperopt'"]),
        ("search.sampler", "grid", ["search.sampler must be one of 'tpe', 'nsga2', 'random'"]),
        ("scheduler.type", "pbt", ["scheduler.type must be one of 'asha', 'none'", "'pbt'"]),
        ("scheduler.grace_period", 2, ["scheduler.grace_period (2) must be < max_t (2)", "scheduler: none"]),
        ("scheduler.max_t", 5, ["scheduler.max_t (5) exceeds the trial's epochs (2)"]),
        ("scheduler.reduction_factor", 1, ["scheduler.reduction_factor must be > 1"]),
        (
            "metric",
            "test_acc",
            ["metric must be one of 'val_acc', 'val_loss', 'train_acc', 'train_loss', 'spikes_per_image'"],
        ),
        ("mode", "maximum", ["mode must be one of 'max', 'min'"]),
        ("resources.gpus", -1, ["resources.gpus must be >= 0"]),
        ("resources.workers", 0, ["resources.workers must be >= 1"]),
        ("resources.cpus", "two", ["resources.cpus expects a number"]),
        ("resources.workers", 3, ["batch_size (32, global) must be divisible by resources.workers (3)"]),
        (
            "failures.max_failure",
            1,
            ["unknown sweep key failures.max_failure", "did you mean 'max_failures'"],
        ),
        ("failures.max_failures", -2, ["failures.max_failures must be >= 0"]),
        ("checkpoints.num_to_keep", 0, ["checkpoints.num_to_keep must be >= 1"]),
        (
            "mlflow.tracking_url",
            "x",
            ["unknown sweep key mlflow.tracking_url", "did you mean 'tracking_uri'"],
        ),
        ("name", "my sweep", ["name must be letters, digits"]),
        ("name", 3, ["name expects a string"]),
    ],
)
def test_invalid_sweep_keys_are_named_with_the_valid_choices(tmp_path, dotted, value, expected):
    message = error_of(with_change(tmp_path, dotted, value))
    assert message.startswith(str(tmp_path / "sweep.yaml"))
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    ("param", "spec", "expected"),
    [
        (
            "v_th",
            {"type": "uniform", "low": 0.8, "high": 0.2},
            "space.v_th: low must be < high, got low=0.8, high=0.2",
        ),
        ("v_th", {"type": "uniform", "low": 0.5, "high": 0.5}, "low must be < high"),
        (
            "v_th",
            {"type": "loguniform", "low": 0.0, "high": 1.0},
            "space.v_th: loguniform needs low > 0, got low=0.0",
        ),
        (
            "v_th",
            {"type": "normal", "low": 0.1, "high": 1.0},
            "space.v_th.type must be one of 'uniform', 'loguniform', 'int', 'choice'",
        ),
        ("v_th", {"type": "uniform", "low": "a", "high": 1.0}, "space.v_th.low expects a number"),
        (
            "v_th",
            {"type": "uniform", "low": 0.1, "hi": 1.0},
            "unknown sweep key space.v_th.hi (did you mean 'high'?)",
        ),
        ("v_th", {"type": "uniform", "low": -0.5, "high": 1.0}, "space.v_th.low: v_th must be > 0, got -0.5"),
        ("v_th", {"type": "choice", "values": []}, "space.v_th.values must be a non-empty list"),
        (
            "readout",
            {"type": "choice", "values": ["mean", "max"]},
            "space.readout.values[1]: readout must be one of",
        ),
        ("timesteps", {"type": "int", "low": 1.5, "high": 4}, "space.timesteps.low expects an int"),
        ("width", {"type": "int", "low": 1, "high": 4}, None),  # ints are valid floats
        (
            "timesteps",
            {"type": "uniform", "low": 1.0, "high": 4.0},
            "space.timesteps.low: timesteps expects an int",
        ),
        (
            "vth",
            {"type": "uniform", "low": 0.1, "high": 1.0},
            "space.vth is not a training config field (did you mean 'v_th'?)",
        ),
        ("output_dir", {"type": "choice", "values": ["a"]}, "space.output_dir cannot be searched"),
    ],
)
def test_invalid_search_space_is_refused(tmp_path, param, spec, expected):
    data = {**BASE, "space": {param: spec}, "search": {"num_samples": 2}}
    if expected is None:
        load_sweep(write(tmp_path, data))
        return
    assert expected in error_of(write(tmp_path, data))


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        (
            [{"v_th": 0.1, "aa": 0.5}],
            "search.points_to_evaluate[0].v_th = 0.1 is outside space.v_th uniform[0.2, 0.8]",
        ),
        ([{"v_th": 0.4}], "search.points_to_evaluate[0] is missing aa"),
        ([{"v_th": 0.4, "aa": 0.5, "lr": 0.1}], "unknown sweep key search.points_to_evaluate[0].lr"),
        ({"v_th": 0.4}, "search.points_to_evaluate must be a list"),
        ([{"v_th": 0.4, "aa": 0.5}] * 4, "search.num_samples (3) is smaller than the 4 points_to_evaluate"),
    ],
)
def test_invalid_points_to_evaluate_are_refused(tmp_path, points, expected):
    assert expected in error_of(write(tmp_path, {**BASE, "search": {"num_samples": 3, "points_to_evaluate": points}}))


def test_invalid_train_fields_reuse_the_config_messages(tmp_path):
    assert "train: lr must be > 0, got -1.0" in error_of(with_change(tmp_path, "train.lr", -1.0))
    message = error_of(with_change(tmp_path, "train.epoch", 2))
    assert "train: unknown config field 'epoch' (did you mean 'epochs'?)" in message
    assert "unknown preset 'huge'" in error_of(with_change(tmp_path, "train.preset", "huge"))
    message = error_of(write(tmp_path, BASE), train_cli=["--batch_size", "many"])
    assert "train: batch_size expects an int" in message


def test_fields_each_trial_sets_cannot_be_given(tmp_path):
    assert "train: output_dir is set by each trial" in error_of(with_change(tmp_path, "train.output_dir", "x"))
    assert "run_id is set by each trial" in error_of(write(tmp_path, BASE), train_cli=["--run_id", "abc"])


def test_num_samples_below_one_from_the_command_line_is_refused(tmp_path):
    assert "search.num_samples must be >= 1, got 0" in error_of(write(tmp_path, BASE), num_samples=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("name: [unclosed", "is not valid YAML"),
        ("- a\n- b\n", "must contain a mapping"),
    ],
)
def test_a_sweep_file_that_is_not_a_yaml_mapping_is_refused(tmp_path, text, expected):
    message = error_of(write(tmp_path, text=text))
    assert "sweep file" in message and expected in message


def test_a_missing_sweep_file_is_refused(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")


def test_required_keys_are_named(tmp_path):
    assert "missing required key 'space'" in error_of(with_change(tmp_path, "space", None, remove=True))


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
    sweep = load_sweep(write(tmp_path, BASE), ["--data_dir", str(tmp_path / "nowhere"), "--download", "false"])
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
    changed = load_sweep(write(tmp_path, BASE), train_cli=["--epochs", "3"])
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
    assert "error: " in proc.stderr and "space.v_th: loguniform needs low > 0" in proc.stderr
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
    ("change", "expected"),
    [
        ({"mode": ["max"]}, "metric and mode must have the same length"),
        ({"mode": "max"}, "metric and mode must have the same length"),
        ({"metric": ["val_acc", "sops_per_imag"]}, "metric[1] must be one of 'val_acc'"),
        ({"metric": ["val_acc", "sops_per_imag"]}, "(did you mean 'sops_per_image'?)"),
        ({"metric": ["val_acc", "val_acc"]}, "metric must name each metric once"),
        ({"mode": ["max", "down"]}, "mode[1] must be one of 'max', 'min', got 'down'"),
        ({"scheduler": {"type": "asha", "grace_period": 1}}, "scheduler: asha ranks trials by one metric"),
        ({"scheduler": {"type": "asha", "grace_period": 1}}, "`scheduler: none` for a multi-objective sweep"),
        ({"train": {"preset": "tiny", "epochs": 2, "firing_rates": False}}, "train.firing_rates must stay true"),
    ],
)
def test_a_bad_metric_list_is_refused_naming_the_key(tmp_path, change, expected):
    message = error_of(write(tmp_path, {**MULTI, **change}))
    assert expected in message, message


def test_one_metric_override_makes_the_smoke_sweep_multi_objective_and_says_asha_is_off(capsys):
    sweep = load_sweep(ROOT / "sweeps" / "smoke.yaml", metric=["val_acc", "sops_per_image"])
    assert sweep.metrics == ("val_acc", "sops_per_image") and sweep.modes == ("max", "min")
    assert sweep.scheduler.type == "none" and "ASHA (which ranks trials by one) is off" in capsys.readouterr().out
    single = load_sweep(ROOT / "sweeps" / "smoke.yaml", metric=["sops_per_image"])
    assert (single.metric, single.mode, single.scheduler.type) == ("sops_per_image", "min", "asha")
