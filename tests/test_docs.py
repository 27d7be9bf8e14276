"""What the README shows a user runs as shown: every training command line parses with the real parser, and its
cluster block is the sequence docs/scaling-out.md explains (and tests/test_cluster.py exercises), in that order."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import train_ddp
import tune

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def arguments_after(script: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in shell_lines(README):
        words = shlex.split(line)
        if script in words:
            found.append((line, words[words.index(script) + 1 :]))
    return found


@pytest.mark.parametrize(("line", "args"), arguments_after("train_ddp.py"), ids=lambda x: str(x)[:60])
def test_every_readme_training_command_parses(line, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--config" in args:  # a file of the user's: any valid one will do
        args[args.index("--config") + 1] = str(ROOT / "stbp" / "config" / "presets" / "tiny.yaml")
    if args == ["--help"]:
        with pytest.raises(SystemExit, match="0"):
            train_ddp.parse_args(args)
    else:
        train_ddp.parse_args(args)


@pytest.mark.parametrize(("line", "args"), arguments_after("tune.py"), ids=lambda x: str(x)[:60])
def test_every_readme_sweep_command_parses(line, args):
    namespace, fields = tune.parse_args(args)
    assert (ROOT / namespace.sweep).is_file(), line


def test_the_readmes_cluster_block_is_the_documented_sequence():
    section = README[README.index("## Scaling out") :]
    section = section[: section.index("\n## ", 5)]
    commands = [c for c in shell_lines(section) if c.split()[0] in ("ray", "export", "ssh")]
    assert "ray get-auth-token --generate" in commands and "export RAY_AUTH_MODE=token" in commands
    docs = " ".join((ROOT / "docs" / "scaling-out.md").read_text().replace("\\\n", " ").split())
    places = [docs.find(" ".join(c.split())) for c in commands]
    assert -1 not in places, [c for c, p in zip(commands, places) if p == -1]
    setup = places[: commands.index("ray up -y cluster.yaml") + 3]  # up to the job's submission
    assert setup == sorted(setup), "the README sets the cluster up in another order than docs/scaling-out.md"
    assert commands.index("export RAY_AUTH_MODE=token") < commands.index("ray up -y cluster.yaml")
    assert not any(c.startswith("ray up") and c.endswith("&") for c in commands)  # ray up must finish first
