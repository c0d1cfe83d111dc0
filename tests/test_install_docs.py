"""The README's install story is the one the repository runs: its test command is .ci/run's, and the packages it
lists for the base install and each extra are pyproject.toml's (issue: the README's [bench] list was stale)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def _listed(text: str) -> set[str]:
    """'psutil, matplotlib; a remark' -> {'psutil', 'matplotlib'}: the packages before any remark."""
    return {name.strip().lower() for name in text.split(";")[0].split(",") if name.strip()}


def _installs_paragraph() -> str:
    match = re.search(r"^Installs: (.*?)\n\n", _readme(), flags=re.DOTALL | re.MULTILINE)
    assert match, "README lost its 'Installs:' paragraph"
    return match.group(1).replace("\n", " ")


def test_readme_test_command_is_what_ci_runs() -> None:
    commands = re.findall(r"^python3 -m venv \.venv && .*$", _readme(), flags=re.MULTILINE)
    test_command = [c for c in commands if c.endswith("-m pytest")]
    assert len(test_command) == 1, commands
    assert test_command[0] in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_lists_each_extra_as_pyproject_defines_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    paragraph = _installs_paragraph()

    base = re.search(r"\*\*runtime only\*\* \(([^)]*)\)", paragraph)
    assert base, "README no longer lists the base install's packages"
    assert _listed(base.group(1).replace("no torch", "")) == _names(project["dependencies"])

    listed = {extra: _listed(packages) for extra, packages in re.findall(r"`\[([\w-]+)\]` \(([^)]*)\)", paragraph)}
    extras = project["optional-dependencies"]
    assert set(listed) == set(extras), "README and pyproject.toml name different extras"
    for extra, packages in extras.items():
        assert listed[extra] == _names(packages), f"README's [{extra}] differs from pyproject.toml"
