"""The JSON Schemas of a training config and of a sweep file: committed copies equal the generated ones, every
committed YAML validates, and the schemas refuse what the loaders refuse. And `--help` of both entry scripts lists
every field they take with its doc and default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from stbp.config import FIELDS, PRESETS, build_config, config_to_dict
from stbp.sweep import SweepError, load_sweep
from stbp.sweep.schema import SCHEMA_FILES, sweep_schema, train_schema
from stbp.sweep.spec import TRIAL_OWNED_FIELDS

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
PRESET_FILES = sorted((ROOT / "stbp" / "config" / "presets").glob("*.yaml"))
GENERATED = {"train": train_schema, "sweep": sweep_schema}


def committed(kind: str) -> dict:
    return json.loads((ROOT / SCHEMA_FILES[kind]).read_text())


def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = committed(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("kind", ["train", "sweep"])
def test_the_committed_schema_is_the_generated_one(kind):
    assert committed(kind) == json.loads(json.dumps(GENERATED[kind]())), (
        f"{SCHEMA_FILES[kind]} is stale: regenerate it with `python "
        f"{'train_ddp.py' if kind == 'train' else 'tune.py'} --schema > {SCHEMA_FILES[kind]}`"
    )


@pytest.mark.parametrize(("script", "kind"), [("train_ddp.py", "train"), ("tune.py", "sweep")])
def test_schema_option_prints_it(script, kind):
    out = subprocess.run(
        [sys.executable, str(ROOT / script), "--schema"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert json.loads(out) == committed(kind)


@pytest.mark.parametrize("path", SWEEPS + PRESET_FILES, ids=lambda p: p.name)
def test_every_committed_yaml_validates_and_names_its_schema(path):
    kind = "sweep" if path.parent.name == "sweeps" else "train"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")  # what VS Code's YAML extension reads
    assert (path.parent / first.split("=", 1)[1]).resolve() == (ROOT / SCHEMA_FILES[kind]).resolve()
    errors = list(validator(kind).iter_errors(yaml.safe_load(path.read_text())))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_saved_config_validates_in_both_key_styles(preset):
    train = validator("train")
    nested = config_to_dict(build_config(preset=preset))
    train.validate(nested)
    flat = {k: v for section in nested.values() if isinstance(section, dict) for k, v in section.items()}
    train.validate(flat)
    assert list(train.iter_errors({"model.v_th": 0.3}))  # dotted keys are a command-line form only


SWEEP = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"serach": {}}, ["serach"]),
        ({"search": {"num_sample": 3}}, ["search"]),
        ({"search": {"num_samples": 0}}, ["search", "num_samples"]),
        ({"space": {"vth": {"type": "uniform", "low": 0.1, "high": 1.0}}}, ["space"]),
        ({"space": {"v_th": {"type": "uniform", "low": 0.1, "hi": 1.0}}}, ["space", "v_th"]),
        ({"space": {"output_dir": {"type": "choice", "values": ["a"]}}}, ["space"]),
        ({"train": {"preset": "tiny", "vth": 0.3}}, ["train"]),
        ({"train": {"preset": "tiny", "v_th": -0.1}}, ["train", "v_th"]),
        ({"train": {"preset": "tiny", "model": {"tau": 1.5}}}, ["train", "model", "tau"]),
        ({"train": {"preset": "tiny", "output_dir": "x"}}, ["train"]),
        ({"train": {"preset": "huge"}}, ["train", "preset"]),
        ({"metric": "test_acc"}, ["metric"]),
        ({"resources": {"cpus": "two"}}, ["resources", "cpus"]),
        ({"scheduler": "pbt"}, ["scheduler"]),
    ],
)
def test_the_sweep_schema_refuses_what_load_sweep_refuses(tmp_path, change, path):
    data = {**SWEEP, **change}
    errors = list(validator("sweep").iter_errors(data))
    assert errors, "the schema accepted it"
    assert any(list(e.absolute_path)[: len(path)] == path or list(e.absolute_path) == path[:-1] for e in errors), [
        (list(e.absolute_path), e.message) for e in errors
    ]
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(SweepError):
        load_sweep(file)


@pytest.mark.parametrize(("script", "excluded"), [("train_ddp.py", ()), ("tune.py", TRIAL_OWNED_FIELDS)])
def test_help_lists_every_field_with_its_doc_and_default(script, excluded):
    run = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())  # argparse wraps the help text
    for name in set(FIELDS) - {"resume", "tracking_uri"}:  # tune.py's own options have these names
        assert (f"--{name} " in text) != (name in excluded), name
    assert "--v_th VALUE, --model.v_th VALUE LIF firing threshold. (default: 0.4)" in text
    assert "--hflip [true|false], --data.hflip [true|false] Random horizontal flips." in text
