"""stbp.config: defaults, presets, precedence, YAML, the command line, validation and round trips.

A bad value is refused with a message that names its dotted key and the value; a misspelt key gets a
did-you-mean; the entry script exits with status 2 before any work starts. The tests assert those, not wording.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train_ddp
from stbp.config import (
    FIELDS,
    PRESETS,
    SECTION_OF,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    apply_overrides,
    build_config,
    config_from_dict,
    config_to_dict,
    flatten_config,
    parse_cli,
    save_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(key: str, value, **build) -> str:
    """The message of the ConfigError that ``build_config(**build)`` raises; it names ``key`` and ``value``."""
    with pytest.raises(ConfigError) as info:
        build_config(**build)
    message = str(info.value)
    assert key in message, message
    assert value is None or repr(value) in message or str(value) in message, message
    return message


# ---------------------------------------------------------------- defaults and presets


def test_defaults_are_the_reference_values():
    cfg = Config()
    assert (cfg.model.timesteps, cfg.model.v_th, cfg.model.aa, cfg.model.tau, cfg.model.width) == (2, 0.4, 0.5, 0.25, 1)
    assert (cfg.model.readout, cfg.model.fast_lif, cfg.model.sync_bn) == ("mean", True, False)
    assert cfg.data == DataConfig(data_dir=None, train_size=0, val_size=6000, test_size=0, crop_padding=4)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps) == ("adam", 1e-3, (0.9, 0.999), 1e-8)
    assert (cfg.optim.schedule, cfg.optim.lr_step_epochs, cfg.optim.lr_gamma, cfg.optim.grad_clip) == (
        "step",
        10,
        0.1,
        None,
    )
    assert cfg.run == RunConfig(epochs=11, batch_size=64, eval_batch_size=1000, patience=5, output_dir="runs/default")
    assert cfg.tracking == TrackingConfig(experiment="stbp", mlflow=True, tags={})
    assert cfg.preset is None and build_config() == cfg


def test_field_names_are_sorted_unique_leaves():
    names = sorted(FIELDS)
    assert names == sorted(set(names))
    assert {"v_th", "batch_size", "betas", "tags", "resume", "sync_bn"} <= set(names)
    assert "preset" not in names and "model" not in names


def test_the_presets_are_the_shipped_files_and_read_only():
    assert list(PRESETS) == sorted(p.stem for p in (ROOT / "stbp" / "config" / "presets").glob("*.yaml"))
    with pytest.raises(TypeError):
        PRESETS["new"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["cpu"]["epochs"] = 99  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_valid_config_that_records_its_name(name):
    cfg = build_config(preset=name)
    assert cfg.preset == name
    flat = flatten_config(cfg)
    for key, value in PRESETS[name].items():
        assert flat[key] == (tuple(value) if isinstance(value, list) else value), key


def test_seed_preset_has_the_reference_hyperparameters():
    cfg = build_config(preset="seed")
    assert (cfg.model.timesteps, cfg.model.v_th, cfg.model.aa, cfg.model.tau, cfg.model.width) == (2, 0.4, 0.5, 0.25, 1)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.betas, cfg.optim.eps) == ("adam", 1e-3, (0.9, 0.999), 1e-8)
    assert (cfg.optim.schedule, cfg.optim.lr_step_epochs, cfg.optim.lr_gamma) == ("step", 10, 0.1)
    assert (cfg.run.batch_size, cfg.run.epochs, cfg.run.patience, cfg.run.output_dir) == (64, 11, 5, "runs/seed")
    assert (cfg.data.crop_padding, cfg.data.hflip) == (0, False)


def test_cpu_gpu_and_tiny_presets_apply_their_values():
    cpu = build_config(preset="cpu")
    assert (cpu.model.width, cpu.run.epochs, cpu.run.batch_size, cpu.optim.lr) == (0.125, 4, 128, 3e-3)
    assert (cpu.optim.warmup_epochs, cpu.optim.label_smoothing, cpu.optim.ema_decay) == (0.3, 0.1, 0.999)
    gpu = build_config(preset="gpu")
    assert (gpu.model.width, gpu.run.epochs, gpu.optim.schedule, gpu.optim.warmup_epochs) == (1.0, 11, "cosine", 1)
    tiny = build_config(preset="tiny")
    assert (tiny.data.train_size, tiny.data.val_size, tiny.data.test_size, tiny.run.epochs) == (512, 256, 512, 1)


def test_a_data_set_sets_what_it_decides_unless_given_with_it():
    cifar = build_config(overrides={"dataset": "cifar10", "val_size": 5000})
    assert (cifar.model.in_channels, cifar.model.num_classes, cifar.data.hflip) == (3, 10, True)
    assert build_config(overrides={"dataset": "cifar100", "hflip": False}).data.hflip is False


def test_unknown_preset_is_named_with_a_suggestion():
    assert "did you mean 'tiny'" in refused("preset", "tiyn", preset="tiyn")


# ---------------------------------------------------------------- precedence


def test_precedence_defaults_lt_preset_lt_yaml_lt_overrides_lt_cli(tmp_path):
    path = write_yaml(tmp_path, "preset: cpu\nepochs: 5\nbatch_size: 16\nlr: 0.01\nseed: 7\n")
    cfg = build_config(yaml_path=path, overrides={"batch_size": 8, "lr": 0.02}, cli=["--lr", "0.03"])
    assert cfg.preset == "cpu"
    assert cfg.model.v_th == 0.4  # default
    assert cfg.model.width == 0.125  # preset
    assert (cfg.run.epochs, cfg.run.seed) == (5, 7)  # yaml
    assert cfg.run.batch_size == 8  # overrides beat yaml
    assert cfg.optim.lr == 0.03  # cli beats overrides


def test_preset_argument_wins_over_the_files_preset(tmp_path):
    cfg = build_config(preset="gpu", yaml_path=write_yaml(tmp_path, "preset: cpu\n"))
    assert cfg.preset == "gpu" and cfg.optim.warmup_epochs == 1


def test_only_the_final_config_is_validated(tmp_path):
    # the file alone is invalid for CIFAR-10 (50,000 training images); the command line fixes it
    path = write_yaml(tmp_path, "dataset: cifar10\nval_size: 55000\n")
    assert build_config(yaml_path=path, cli=["--val_size", "5000"]).data.val_size == 5000


# ---------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    "text",
    [
        "v_th: 0.3\nbatch_size: 32\nbetas: [0.8, 0.99]\n",
        "model:\n  v_th: 0.3\nrun:\n  batch_size: 32\noptim:\n  betas: [0.8, 0.99]\n",
    ],
    ids=["flat", "nested"],
)
def test_flat_and_nested_yaml_both_work(tmp_path, text):
    cfg = build_config(yaml_path=write_yaml(tmp_path, text))
    assert (cfg.model.v_th, cfg.run.batch_size, cfg.optim.betas) == (0.3, 32, (0.8, 0.99))


def test_yaml_reads_exponent_floats_without_a_dot_and_ints_as_floats(tmp_path):
    cfg = build_config(yaml_path=write_yaml(tmp_path, "lr: 1e-3\neps: 1e-10\nweight_decay: 5E-4\nwidth: 2\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-3, 1e-10, 5e-4)
    assert cfg.model.width == 2.0 and isinstance(cfg.model.width, float)


def test_yaml_tags_nulls_and_empty_sections(tmp_path):
    text = "tracking:\n  tags: {team: snn}\n  run_name: null\nmodel:\ndata_dir: /tmp/x\n"
    cfg = build_config(yaml_path=write_yaml(tmp_path, text))
    assert (cfg.tracking.tags, cfg.tracking.run_name, cfg.data.data_dir) == ({"team": "snn"}, None, "/tmp/x")


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (None, "not found"),
        ("", "mapping"),
        ("# only a comment\n", "mapping"),
        ("model: {v_th: [1,\n", "not valid YAML"),
        ("- v_th\n- 0.3\n", "mapping"),
    ],
)
def test_a_bad_yaml_file_is_named(tmp_path, text, what):
    path = tmp_path / "cfg.yaml" if text is None else write_yaml(tmp_path, text)
    assert what in refused(str(path), None, yaml_path=path)


@pytest.mark.parametrize(
    ("text", "key", "value", "suggestion"),
    [
        ("model:\n  vth: 0.3\n", "model.vth", None, "v_th"),
        ("batchsize: 3\n", "batchsize", None, "batch_size"),
        ("modle: {v_th: 0.3}\n", "modle", None, "model"),
        ("batch_size: '32'\n", "run.batch_size", "32", None),
        ("lr: -1\n", "optim.lr", -1, None),
        ("model: 3\n", "model", 3, None),
        ("v_th: 0.3\nmodel:\n  v_th: 0.2\n", "model.v_th", None, None),
    ],
)
def test_a_bad_key_or_value_in_a_file_names_the_key_the_value_and_the_file(tmp_path, text, key, value, suggestion):
    path = write_yaml(tmp_path, text)
    message = refused(key, value, yaml_path=path)
    assert str(path) in message
    if suggestion:
        assert f"did you mean '{suggestion}'" in message


# ---------------------------------------------------------------- the command line


def test_cli_takes_field_and_section_field_names_with_underscores_or_dashes():
    out = parse_cli(["--v_th", "0.3", "--batch-size", "32", "--eval_batch_size=500", "--optim.lr", "0.01"])
    assert out == {"v_th": 0.3, "batch_size": 32, "eval_batch_size": 500, "lr": 0.01}
    assert isinstance(out["batch_size"], int) and isinstance(out["v_th"], float)
    assert parse_cli(["--run.batch-size=16"]) == {"batch_size": 16}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--hflip"], True),
        (["--hflip", "true"], True),
        (["--hflip", "false"], False),
        (["--hflip=false"], False),
        (["--hflip", "yes"], True),
        (["--no-hflip"], False),
        (["--no_hflip"], False),
        (["--hflip", "--lr", "0.1"], True),
    ],
)
def test_cli_bools(args, expected):
    assert parse_cli(args)["hflip"] is expected


def test_cli_no_prefix_on_a_default_true_flag():
    cfg = build_config(cli=["--no-fast-lif", "--no-download", "--no-mlflow"])
    assert (cfg.model.fast_lif, cfg.data.download, cfg.tracking.mlflow) == (False, False, False)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--grad-clip", "none", "--data_dir", "null"], {"grad_clip": None, "data_dir": None}),
        (["--grad-clip", "1.5", "--run-name", "2024"], {"grad_clip": 1.5, "run_name": "2024"}),
        (["--betas", "0.8,0.99"], {"betas": (0.8, 0.99)}),
        (["--betas", "[0.8, 0.99]"], {"betas": (0.8, 0.99)}),
        (["--tags", "team=snn,url=a=b"], {"tags": {"team": "snn", "url": "a=b"}}),
        (["--amp", "off", "--lr", "1e-3"], {"amp": "off", "lr": 1e-3}),
        (["--lr", "0.1", "--lr=0.2", "--seed", "-3"], {"lr": 0.2, "seed": -3}),
        ([], {}),
    ],
)
def test_cli_values_are_read_in_the_fields_types(args, expected):
    assert parse_cli(args) == expected


@pytest.mark.parametrize(
    ("args", "key", "value"),
    [
        (["--batch_size", "abc"], "run.batch_size", "abc"),
        (["--batch-size", "3.5"], "run.batch_size", "3.5"),
        (["--lr", "-1"], "optim.lr", "-1"),
        (["--grad-clip", "abc"], "optim.grad_clip", "abc"),
        (["--hflip=maybe"], "data.hflip", "maybe"),
        (["--hflip", "maybe"], "data.hflip", "maybe"),
        (["--readout", "max"], "model.readout", "max"),
        (["--lr", "nan"], "optim.lr", "nan"),
        (["--betas", "0.9,nan"], "optim.betas", "0.9,nan"),
        (["--tags", "novalue"], "tracking.tags", "novalue"),
    ],
)
def test_a_bad_cli_value_names_the_key_and_the_value(args, key, value):
    assert "command line" in refused(key, value, cli=args)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--vth", "0.3"], "did you mean 'v_th'"),
        (["--batchsize", "3"], "did you mean 'batch_size'"),
        (["--no-lr"], "--no-lr"),
        (["--epochs"], "--epochs"),
        (["run.yaml"], "run.yaml"),
        (["--lr", "0.1", "extra"], "extra"),
    ],
)
def test_a_bad_cli_option_is_named(args, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_cli(args)


def test_the_entry_script_exits_2_before_any_work_and_names_key_and_value(tmp_path, capsys):
    out = tmp_path / "out"
    assert train_ddp.main(["--preset", "tiny", "--v_th", "-0.1", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.v_th" in err and "-0.1" in err
    assert train_ddp.main(["--preset", "tiny", "--vth", "0.3"]) == 2
    assert "did you mean 'v_th'" in capsys.readouterr().err
    assert not out.exists()


def test_the_entry_script_runs_the_cli_parser_in_a_fresh_process():
    run = subprocess.run(
        [sys.executable, str(ROOT / "train_ddp.py"), "--preset", "tiny", "--batch-size", "many"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "run.batch_size" in run.stderr and "many" in run.stderr


# ---------------------------------------------------------------- validation rules


INVALID_VALUES = [
    ("v_th", 0.0),
    ("v_th", -0.1),
    ("aa", 0.0),
    ("tau", 0.0),
    ("tau", 1.5),
    ("timesteps", 0),
    ("width", 0.0),
    ("in_channels", 0),
    ("num_classes", 1),
    ("readout", "max"),
    ("train_size", -1),
    ("val_size", 0),
    ("val_size", 60000),
    ("crop_padding", -1),
    ("data_dir", ""),
    ("optimizer", "rmsprop"),
    ("lr", 0.0),
    ("betas", (1.0, 0.999)),
    ("betas", (0.9, -0.1)),
    ("eps", 0.0),
    ("momentum", -0.5),
    ("weight_decay", -1e-4),
    ("schedule", "linear"),
    ("lr_step_epochs", 0),
    ("lr_gamma", 0.0),
    ("lr_gamma", 1.5),
    ("warmup_epochs", -1.0),
    ("grad_clip", 0.0),
    ("epochs", 0),
    ("batch_size", 0),
    ("eval_batch_size", 0),
    ("patience", -1),
    ("amp", "fp16"),
    ("device", "tpu"),
    ("output_dir", ""),
    ("resume", "  "),
    ("log_interval", 0),
    ("experiment", ""),
    ("run_id", ""),
    ("tags", {"": "x"}),
    # types: strict, an int is a float, nothing is NaN or infinite
    ("batch_size", True),
    ("batch_size", 3.0),
    ("batch_size", "32"),
    ("v_th", "abc"),
    ("v_th", None),
    ("hflip", 1),
    ("hflip", "true"),
    ("grad_clip", "1.0"),
    ("data_dir", 5),
    ("betas", 0.9),
    ("betas", [0.9, 0.99, 0.999]),
    ("tags", {"a": 1}),
    ("lr", float("inf")),
]


@pytest.mark.parametrize(("name", "value"), INVALID_VALUES, ids=lambda x: repr(x)[:30])
def test_every_rule_refuses_with_a_message_naming_the_dotted_key(name, value):
    dotted = f"{SECTION_OF[name]}.{name}"
    with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
        apply_overrides(Config(), {name: value})
    with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
        config_from_dict({name: value})


def test_valid_boundaries_and_ints_for_floats_are_accepted():
    cfg = apply_overrides(
        Config(),
        {"tau": 1, "lr_gamma": 1.0, "val_size": 1, "crop_padding": 0, "momentum": 0, "betas": [0, 0], "num_classes": 2},
    )
    assert cfg.model.tau == 1.0 and isinstance(cfg.model.tau, float)
    assert cfg.optim.betas == (0.0, 0.0) and all(isinstance(b, float) for b in cfg.optim.betas)


@pytest.mark.parametrize("resume", ["auto", "never", "runs/x/checkpoints/last.pt", "/abs/ckpt.pt"])
def test_resume_accepts_keywords_and_paths(resume):
    assert apply_overrides(Config(), {"resume": resume}).run.resume == resume


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="v_th"):
        ModelConfig(v_th=-1.0)
    assert OptimConfig(lr=1, betas=[0.8, 0.9]).betas == (0.8, 0.9)  # type: ignore[arg-type]


# ---------------------------------------------------------------- immutability and round trips


def test_apply_overrides_returns_a_new_config_and_leaves_the_old_one():
    base = build_config(preset="cpu")
    new = apply_overrides(base, {"v_th": 0.3, "optim": {"lr": 0.5}, "batch_size": 7})
    assert (new.model.v_th, new.optim.lr, new.run.batch_size, new.preset) == (0.3, 0.5, 7, "cpu")
    assert (base.model.v_th, base.optim.lr, base.run.batch_size) == (0.4, 3e-3, 128)
    assert apply_overrides(base, {}) == base


def test_configs_are_frozen_and_do_not_share_tags():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.v_th = 0.1  # type: ignore[misc]
    assert Config().tracking.tags is not cfg.tracking.tags


def _custom_config() -> Config:
    tags = {"team": "snn", "note": "a=b"}
    paths = {"data_dir": "/data/mnist", "run_name": "r1", "resume": "runs/x/last.pt"}
    changed = {"betas": (0.85, 0.995), "grad_clip": 2.5, "tags": tags, "eps": 1e-10, "readout": "spikes", **paths}
    return build_config(preset="seed", overrides=changed)


@pytest.mark.parametrize("make", [Config, _custom_config, lambda: build_config(preset="tiny")])
def test_config_to_dict_and_back_and_through_yaml_json_and_torch_round_trip_exactly(tmp_path, make):
    cfg = make()
    d = config_to_dict(cfg)
    assert set(d) == {"preset", "model", "data", "optim", "run", "tracking"}
    assert config_from_dict(d) == cfg and type(config_from_dict(d).optim.betas) is tuple
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    save_yaml(cfg, tmp_path / "sub" / "config.yaml")
    assert build_config(yaml_path=tmp_path / "sub" / "config.yaml") == cfg
    torch = pytest.importorskip("torch")
    torch.save({"config": d}, tmp_path / "ckpt.pt")
    assert config_from_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]) == cfg


def test_config_to_dict_does_not_alias_the_config():
    cfg = _custom_config()
    config_to_dict(cfg)["tracking"]["tags"]["new"] = "x"
    assert "new" not in cfg.tracking.tags


def test_flatten_config_has_every_field_plus_preset_and_rebuilds_the_config():
    cfg = _custom_config()
    flat = flatten_config(cfg)
    assert sorted(k for k in flat if k != "preset") == sorted(FIELDS) and flat["preset"] == "seed"
    assert apply_overrides(Config(), flat) == cfg


def test_config_module_imports_no_heavy_dependencies():
    code = (  # the package without its __init__ (which brings the model, so torch)
        "import sys, types\n"
        "pkg = types.ModuleType('stbp'); pkg.__path__ = ['stbp']; sys.modules['stbp'] = pkg\n"
        "import stbp.config\n"
        "bad = [m for m in ('torch', 'ray', 'mlflow', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
