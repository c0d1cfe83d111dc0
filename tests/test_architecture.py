"""The house plan: no import circles between pvt_deploy's modules, and no import that runs up the layers.

Layers, bottom to top: format/ errors/ files (shared, torch-free) -> runtime/ (torch-free) -> serve/, jobs/, search/
(torch-free, on ``Runtime`` only) -> cli/; model/ and train/ (torch) beside them; export/ above model and runtime
(``verify`` runs the runtime). Function-level and ``TYPE_CHECKING`` imports count too: a lazy import is still a
dependency, and an annotation that needs the module above is a circle of design."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pvt_deploy"

FORBIDDEN = {
    "runtime": ("pvt_deploy.model", "pvt_deploy.export", "pvt_deploy.train", "pvt_deploy.serve", "pvt_deploy.jobs",
                "pvt_deploy.cli", "torch"),
    "serve": ("pvt_deploy.model", "pvt_deploy.export", "pvt_deploy.train", "pvt_deploy.jobs", "pvt_deploy.cli",
              "torch"),
    "jobs": ("pvt_deploy.model", "pvt_deploy.export", "pvt_deploy.train", "pvt_deploy.serve", "pvt_deploy.cli",
             "torch"),
    "search": ("pvt_deploy.model", "pvt_deploy.export", "pvt_deploy.train", "pvt_deploy.serve", "pvt_deploy.cli",
               "torch"),
    "format": ("pvt_deploy.model", "pvt_deploy.export", "pvt_deploy.train", "pvt_deploy.runtime", "pvt_deploy.serve",
               "pvt_deploy.jobs", "pvt_deploy.cli", "torch", "onnxruntime"),
    "model": ("pvt_deploy.export", "pvt_deploy.train", "pvt_deploy.serve", "pvt_deploy.jobs", "pvt_deploy.cli"),
}  # fmt: skip
"""Per top-level subpackage, the module prefixes it must never import."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module this file imports, at any depth in the file (``from x import y`` counts ``x`` and ``x.y``)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = {name for name in _imports(path, module) if name in files and name != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_between_modules() -> None:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {
        module: {
            target
            for target in targets
            # a package's __init__ re-exporting its own modules is not a circle of design
            if not (module.endswith(target.rsplit(".", 1)[0]) and files[module].name == "__init__.py")
            and target != module.rsplit(".", 1)[0]
        }
        for module, targets in _graph().items()
    }
    assert _cycles(graph) == []


def test_no_import_runs_up_the_layers() -> None:
    offences = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in FORBIDDEN:
            continue
        for name in _imports(path, module):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[parts[1]]):
                offences.append(f"{module} imports {name}")
    assert sorted(set(offences)) == []
