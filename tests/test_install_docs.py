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


CI_LINES_AROUND_THE_COMMAND = (
    r"#.*",  # comments
    r"set -[a-z]+ pipefail",
    r'cd "\$\(dirname "\$0"\)/\.\."',  # to the repository root, nowhere else
    r"command -v chromium >/dev/null \|\| \(apt-get update -q && apt-get install -y -q chromium chromium-driver\)",
    r"started=\$\(date \+%s\)",
    r"rc=\$\?",
    r"cpu=\$\(awk .* /proc/cpuinfo\)",
    r'echo ".*"( >&2)?',
    r'if \[ "\$rc" -eq 5 \]; then',
    r"fi",
    r'exit ("\$rc"|1)',
)
"""What .ci/run may do besides the README's command: system packages for the browser test and timing. Nothing that
prepares the checkout (npm ci, pip, a build): a test that needs such a step takes it itself, or the README's command
would not be the whole truth (issue: the Node tests passed in CI only because .ci/run ran npm ci first)."""


def _readme_test_command() -> str:
    commands = re.findall(r"^python3 -m venv \.venv && .*$", _readme(), flags=re.MULTILINE)
    test_command = [c for c in commands if c.endswith("-m pytest")]
    assert len(test_command) == 1, commands
    return test_command[0]


def test_readme_test_command_is_what_ci_runs() -> None:
    assert _readme_test_command() in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_ci_runs_nothing_but_the_readme_command_and_its_report() -> None:
    command = _readme_test_command()
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert lines.count(command) == 1, ".ci/run must run the README's test command as one line of its own"
    extra = [
        line
        for line in lines
        if line and line != command and not any(re.fullmatch(p, line) for p in CI_LINES_AROUND_THE_COMMAND)
    ]
    assert not extra, f".ci/run does more than the README's command (put it in the tests or the README): {extra}"


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
