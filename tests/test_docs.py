"""What the documentation shows a user runs as shown, and points where it says.

- Every command of a ```bash block in the README and in every docs/ page parses with the real parser (train_ddp.py,
  tune.py, torchrun, python -m stbp.evaluate, the arguments the SLURM scripts pass on) or names a real make target;
  BENCHMARKS.md's commands name real scripts and options.
- The README stays a front door: at most 15,000 characters, linking every docs/ page.
- Every relative link, image and anchor of the README, BENCHMARKS.md and docs/ resolves; every file path they name
  (stbp/, bench/, tests/, sweeps/, slurm/, docs/) exists.
- docs/architecture.md lists every module of the package, one line each, names no path that is gone, and states the
  floors in the order tests/test_structure.py enforces.
- The cluster summary at the top of docs/scaling-out.md is the sequence the page explains (and tests/test_cluster.py
  exercises), in that order.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import train_ddp
import tune

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SCALING_OUT = ROOT / "docs" / "scaling-out.md"
PAGES = [README, *DOCS, BENCHMARKS]
README_LIMIT = 15_000  # bytes, so at most as many characters


def shell_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, as words: split at ; && || | &, leading VAR=value assignments dropped;
    a quoted word that is itself a command line (a job's entrypoint) adds its own commands."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    found, words = [], []
    for word in [*lex, ";"]:
        if word in (";", "&", "&&", "|", "||"):
            while words and re.match(r"[A-Za-z_]\w*=", words[0]):
                words.pop(0)
            if words:
                found.append(words)
            words = []
        else:
            words.append(word)
    nested = [c for cmd in found for w in cmd if " " in w.strip() for c in simple_commands(w)]
    return found + nested


def inline_commands(text: str) -> list[str]:
    """The `python ...` commands of a page's inline code (BENCHMARKS.md gives each figure's command that way)."""
    return re.findall(r"`((?:\.venv/bin/)?python [^`]+)`", text)


def invocations(kind: str) -> list[tuple[str, list[str]]]:
    """(where, arguments) of every invocation of ``kind`` in the pages' bash blocks (and BENCHMARKS.md's inline
    commands): train (train_ddp.py, slurm/train.sbatch), sweep (tune.py, slurm/tune.sbatch), torchrun, make,
    evaluate (python -m stbp.evaluate)."""
    found = []
    for page in PAGES:
        lines = shell_lines(page.read_text())
        if page == BENCHMARKS:
            lines += inline_commands(page.read_text())
        for line in lines:
            for words in simple_commands(line):
                args = arguments(kind, words)
                case = (f"{page.relative_to(ROOT)}: {line}", args)
                if args is not None and case not in found:  # a page may repeat a line (a summary, then its section)
                    found.append(case)
    return found


def arguments(kind: str, words: list[str]) -> list[str] | None:
    scripts = {"train": ("train_ddp.py", "slurm/train.sbatch"), "sweep": ("tune.py", "slurm/tune.sbatch")}
    if kind in scripts:
        at = next((i for i, w in enumerate(words) if w in scripts[kind]), None)
        return None if at is None else words[at + 1 :]
    if kind in ("torchrun", "make"):
        return words[1:] if Path(words[0]).name == kind else None
    if kind == "evaluate":
        at = next((i for i in range(len(words) - 1) if words[i : i + 2] == ["-m", "stbp.evaluate"]), None)
        return None if at is None else words[at + 2 :]
    raise ValueError(kind)


def ids(case) -> str:
    return str(case)[:70]


@pytest.mark.parametrize(("line", "args"), invocations("train"), ids=ids)
def test_every_training_command_parses(line, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--config" in args:  # a file of the user's: any valid one will do
        args[args.index("--config") + 1] = str(ROOT / "stbp" / "config" / "presets" / "tiny.yaml")
    if args == ["--help"]:
        with pytest.raises(SystemExit, match="0"):
            train_ddp.parse_args(args)
    else:
        train_ddp.parse_args(args)


@pytest.mark.parametrize(("line", "args"), invocations("sweep"), ids=ids)
def test_every_sweep_command_parses(line, args):
    namespace, fields = tune.parse_args(args)
    assert (ROOT / namespace.sweep).is_file(), line


@pytest.mark.parametrize(("line", "args"), invocations("torchrun"), ids=ids)
def test_every_torchrun_command_parses(line, args):
    from torch.distributed.run import parse_args

    namespace = parse_args(args)
    assert namespace.training_script == "train_ddp.py", line


@pytest.mark.parametrize(("line", "args"), invocations("make"), ids=ids)
def test_every_make_command_is_a_target(line, args):
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    asked = [a for a in args if not a.startswith("-") and "=" not in a]
    assert asked and set(asked) <= targets, (line, sorted(targets))


@pytest.mark.parametrize(("line", "args"), invocations("evaluate"), ids=ids)
def test_every_evaluate_command_parses(line, args, monkeypatch):
    from stbp.train import evaluate

    class Parsed(Exception):
        pass

    def parsed(*_, **__):
        raise Parsed

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", parsed)
    with pytest.raises(Parsed):  # argparse refusing the line would raise SystemExit instead
        evaluate.main(args)


def test_the_pages_show_every_kind_of_command():
    """The extraction above still finds what the pages show (an empty list would skip its test silently)."""
    counts = {k: len(invocations(k)) for k in ("train", "sweep", "torchrun", "make", "evaluate")}
    assert all(counts.values()), counts
    assert any("slurm/train.sbatch" in line for line, _ in invocations("train"))
    assert any("BENCHMARKS.md" in line for line, _ in invocations("sweep"))


@pytest.mark.parametrize("command", inline_commands(BENCHMARKS.read_text()), ids=ids)
def test_every_benchmark_command_names_a_real_script_and_options(command):
    words = shlex.split(command)
    if words[1] == "-m":  # python -m stbp.export ...: a module of the package
        assert importlib.util.find_spec(words[2]) is not None, command
        return
    script = ROOT / words[1]
    assert script.is_file(), command
    if script.parent == ROOT / "bench":  # train_ddp.py and tune.py are parsed above
        source = script.read_text()
        options = {w.strip("[]").split("=")[0] for w in words[2:] if w.strip("[]").startswith("--")}
        unknown = sorted(o for o in options if f'"{o}"' not in source and f"'{o}'" not in source)
        assert not unknown, f"{command}: {script.name} defines no {unknown}"


def test_the_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/"


def test_the_readme_links_every_docs_page():
    assert len(DOCS) >= 4, DOCS
    linked = {target for target, _ in links(README)}
    missing = [p.relative_to(ROOT) for p in DOCS if p not in linked]
    assert not missing, f"README.md does not link {missing}"


def without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def links(page: Path) -> list[tuple[Path, str]]:
    """Every relative link and image of a page: (the file it resolves to, its anchor or '')."""
    found = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        found.append(((page.parent / path).resolve() if path else page, anchor))
    return found


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but - dropped, spaces as -, -1... for repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_image_resolves(page):
    broken = [
        f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}#{anchor}"
        for target, anchor in links(page)
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target))
    ]
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_path_a_page_names_exists(page):
    named = re.findall(r"(?<![\w./~-])((?:stbp|bench|tests|sweeps|slurm|docs)/[\w./-]*)", page.read_text())
    gone = sorted({p.rstrip(".,;:") for p in named if not (ROOT / p.rstrip(".,;:")).exists()})
    assert not gone, f"{page.relative_to(ROOT)} names paths that do not exist: {gone}"


def test_the_layout_lists_every_module_with_what_it_does():
    text = ARCHITECTURE.read_text()
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stbp").rglob("*.py") if p.name != "__init__.py")
    described = set(re.findall(r"^(stbp/\S+\.py)\s+\S", text, flags=re.M))
    missing = [m for m in modules if m not in described]
    assert not missing, f"docs/architecture.md's layout lacks a line for {missing}"
    listed = set(re.findall(r"(?<![\w./-])(stbp/[\w./-]*\w/?)", text))
    gone = sorted(p for p in listed if not (ROOT / p).exists())
    assert not gone, f"docs/architecture.md lists paths that do not exist: {gone}"


def test_the_architecture_page_states_the_enforced_floors():
    spec = importlib.util.spec_from_file_location("_structure", ROOT / "tests" / "test_structure.py")
    structure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(structure)
    chain = next(p for p in ARCHITECTURE.read_text().split("\n\n") if "→" in p)
    assert re.findall(r"`(stbp[\w.]*)`", chain) == structure.FLOORS, chain


def test_the_cluster_summary_is_the_documented_sequence():
    text = SCALING_OUT.read_text()
    start = text.index("## In short")
    end = text.index("\n## ", start + 5)
    section, rest = text[start:end], text[end:]
    commands = [c for c in shell_lines(section) if c.split()[0] in ("ray", "export", "ssh")]
    assert "ray get-auth-token --generate" in commands and "export RAY_AUTH_MODE=token" in commands
    docs = " ".join(rest.replace("\\\n", " ").split())
    places = [docs.find(" ".join(c.split())) for c in commands]
    assert -1 not in places, [c for c, p in zip(commands, places) if p == -1]
    setup = places[: commands.index("ray up -y cluster.yaml") + 3]  # up to the job's submission
    assert setup == sorted(setup), "the summary sets the cluster up in another order than docs/scaling-out.md explains"
    assert commands.index("export RAY_AUTH_MODE=token") < commands.index("ray up -y cluster.yaml")
    assert not any(c.startswith("ray up") and c.endswith("&") for c in commands)  # ray up must finish first
