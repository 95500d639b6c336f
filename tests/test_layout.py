"""The tree is the dependency graph: each stage's deps in dvc.yaml are exactly the code it imports,
and the method never imports the demo world."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_repo_files(module: str) -> set[str]:
    """Repo-relative .py files that `import module` loads (in a fresh interpreter)."""
    script = (
        "import json, sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(json.dumps([m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]))"
    )
    result = subprocess.run([sys.executable, "-c", script, module], cwd=REPO, capture_output=True, text=True, check=True)
    files = set()
    for name in json.loads(result.stdout.splitlines()[-1]):
        path = Path(name)  # some extension modules report a bare relative name: not ours
        if path.is_absolute() and path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in ("ec_lora_t", "stages"):
            files.add(path.relative_to(REPO).as_posix())
    return files


def is_trivial_init(path: str) -> bool:
    """A package `__init__.py` with nothing but a docstring and `__version__` changes no result."""
    if not path.endswith("__init__.py"):
        return False
    tree = ast.parse((REPO / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]:
            continue
        return False
    return True


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if d.startswith(("stages/", "ec_lora_t/"))]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_exactly_the_code_it_imports(stage):
    imported = {f for f in imported_repo_files(f"stages.{stage}") if not is_trivial_init(f) and f != "stages/__init__.py"}
    deps = code_deps(STAGES[stage])
    uncovered = sorted(f for f in imported if not covered(f, deps))
    assert not uncovered, f"{stage} imports code its deps do not name: {uncovered}"
    for dep in deps:
        path = REPO / dep
        assert path.exists(), f"{stage}: dep {dep} does not exist"
        files = [dep] if path.is_file() else [p.relative_to(REPO).as_posix() for p in path.rglob("*.py")]
        unused = sorted(f for f in files if f not in imported and not is_trivial_init(f))
        assert not unused, f"{stage}: dep {dep} names code the stage never imports: {unused}"


METHOD_PACKAGES = ["adapter", "training", "data", "evaluation"]
METHOD_MODULES = ["generation.py", "pipeline.py", "models.py", "encoders.py"]


def test_the_method_never_imports_the_demo_world():
    sources = [p for package in METHOD_PACKAGES for p in (REPO / "ec_lora_t" / package).rglob("*.py")]
    sources += [REPO / "ec_lora_t" / name for name in METHOD_MODULES]
    offenders = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if any(name.startswith("ec_lora_t.demo") for name in names):
                offenders.append(source.relative_to(REPO).as_posix())
    assert not offenders, f"method modules import the demo: {offenders}"


def test_no_stage_reads_sys_argv_and_all_share_one_parser():
    for stage in STAGES:
        source = (REPO / "stages" / f"{stage}.py").read_text()
        assert "sys.argv" not in source, stage
        assert "stage_parser(__doc__)" in source and "def main(argv: list[str] | None = None)" in source, stage
        assert "--params" not in source.replace('"--params", str(', ""), f"{stage} declares --params itself"


@pytest.mark.parametrize("module", [f"stages.{stage}" for stage in sorted(STAGES)] + ["ec_lora_t.cli", "ec_lora_t.app"])
def test_importing_an_entry_point_prints_nothing(module):
    """A normal run shows no library notices: importing diffusers' pipelines makes transformers
    print its torchvision fallback notice unless `generation` imports them quietly."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == result.stderr == "", result.stderr


MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def code_files() -> list[Path]:
    return sorted(p for folder in ("ec_lora_t", "stages") for p in (REPO / folder).rglob("*.py"))


def oversized(path: Path) -> list[str]:
    """What in one source file breaks the size rule: the file, or a function (methods and nested
    functions included, decorators counted) longer than the limit."""
    source = path.read_text()
    name = path.relative_to(REPO).as_posix()
    problems = []
    if len(source.splitlines()) > MAX_FILE_LINES:
        problems.append(f"{name}: {len(source.splitlines())} lines (at most {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > MAX_FUNCTION_LINES:
                problems.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return problems


def test_no_function_over_80_lines_and_no_file_over_500():
    """A long procedure is a few named steps, each short enough to read at once (docs/architecture.md)."""
    problems = [problem for path in code_files() for problem in oversized(path)]
    assert not problems, "split into named steps: " + "; ".join(problems)


def test_the_size_rule_names_what_breaks_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    long_function = "def long_one():\n" + "    x = 1\n" * 80 + "\n\ndef short_one():\n    return 1\n"
    (tmp_path / "module.py").write_text(long_function + "\n" * 420)
    assert oversized(tmp_path / "module.py") == [
        "module.py: 505 lines (at most 500)", "module.py:1 long_one: 81 lines (at most 80)"]
