"""The README's install story is the one the repository runs: its test command is .ci/run's, and the packages it
lists for the base install and each extra are pyproject.toml's (issue: the README's [bench] list was stale)."""

from __future__ import annotations

import os
import re
import shlex
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


# ---- every command in README.md and docs/*.md runs as written after command 1 (paths) ---------------------------

DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH_SUFFIXES = (".jpg", ".jpeg", ".png", ".pt", ".safetensors", ".parquet", ".lance", ".npz", ".npy", ".onnx", ".mjs")
PATH_SUFFIXES += (".py", ".json", ".jsonl", ".csv", ".txt", ".bin", ".md")
OUTPUT_OPTIONS = {"--out", "--db", "--plot"}
"""Options whose value a command writes (``--db`` too: ``index build`` makes the store that ``search`` then reads)."""


def _command_one() -> str:
    line = next(line for line in _readme().splitlines() if line.startswith("python3 -m venv") and " export " in line)
    return line


def _command_one_folder() -> str:
    """The folder command 1 writes, computed by the exporter's own default (not copied from the README)."""
    from types import SimpleNamespace

    from pvt_deploy.export.exporter import default_out_dir

    words = shlex.split(_command_one())
    name = words[words.index("export") + 1]
    return default_out_dir(SimpleNamespace(model_name=name, random_weights="--random-weights" in words)).as_posix()


def _declared_placeholders() -> set[str]:
    match = re.search(r"\*\*Placeholders\*\*(.*?)\n\n", _readme(), flags=re.DOTALL)
    assert match, "README lost its **Placeholders** sentence"
    names = re.findall(r"`([^`]+)`", match.group(1).split("stand for your own files and folders;", 1)[-1])
    return {name.rstrip("/") for name in names}


def _bash_commands(text: str) -> list[list[str]]:
    """Each ```bash block as a list of logical lines (backslash continuations joined)."""
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    return [block.replace("\\\n", " ").splitlines() for block in blocks]


def _is_convention_placeholder(word: str) -> bool:
    """UPPER-CASE words, <angle brackets>, $VARIABLES, [optional parts], {templates}, URLs and globs are never
    literal paths."""
    head = word.split("/", 1)[0]
    return (
        any(mark in word for mark in "$<>[]*{}")
        or "://" in word
        or (head.isupper() and head.replace("_", "").isalnum())
    )


def _looks_like_path(word: str) -> bool:
    return ("/" in word or word.lower().endswith(PATH_SUFFIXES)) and not word.startswith("-")


def _path_problems(page: Path, folder: str, placeholders: set[str]) -> list[str]:
    """Paths in ``page``'s shell commands that would not exist after command 1 (see the README's placeholders)."""
    problems = []
    written: set[str] = set()
    for block in _bash_commands(page.read_text(encoding="utf-8")):
        cwd = REPO
        for line in block:
            words = []
            for word in shlex.split(line, comments=True):  # a quoted command (--client '...') is checked too
                words.extend(shlex.split(word) if " " in word else [word])
            previous = ""
            for word in words:
                option, previous = previous, word
                if word in {"&&", "||", "|", ";"}:
                    continue
                value = word.split("=@", 1)[-1] if "=@" in word else word
                value = value.split("=", 1)[1] if re.match(r"^[a-z_]+=", value) else value
                if option == "cd":
                    cwd = (cwd / value).resolve()
                    continue
                if not _looks_like_path(value) or _is_convention_placeholder(value):
                    continue
                relative = os.path.relpath((cwd / value).resolve(), REPO).replace(os.sep, "/")
                if option in OUTPUT_OPTIONS:
                    written.add(relative.rstrip("/"))
                    continue
                if relative.startswith("exported/") and relative.split("/")[:2] != folder.split("/")[:2]:
                    if relative not in written:
                        problems.append(f"{page.name}: {line.strip()!r}: {value} is not {folder}")
                    continue
                known = (
                    (REPO / relative).exists()
                    or relative.startswith((folder, ".venv/"))
                    or relative.rstrip("/") in written
                    or value.rstrip("/") in placeholders
                )
                if not known:
                    problems.append(f"{page.name}: {line.strip()!r}: {value} neither exists nor is a placeholder")
    return problems


def test_command_one_predicts_from_the_folder_it_exports() -> None:
    folder = _command_one_folder()
    assert folder == "exported/pvt_v2_b2_mmcr-il-all-random-weights"
    assert f"predict {folder} " in _command_one()


def test_every_exported_folder_the_docs_name_is_command_ones() -> None:
    """Issue: README and docs served `exported/pvt_v2_b2_mmcr-il-all`, which command 1 never makes (exit 5)."""
    folder = _command_one_folder()
    wrong = []
    for page in DOC_PAGES:
        text = page.read_text(encoding="utf-8")
        written = {
            match.rstrip("/") for match in re.findall(r"--out (?:\.\./)*(exported/[\w.-]+)", text)
        }  # e.g. training.md's own export
        for match in re.findall(r"(?<![\w/])(?:\.\./)*(exported/[\w.-]+)", text):
            if match.rstrip("/") not in {folder, *written}:
                wrong.append(f"{page.relative_to(REPO)}: {match}")
    assert not wrong, f"folders command 1 does not write (it writes {folder}): {wrong}"


def test_every_path_in_the_docs_commands_exists_or_is_a_placeholder() -> None:
    folder = _command_one_folder()
    placeholders = _declared_placeholders()
    problems = [problem for page in DOC_PAGES for problem in _path_problems(page, folder, placeholders)]
    assert not problems, "\n".join(problems)


def test_the_path_check_catches_a_wrong_folder_and_an_undeclared_file(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\npvt-deploy serve exported/pvt_v2_b2_mmcr-il-all --port 8000\n"
        "cd clients/node && node pvt_client.mjs ../../exported/pvt_v2_b2_mmcr-il-all-random-weights mystery.jpg\n```\n"
    )
    problems = _path_problems(page, _command_one_folder(), _declared_placeholders())
    assert len(problems) == 2, problems
    assert "is not exported/pvt_v2_b2_mmcr-il-all-random-weights" in problems[0]
    assert "mystery.jpg neither exists" in problems[1]


def test_readme_shows_how_npm_ci_runs_offline() -> None:
    """Where README or docs show `npm ci`, they show it with ONNXRUNTIME_NODE_INSTALL=skip (no CUDA download)."""
    for page in DOC_PAGES:
        for block in _bash_commands(page.read_text(encoding="utf-8")):
            for line in block:
                if "npm ci" in line:
                    assert "ONNXRUNTIME_NODE_INSTALL=skip npm ci" in line, f"{page.name}: {line}"


def test_readme_says_which_extra_each_section_needs() -> None:
    """Issue: the Tour's `--out results.parquet` exits 11 after command 1; the sections now install their extra."""
    readme = _readme()
    for section, extra in (("## Serve", "serve"), ("## Bulk jobs and search", "bulk"), ("## Tour", "bulk")):
        body = readme.split(section, 1)[1].split("\n## ", 1)[0]
        assert f"pip install -e '.[{extra}]'" in body or re.search(rf"pip install -e '\.\[[\w,]*{extra}", body), section
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "--index-url" not in _command_one()
