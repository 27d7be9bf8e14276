"""The shape of the package: imports run one way (no module imports one that imports it back, directly or round a
longer circle), no function is longer than a screen (60 lines) and no file past 600 lines, and the core loads
without Ray or MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stbp"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every stbp module and the stbp modules it imports, at any depth of the file (lazy imports count too)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                names = [f"{target}.{a.name}" for a in node.names]
                found |= {t for t in [target, *names] if t.startswith("stbp")}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("stbp")}
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_circles():
    graph = imports()
    assert "stbp.sweep.spec" in graph and "stbp.train.loop" in graph  # the walk found the package

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return [*path, dep]
                if dep not in path and not (dep == "stbp" or start.startswith(dep + ".")):
                    stack.append((dep, [*path, dep]))
        return None

    circles = [c for m in graph if (c := circle_from(m))]
    assert not circles, circles


def test_the_sweep_imports_run_one_way():
    graph = imports()
    order = [
        "stbp.sweep.spec",
        "stbp.sweep.record",
        "stbp.sweep.trial",
        "stbp.sweep.searcher",
        "stbp.sweep.analysis",
        "stbp.sweep.plots",
        "stbp.sweep.compare",
        "stbp.sweep.report",
        "stbp.sweep.run",
    ]
    for i, module in enumerate(order):
        later = set(order[i + 1 :])
        assert not graph[module] & later, (module, graph[module] & later)


def test_no_file_in_the_package_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_no_function_or_method_is_over_60_lines():
    """What a reader must hold at once fits a screen: in the package and the two entry scripts."""
    files = [*PACKAGE.rglob("*.py"), ROOT / "train_ddp.py", ROOT / "tune.py"]
    long = {
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    }
    assert not long, long


def test_the_core_loads_without_ray_or_mlflow():
    code = (
        "import sys, stbp, stbp.train, stbp.evaluate, stbp.data.loader, stbp.config, stbp.train.checkpoint, stbp.core\n"
        "print(sorted(m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


#: The floors of the package, lowest first: a module imports its own floor and those below, never one above.
FLOORS = ["stbp.errors", "stbp.ports", "stbp.core", "stbp.data", "stbp.config", "stbp.tracking", "stbp.train"]
FLOORS += ["stbp.sweep", "stbp.evaluate"]


def floor(module: str) -> int:
    return next((i for i, f in enumerate(FLOORS) if module == f or module.startswith(f + ".")), len(FLOORS))


def test_imports_never_run_up_a_floor():
    graph = imports()
    assert {floor(m) for m in graph} >= set(range(len(FLOORS))), "every floor has a module"
    up = {(m, d) for m, deps in graph.items() for d in deps if floor(d) > floor(m) and m != "stbp"}
    assert not up, sorted(up)


def test_the_package_shows_its_floors_with_few_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 6, loose
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {"core", "data", "config", "train", "tracking", "sweep"} <= packages
