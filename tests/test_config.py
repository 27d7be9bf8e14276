"""Tests for stbp.config: defaults, presets, precedence, YAML, CLI, validation and round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from stbp.config import (
    PRESETS,
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
    field_names,
    flatten_config,
    parse_cli,
    preset_names,
    save_yaml,
)


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- defaults and presets


def test_defaults_equal_documented_reference_values():
    cfg = Config()
    assert cfg.model == ModelConfig(
        in_channels=1,
        num_classes=10,
        timesteps=2,
        v_th=0.4,
        aa=0.5,
        tau=0.25,
        width=1.0,
        readout="mean",
        sync_bn=False,
        fast_lif=True,
    )
    assert cfg.data == DataConfig(
        data_dir=None, train_size=0, val_size=6000, test_size=0, crop_padding=4, hflip=False, download=True
    )
    assert cfg.optim == OptimConfig(
        optimizer="adam",
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        momentum=0.9,
        weight_decay=0.0,
        schedule="step",
        lr_step_epochs=10,
        lr_gamma=0.1,
        warmup_epochs=0,
        grad_clip=None,
    )
    assert cfg.run == RunConfig(
        epochs=11,
        batch_size=64,
        eval_batch_size=1000,
        patience=5,
        seed=0,
        amp="auto",
        compile=False,
        device="auto",
        output_dir="runs/default",
        resume="auto",
        log_interval=50,
        firing_rates=True,
    )
    assert cfg.tracking == TrackingConfig(
        tracking_uri=None, experiment="stbp", run_name=None, mlflow=True, run_id=None, tags={}
    )
    assert cfg.preset is None
    assert build_config() == cfg


def test_field_names_are_sorted_unique_leaves():
    names = field_names()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert {"v_th", "batch_size", "betas", "tags", "resume", "sync_bn"} <= set(names)
    assert "preset" not in names and "model" not in names


def test_preset_names_lists_all_presets():
    assert preset_names() == ["cifar10", "cifar100", "cifar_cpu", "cpu", "gpu", "seed", "tiny"]


def test_presets_registry_is_read_only():
    with pytest.raises(TypeError):
        PRESETS["new"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESETS["cpu"]["epochs"] = 99  # type: ignore[index]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "cifar_cpu", "cpu", "gpu", "seed", "tiny"])
def test_every_preset_builds_a_valid_config_that_records_its_name(name):
    cfg = build_config(preset=name)
    assert cfg.preset == name
    flat = flatten_config(cfg)
    for key, value in PRESETS[name].items():
        assert flat[key] == value, key


def test_seed_preset_has_the_reference_hyperparameters():
    cfg = build_config(preset="seed")
    assert (cfg.model.timesteps, cfg.model.v_th, cfg.model.aa, cfg.model.tau) == (2, 0.4, 0.5, 0.25)
    assert cfg.model.width == 1.0
    assert cfg.model.readout == "mean"
    assert cfg.optim.optimizer == "adam"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps) == (1e-3, (0.9, 0.999), 1e-8)
    assert (cfg.optim.schedule, cfg.optim.lr_step_epochs, cfg.optim.lr_gamma) == ("step", 10, 0.1)
    assert cfg.run.batch_size == 64
    assert (cfg.run.epochs, cfg.run.patience) == (11, 5)
    assert cfg.data.crop_padding == 0
    assert cfg.data.hflip is False
    assert cfg.run.output_dir == "runs/seed"


def test_cpu_gpu_and_tiny_presets_apply_their_values():
    cpu = build_config(preset="cpu")
    assert (cpu.model.width, cpu.run.epochs, cpu.run.batch_size, cpu.optim.lr) == (0.125, 4, 128, 3e-3)
    assert (cpu.optim.schedule, cpu.run.eval_batch_size, cpu.run.output_dir) == ("cosine", 128, "runs/cpu")
    assert (cpu.optim.warmup_epochs, cpu.optim.label_smoothing, cpu.optim.ema_decay) == (0.3, 0.1, 0.999)
    gpu = build_config(preset="gpu")
    assert (gpu.model.width, gpu.run.epochs, gpu.run.batch_size, gpu.optim.lr) == (1.0, 11, 128, 1e-3)
    assert (gpu.optim.schedule, gpu.optim.warmup_epochs, gpu.run.output_dir) == ("cosine", 1, "runs/gpu")
    tiny = build_config(preset="tiny")
    assert (tiny.model.width, tiny.model.timesteps) == (0.0625, 2)
    assert (tiny.run.epochs, tiny.run.batch_size) == (1, 32)
    assert (tiny.data.train_size, tiny.data.val_size, tiny.data.test_size, tiny.run.eval_batch_size) == (
        512,
        256,
        512,
        256,
    )
    assert (tiny.run.log_interval, tiny.run.output_dir) == (5, "runs/tiny")


def test_unknown_preset_names_the_valid_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*cpu, gpu, seed, tiny"):
        build_config(preset="huge")


# ---------------------------------------------------------------- precedence


def test_precedence_defaults_lt_preset_lt_yaml_lt_overrides_lt_cli(tmp_path):
    path = write_yaml(tmp_path, "preset: cpu\nepochs: 5\nbatch_size: 16\nlr: 0.01\nseed: 7\n")
    cfg = build_config(
        yaml_path=path,
        overrides={"batch_size": 8, "lr": 0.02},
        cli=["--lr", "0.03"],
    )
    assert cfg.preset == "cpu"
    assert cfg.model.v_th == 0.4  # default
    assert cfg.model.width == 0.125  # preset
    assert cfg.run.epochs == 5  # yaml beats preset (4)
    assert cfg.run.seed == 7  # yaml beats default
    assert cfg.run.batch_size == 8  # overrides beat yaml
    assert cfg.optim.lr == 0.03  # cli beats overrides


def test_preset_argument_wins_over_yaml_preset_key(tmp_path):
    path = write_yaml(tmp_path, "preset: cpu\n")
    cfg = build_config(preset="gpu", yaml_path=path)
    assert cfg.preset == "gpu"
    assert cfg.optim.warmup_epochs == 1


def test_preset_values_are_overridable_by_cli():
    cfg = build_config(preset="seed", cli=["--crop-padding", "4"])
    assert cfg.data.crop_padding == 4
    assert cfg.preset == "seed"


def test_invalid_intermediate_layers_are_fine_if_final_config_is_valid(tmp_path):
    path = write_yaml(tmp_path, "lr: 0.5\n")
    assert build_config(yaml_path=path, cli=["--lr", "0.1"]).optim.lr == 0.1


def test_overrides_mapping_rejects_preset_key():
    with pytest.raises(ConfigError, match="preset"):
        build_config(overrides={"preset": "cpu"})


# ---------------------------------------------------------------- YAML forms and errors


@pytest.mark.parametrize(
    "text",
    [
        "v_th: 0.3\nbatch_size: 32\nbetas: [0.8, 0.99]\n",
        "model:\n  v_th: 0.3\nrun:\n  batch_size: 32\noptim:\n  betas: [0.8, 0.99]\n",
        "model.v_th: 0.3\nrun.batch_size: 32\noptim.betas: [0.8, 0.99]\n",
    ],
    ids=["flat", "nested", "dotted"],
)
def test_flat_nested_and_dotted_yaml_all_work(tmp_path, text):
    cfg = build_config(yaml_path=write_yaml(tmp_path, text))
    assert cfg.model.v_th == 0.3
    assert cfg.run.batch_size == 32
    assert cfg.optim.betas == (0.8, 0.99)


def test_yaml_reads_exponent_floats_without_a_dot(tmp_path):
    cfg = build_config(yaml_path=write_yaml(tmp_path, "lr: 1e-3\neps: 1e-10\nweight_decay: 5E-4\n"))
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-3, 1e-10, 5e-4)


def test_yaml_int_is_accepted_and_converted_for_float_fields(tmp_path):
    cfg = build_config(yaml_path=write_yaml(tmp_path, "width: 2\ngrad_clip: 1\n"))
    assert cfg.model.width == 2.0 and isinstance(cfg.model.width, float)
    assert cfg.optim.grad_clip == 1.0 and isinstance(cfg.optim.grad_clip, float)


def test_yaml_tags_and_nulls(tmp_path):
    text = "tracking:\n  tags: {team: snn, stage: dev}\n  run_name: null\ndata_dir: /tmp/x\n"
    cfg = build_config(yaml_path=write_yaml(tmp_path, text))
    assert cfg.tracking.tags == {"team": "snn", "stage": "dev"}
    assert cfg.tracking.run_name is None
    assert cfg.data.data_dir == "/tmp/x"


def test_yaml_preset_key_selects_the_preset(tmp_path):
    cfg = build_config(yaml_path=write_yaml(tmp_path, "preset: tiny\nepochs: 2\n"))
    assert cfg.preset == "tiny"
    assert cfg.data.train_size == 512
    assert cfg.run.epochs == 2


def test_missing_yaml_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(yaml_path=tmp_path / "nope.yaml")


def test_yaml_path_that_is_a_directory_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        build_config(yaml_path=tmp_path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_yaml_file_is_reported(tmp_path, text):
    with pytest.raises(ConfigError, match="is empty"):
        build_config(yaml_path=write_yaml(tmp_path, text))


def test_invalid_yaml_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(yaml_path=write_yaml(tmp_path, "model: {v_th: [1,\n"))


@pytest.mark.parametrize("text", ["- v_th\n- 0.3\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_file_is_reported(tmp_path, text):
    with pytest.raises(ConfigError, match="must contain a mapping"):
        build_config(yaml_path=write_yaml(tmp_path, text))


def test_yaml_section_that_is_not_a_mapping_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        build_config(yaml_path=write_yaml(tmp_path, "model: 3\n"))


def test_yaml_field_in_wrong_section_names_the_right_section(tmp_path):
    with pytest.raises(ConfigError, match="'lr' belongs to section 'optim', not 'model'"):
        build_config(yaml_path=write_yaml(tmp_path, "model:\n  lr: 0.1\n"))
    with pytest.raises(ConfigError, match="'lr' belongs to section 'optim', not 'model'"):
        build_config(yaml_path=write_yaml(tmp_path, "model.lr: 0.1\n"))


def test_yaml_field_given_twice_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="more than once"):
        build_config(yaml_path=write_yaml(tmp_path, "v_th: 0.3\nmodel:\n  v_th: 0.2\n"))


def test_yaml_unknown_key_names_the_file_and_suggests(tmp_path):
    path = write_yaml(tmp_path, "model:\n  vth: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown config field 'model\.vth'.*did you mean 'v_th'") as exc:
        build_config(yaml_path=path)
    assert str(path) in str(exc.value)


def test_yaml_wrong_type_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "batch_size: '32'\n")
    with pytest.raises(ConfigError, match=r"batch_size expects an int, got '32' \(str\)") as exc:
        build_config(yaml_path=path)
    assert str(path) in str(exc.value)


# ---------------------------------------------------------------- CLI


def test_cli_parses_underscores_dashes_equals_and_dotted_names():
    out = parse_cli(["--v_th", "0.3", "--batch-size", "32", "--eval_batch_size=500", "--optim.lr", "0.01"])
    assert out == {"v_th": 0.3, "batch_size": 32, "eval_batch_size": 500, "lr": 0.01}
    assert isinstance(out["batch_size"], int) and isinstance(out["v_th"], float)


def test_cli_dotted_names_accept_dashes():
    assert parse_cli(["--run.batch-size=16"]) == {"batch_size": 16}


def test_cli_bare_bool_flag_is_true():
    assert parse_cli(["--hflip"]) == {"hflip": True}
    assert parse_cli(["--hflip", "--lr", "0.1"]) == {"hflip": True, "lr": 0.1}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--hflip", "true"], True),
        (["--hflip", "false"], False),
        (["--hflip", "1"], True),
        (["--hflip", "0"], False),
        (["--hflip", "yes"], True),
        (["--hflip", "No"], False),
        (["--hflip=false"], False),
        (["--hflip=TRUE"], True),
        (["--no-hflip"], False),
        (["--no_hflip"], False),
    ],
)
def test_cli_bool_values_and_no_prefix(args, expected):
    assert parse_cli(args) == {"hflip": expected}


def test_cli_no_prefix_on_default_true_flag():
    cfg = build_config(cli=["--no-fast-lif", "--no-download", "--no-mlflow"])
    assert (cfg.model.fast_lif, cfg.data.download, cfg.tracking.mlflow) == (False, False, False)


@pytest.mark.parametrize("word", ["none", "None", "null", "NULL"])
def test_cli_none_for_optional_fields(word):
    assert parse_cli(["--grad-clip", word, "--data_dir", word]) == {"grad_clip": None, "data_dir": None}


def test_cli_optional_fields_accept_values():
    assert parse_cli(["--grad-clip", "1.5", "--run-name", "abc"]) == {"grad_clip": 1.5, "run_name": "abc"}


@pytest.mark.parametrize("text", ["0.8,0.99", "0.8, 0.99", "(0.8,0.99)", "[0.8,0.99]"])
def test_cli_tuple_of_floats(text):
    assert parse_cli(["--betas", text]) == {"betas": (0.8, 0.99)}


def test_cli_tags_key_value_pairs():
    assert parse_cli(["--tags", "team=snn,stage=dev"]) == {"tags": {"team": "snn", "stage": "dev"}}
    assert parse_cli(["--tags=url=a=b"]) == {"tags": {"url": "a=b"}}
    assert parse_cli(["--tags", ""]) == {"tags": {}}


def test_cli_later_occurrence_wins():
    assert parse_cli(["--lr", "0.1", "--lr=0.2"]) == {"lr": 0.2}


def test_cli_negative_numbers_are_values():
    assert parse_cli(["--seed", "-3"]) == {"seed": -3}


def test_cli_empty_list_gives_empty_dict():
    assert parse_cli([]) == {}


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--batch_size", "abc"], r"batch_size expects an int, got 'abc'"),
        (["--batch-size", "3.5"], r"batch_size expects an int, got '3.5'"),
        (["--lr", "abc"], r"lr expects a float, got 'abc'"),
        (["--grad-clip", "abc"], r"grad_clip expects a float or None, got 'abc'"),
        (["--hflip=maybe"], r"hflip expects a bool"),
        (["--betas", "0.9"], r"betas expects 2 comma-separated floats"),
        (["--betas", "a,b"], r"betas expects a pair of floats"),
        (["--tags", "novalue"], r"tags expects comma-separated key=value pairs"),
        (["--lr", "nan"], r"lr must be finite"),
        (["--grad-clip", "inf"], r"grad_clip must be finite"),
        (["--betas", "0.9,nan"], r"betas\[1\] must be finite"),
    ],
)
def test_cli_value_that_does_not_parse_names_field_type_and_value(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_cli(args)


@pytest.mark.parametrize("args", [["--epochs"], ["--epochs", "--lr", "0.1"], ["--output-dir"]])
def test_cli_missing_value_is_an_error(args):
    with pytest.raises(ConfigError, match="expects a value"):
        parse_cli(args)


@pytest.mark.parametrize("args", [["run.yaml"], ["--lr", "0.1", "extra"], ["--hflip", "maybe"], ["-x"], ["--"]])
def test_cli_positional_arguments_are_errors(args):
    with pytest.raises(ConfigError, match="positional"):
        parse_cli(args)


@pytest.mark.parametrize("args", [["--config", "x.yaml"], ["--config=x.yaml"], ["--preset", "cpu"]])
def test_cli_config_and_preset_are_left_to_the_entry_script(args):
    with pytest.raises(ConfigError, match="entry script"):
        parse_cli(args)


def test_cli_no_prefix_on_non_bool_is_an_error():
    with pytest.raises(ConfigError, match="only applies to bool"):
        parse_cli(["--no-lr"])


def test_cli_no_prefix_with_value_is_an_error():
    with pytest.raises(ConfigError, match="takes no value"):
        parse_cli(["--no-hflip=true"])


def test_cli_single_string_is_rejected():
    with pytest.raises(ConfigError, match="list of arguments"):
        parse_cli("--lr 0.1")  # type: ignore[arg-type]


def test_cli_does_not_range_check_but_build_config_does():
    assert parse_cli(["--lr", "-1"]) == {"lr": -1.0}
    with pytest.raises(ConfigError, match="lr must be > 0, got -1.0"):
        build_config(cli=["--lr", "-1"])


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("vth", "v_th"), ("batchsize", "batch_size"), ("learning_rate", None), ("epoch", "epochs")],
)
def test_unknown_key_suggests_closest_name_and_lists_valid_fields(key, suggestion):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(Config(), {key: 1})
    msg = str(exc.value)
    assert f"unknown config field '{key}'" in msg
    if suggestion is not None:
        assert f"did you mean '{suggestion}'?" in msg
    assert "valid fields: aa, amp, batch_size" in msg


@pytest.mark.parametrize(("args", "suggestion"), [(["--vth", "0.3"], "v_th"), (["--batchsize", "3"], "batch_size")])
def test_unknown_cli_flag_suggests_closest_name(args, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        parse_cli(args)


def test_unknown_key_in_config_from_dict_and_build_overrides():
    with pytest.raises(ConfigError, match="unknown config field 'modle'.*did you mean 'model'"):
        config_from_dict({"modle": {"v_th": 0.3}})
    with pytest.raises(ConfigError, match="unknown config field 'bogus'"):
        build_config(overrides={"bogus": 1})
    with pytest.raises(ConfigError, match=r"unknown config field 'model\.bogus'"):
        config_from_dict({"model": {"bogus": 1}})


# ---------------------------------------------------------------- validation


INVALID_VALUES = [
    ("v_th", 0.0, "v_th must be > 0"),
    ("v_th", -0.1, "v_th must be > 0, got -0.1"),
    ("aa", 0.0, "aa must be > 0"),
    ("tau", 0.0, r"tau must be in \(0, 1\]"),
    ("tau", 1.5, r"tau must be in \(0, 1\]"),
    ("timesteps", 0, "timesteps must be >= 1"),
    ("width", 0.0, "width must be > 0"),
    ("in_channels", 0, "in_channels must be >= 1"),
    ("num_classes", 1, "num_classes must be >= 2"),
    ("readout", "max", "readout must be one of 'mean', 'spikes', got 'max'"),
    ("train_size", -1, "train_size must be >= 0"),
    ("val_size", 0, r"val_size must be in \[1, 60000\)"),
    ("val_size", 60000, r"val_size must be in \[1, 60000\)"),
    ("crop_padding", -1, "crop_padding must be >= 0"),
    ("data_dir", "", "data_dir must be a non-empty string"),
    ("optimizer", "rmsprop", "optimizer must be one of 'adam', 'adamw', 'sgd', got 'rmsprop'"),
    ("lr", 0.0, "lr must be > 0"),
    ("betas", (1.0, 0.999), r"betas\[0\] must be in \[0, 1\)"),
    ("betas", (0.9, -0.1), r"betas\[1\] must be in \[0, 1\)"),
    ("eps", 0.0, "eps must be > 0"),
    ("momentum", -0.5, "momentum must be >= 0"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0"),
    ("schedule", "linear", "schedule must be one of 'step', 'cosine', 'none'"),
    ("lr_step_epochs", 0, "lr_step_epochs must be >= 1"),
    ("lr_gamma", 0.0, r"lr_gamma must be in \(0, 1\]"),
    ("lr_gamma", 1.5, r"lr_gamma must be in \(0, 1\]"),
    ("warmup_epochs", -1, "warmup_epochs must be >= 0"),
    ("grad_clip", 0.0, "grad_clip must be None"),
    ("grad_clip", -1.0, "grad_clip must be None"),
    ("epochs", 0, "epochs must be >= 1"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("eval_batch_size", 0, "eval_batch_size must be >= 1"),
    ("patience", -1, "patience must be >= 0"),
    ("amp", "fp16", "amp must be one of 'auto', 'bf16', 'off', got 'fp16'"),
    ("device", "tpu", "device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"),
    ("output_dir", "", "output_dir must be a non-empty string"),
    ("resume", "", "resume must be 'auto', 'never' or a checkpoint path"),
    ("resume", "  ", "resume must be 'auto', 'never' or a checkpoint path"),
    ("log_interval", 0, "log_interval must be >= 1"),
    ("experiment", "", "experiment must be a non-empty string"),
    ("run_id", "", "run_id must be a non-empty string"),
    ("tags", {"": "x"}, "tags keys must be non-empty"),
]


@pytest.mark.parametrize(("name", "value", "pattern"), INVALID_VALUES, ids=lambda x: repr(x)[:30])
def test_every_validation_rule_rejects_with_a_message_naming_the_field(name, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as exc:
        apply_overrides(Config(), {name: value})
    assert name in str(exc.value)
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({name: value})


def test_direct_dataclass_construction_is_validated():
    with pytest.raises(ConfigError, match="v_th must be > 0"):
        ModelConfig(v_th=-1.0)
    with pytest.raises(ConfigError, match="batch_size expects an int"):
        RunConfig(batch_size=True)
    with pytest.raises(ConfigError, match="Config.model must be a ModelConfig"):
        Config(model={"v_th": 0.3})  # type: ignore[arg-type]


def test_direct_construction_normalises_ints_and_lists():
    opt = OptimConfig(lr=1, betas=[0.8, 0.9])  # type: ignore[arg-type]
    assert isinstance(opt.lr, float) and opt.betas == (0.8, 0.9)


@pytest.mark.parametrize("resume", ["auto", "never", "runs/x/checkpoints/last.pt", "/abs/ckpt.pt"])
def test_resume_accepts_keywords_and_paths(resume):
    cfg = apply_overrides(Config(), {"resume": resume})
    assert cfg.run.resume == resume


def test_valid_boundary_values_are_accepted():
    cfg = apply_overrides(
        Config(),
        {
            "tau": 1.0,
            "lr_gamma": 1.0,
            "val_size": 1,
            "train_size": 0,
            "crop_padding": 0,
            "patience": 0,
            "momentum": 0.0,
            "betas": (0.0, 0.0),
            "warmup_epochs": 0,
            "num_classes": 2,
        },
    )
    assert cfg.model.tau == 1.0 and cfg.data.val_size == 1


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("batch_size", True, r"batch_size expects an int, got True \(bool\)"),
        ("batch_size", 3.0, r"batch_size expects an int, got 3.0 \(float\)"),
        ("batch_size", "32", r"batch_size expects an int, got '32' \(str\)"),
        ("v_th", "abc", r"v_th expects a float, got 'abc' \(str\)"),
        ("v_th", False, r"v_th expects a float, got False \(bool\)"),
        ("v_th", None, r"v_th expects a float, got None \(NoneType\)"),
        ("lr", "1e-3", r"lr expects a float, got '1e-3' \(str\)"),
        ("hflip", 1, r"hflip expects a bool, got 1 \(int\)"),
        ("hflip", "true", r"hflip expects a bool, got 'true' \(str\)"),
        ("readout", 3, r"readout expects a string, got 3 \(int\)"),
        ("grad_clip", "1.0", r"grad_clip expects a float or None, got '1.0' \(str\)"),
        ("grad_clip", True, r"grad_clip expects a float or None, got True \(bool\)"),
        ("data_dir", 5, r"data_dir expects a string or None, got 5 \(int\)"),
        ("betas", 0.9, r"betas expects a pair of floats, got 0.9 \(float\)"),
        ("betas", [0.9, 0.99, 0.999], r"betas expects a pair of floats"),
        ("betas", [0.9, True], r"betas\[1\] expects a float, got True \(bool\)"),
        ("tags", ["a"], r"tags expects a mapping of strings to strings"),
        ("tags", {"a": 1}, r"tags expects a mapping of strings to strings, got entry 'a': 1"),
        ("lr", float("inf"), r"lr must be finite"),
    ],
)
def test_ill_typed_values_are_rejected(name, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Config(), {name: value})


def test_int_is_accepted_and_converted_where_float_expected():
    cfg = apply_overrides(Config(), {"v_th": 1, "betas": [0, 0]})
    assert cfg.model.v_th == 1.0 and isinstance(cfg.model.v_th, float)
    assert cfg.optim.betas == (0.0, 0.0) and all(isinstance(b, float) for b in cfg.optim.betas)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- immutability / apply_overrides


def test_apply_overrides_returns_a_new_config_and_leaves_the_old_one():
    base = build_config(preset="cpu")
    new = apply_overrides(base, {"model.v_th": 0.3, "optim": {"lr": 0.5}, "batch_size": 7})
    assert new is not base
    assert (new.model.v_th, new.optim.lr, new.run.batch_size) == (0.3, 0.5, 7)
    assert (base.model.v_th, base.optim.lr, base.run.batch_size) == (0.4, 3e-3, 128)
    assert new.data is base.data  # untouched sections are shared (immutable)
    assert new.preset == "cpu"


def test_apply_overrides_with_empty_mapping_returns_equal_config():
    cfg = build_config(preset="tiny")
    assert apply_overrides(cfg, {}) == cfg


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.v_th = 0.1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.preset = "cpu"  # type: ignore[misc]


def test_default_tags_are_not_shared_between_instances():
    a, b = Config(), Config()
    assert a.tracking.tags is not b.tracking.tags


# ---------------------------------------------------------------- round trips


def _custom_config() -> Config:
    return build_config(
        preset="seed",
        overrides={
            "betas": (0.85, 0.995),
            "grad_clip": 2.5,
            "tags": {"team": "snn", "note": "a=b"},
            "data_dir": "/data/mnist",
            "run_name": "r1",
            "eps": 1e-10,
            "lr": 3.3e-4,
            "readout": "spikes",
            "hflip": True,
            "resume": "runs/x/checkpoints/last.pt",
        },
    )


@pytest.mark.parametrize("make", [Config, _custom_config, lambda: build_config(preset="tiny")])
def test_config_to_dict_and_config_from_dict_round_trip_exactly(make):
    cfg = make()
    d = config_to_dict(cfg)
    assert set(d) == {"preset", "model", "data", "optim", "run", "tracking"}
    assert isinstance(d["optim"]["betas"], list)
    back = config_from_dict(d)
    assert back == cfg
    assert type(back.optim.betas) is tuple
    assert config_to_dict(back) == d


def test_config_dict_is_plain_json_and_yaml_safe():
    d = config_to_dict(_custom_config())
    assert config_from_dict(json.loads(json.dumps(d))) == _custom_config()
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == _custom_config()


def test_config_to_dict_does_not_alias_the_config():
    cfg = _custom_config()
    d = config_to_dict(cfg)
    d["tracking"]["tags"]["new"] = "x"
    assert "new" not in cfg.tracking.tags


def test_config_from_dict_accepts_partial_flat_and_dotted():
    cfg = config_from_dict({"v_th": 0.3, "run.epochs": 2, "optim": {"lr": 0.1}, "preset": "cpu"})
    assert (cfg.model.v_th, cfg.run.epochs, cfg.optim.lr) == (0.3, 2, 0.1)
    assert cfg.preset == "cpu"  # recorded only: the cpu preset's values are not applied
    assert cfg.model.width == 1.0


def test_config_dict_survives_torch_save_and_weights_only_load(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = _custom_config()
    path = tmp_path / "ckpt.pt"
    torch.save({"config": config_to_dict(cfg)}, path)
    loaded = torch.load(path, weights_only=True)
    assert config_from_dict(loaded["config"]) == cfg


@pytest.mark.parametrize("make", [Config, _custom_config, lambda: build_config(preset="gpu")])
def test_save_yaml_then_build_config_round_trips_exactly(tmp_path, make):
    cfg = make()
    path = tmp_path / "sub" / "config.yaml"
    save_yaml(cfg, path)
    assert build_config(yaml_path=path) == cfg
    assert build_config(yaml_path=str(path)) == cfg


def test_save_yaml_writes_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    save_yaml(build_config(preset="cpu"), path)
    data = yaml.safe_load(path.read_text())
    assert data["preset"] == "cpu"
    assert data["model"]["width"] == 0.125
    assert data["optim"]["betas"] == [0.9, 0.999]


def test_flatten_config_has_every_field_plus_preset():
    cfg = _custom_config()
    flat = flatten_config(cfg)
    assert sorted(k for k in flat if k != "preset") == field_names()
    assert flat["preset"] == "seed"
    assert flat["betas"] == (0.85, 0.995) and flat["v_th"] == 0.4
    assert apply_overrides(Config(), flat) == cfg


def test_config_module_imports_no_heavy_dependencies():
    import subprocess
    import sys

    code = (  # the package without its __init__ (which brings the model, so torch)
        "import sys, types\n"
        "pkg = types.ModuleType('stbp'); pkg.__path__ = ['stbp']; sys.modules['stbp'] = pkg\n"
        "import stbp.config\n"
        "bad = [m for m in ('torch', 'ray', 'mlflow', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
