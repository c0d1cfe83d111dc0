"""Every CLI command's imports are covered by the base install plus the extras it declares, and a missing extra is
one ``Error:`` line naming what to install (issue: `bench` needed tqdm, which only [train] carried)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import click
import pytest
import tomllib
from click.testing import CliRunner

from pvt_deploy.cli import LAZY_COMMANDS, cli, distribution_of
from pvt_deploy.errors import MissingExtraError

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pvt_deploy"

# packages used only when a user picks them by name, with their own one-line error when absent
OPT_IN = {
    "onnxslim": "export --simplifier onnxslim (onnx_io wraps its absence in an ExportError line)",
    "ray": "only behind --engine ray / serve --ray; commands offering those declare [ray]",
}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _module_path(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (REPO / relative.with_suffix(".py"), REPO / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``try: ... except ImportError`` (an optional dependency the code does without)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = [handler.type] if not isinstance(handler.type, ast.Tuple) else list(handler.type.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(pvt_deploy modules, third-party top-level names) imported anywhere in the file, function bodies included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if _guarded(node, parents):
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "pvt_deploy":
                ours.add(name)
            elif top not in sys.stdlib_module_names and top != "__future__":
                theirs.add(top)
    return ours, theirs


def _third_party_closure(module: str) -> dict[str, str]:
    """Every third-party package reachable from ``module`` through pvt_deploy imports -> the module importing it."""
    seen: set[str] = set()
    found: dict[str, str] = {}
    stack = [module]
    while stack:
        name = stack.pop()
        path = _module_path(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        stack.extend(".".join(parts[:i]) for i in range(2, len(parts)))  # parent packages' __init__ run too
        ours, theirs = _imports(path)
        stack.extend(ours)
        for package in theirs:
            found.setdefault(package, name)
    return found


@pytest.mark.parametrize("command", sorted(LAZY_COMMANDS))
def test_command_imports_are_covered_by_its_extras(command: str) -> None:
    project = _project()
    target, _help, extras = LAZY_COMMANDS[command]
    allowed = {_requirement_name(r) for r in project["dependencies"]}
    optional = project["optional-dependencies"]
    for extra in extras:
        assert extra in optional, f"{command} declares the extra [{extra}], which pyproject.toml lacks"
        allowed |= {_requirement_name(r) for r in optional[extra]}
    needed = _third_party_closure(target.split(":")[0])
    assert needed, f"{command}: found no imports at all; the scan is broken"
    uncovered = {
        package: where
        for package, where in needed.items()
        if package not in OPT_IN and distribution_of(package) not in allowed
    }
    assert not uncovered, f"`pvt-deploy {command}` imports packages outside its extras {extras}: {uncovered}"


def test_scan_sees_function_level_imports() -> None:
    """The bug this guards: bench imported tqdm inside a function; a module-level-only scan would miss it."""
    assert "tqdm" in _third_party_closure("pvt_deploy.cli.bench_cmds")


@click.command()
@click.argument("model_dir")
def _bench_without_psutil(model_dir: str) -> None:
    """Stands in for `bench` importing its extra's package only when it runs."""
    raise ModuleNotFoundError("No module named 'psutil'", name="psutil")


def test_missing_package_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command whose extra is missing says which extra to install, in one line, with its own exit code."""
    monkeypatch.setitem(
        LAZY_COMMANDS, "bench", ("tests.test_extras:_bench_without_psutil", *LAZY_COMMANDS["bench"][1:])
    )
    result = CliRunner().invoke(cli, ["bench", "somewhere"])
    assert result.exit_code == MissingExtraError.exit_code == 11
    assert result.output.strip().splitlines() == [
        "Error: `pvt-deploy bench` needs the [bench] extra (psutil is not installed): pip install 'pvt-deploy[bench]' "
        "(from a source checkout: pip install -e '.[bench]')"
    ]


def test_missing_module_at_import_time_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LAZY_COMMANDS, "train", ("pvt_deploy.cli.not_a_module:train", "x", ("train",)))
    monkeypatch.setitem(sys.modules, "pvt_deploy.cli.not_a_module", None)  # import raises ModuleNotFoundError

    result = CliRunner().invoke(cli, ["train", "--help"])
    # our own module missing is a packaging bug and must not be disguised as a missing extra
    assert result.exit_code != 0 and isinstance(result.exception, ModuleNotFoundError)

    def import_torch_fails(name: str, *args: object, **kwargs: object) -> object:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setitem(LAZY_COMMANDS, "train", ("pvt_deploy.cli.train_cmds:train", "x", ("train",)))
    monkeypatch.setattr("importlib.import_module", import_torch_fails)
    result = CliRunner().invoke(cli, ["train", "mmcr", "photos/"])
    assert result.exit_code == 11
    assert result.output.strip().splitlines() == [
        "Error: `pvt-deploy train` needs the [train] extra (torch is not installed): pip install 'pvt-deploy[train]' "
        "(from a source checkout: pip install -e '.[train]')"
    ]
