"""The exit codes the docs promise are the ones the code uses: one table (``errors.EXIT_CODES``), walked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pvt_deploy import errors
from pvt_deploy.errors import EXIT_CODES, PvtDeployError

REPO = Path(__file__).resolve().parent.parent


def _error_classes() -> list[type[PvtDeployError]]:
    return [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, PvtDeployError) and value is not PvtDeployError
    ]


def test_every_error_class_has_a_documented_code() -> None:
    for error_class in _error_classes():
        assert error_class.exit_code in EXIT_CODES, f"{error_class.__name__} exits {error_class.exit_code}, not listed"


def test_readme_lists_exactly_the_table() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"an exit code from one table.*?:(.*?)\n\n", text, flags=re.DOTALL)
    assert match, "README lost its exit-code list"
    listed = {int(code) for code in re.findall(r"(?:^|,)\s*(\d+) ", match.group(1).replace("\n", " "))}
    assert listed == set(EXIT_CODES)


@pytest.mark.parametrize(
    "doc, pattern",
    [
        ("docs/runtime.md", r"^\| (\d+) \|"),  # the runtime commands' table
        ("docs/export.md", r"(?:Exit codes:|,) (\d+) "),  # the export paragraph
    ],
)
def test_docs_mention_only_codes_in_the_table(doc: str, pattern: str) -> None:
    text = (REPO / doc).read_text(encoding="utf-8")
    if "Exit codes:" in text:
        text = re.search(r"Exit codes:.*?\n\n", text, flags=re.DOTALL).group(0).replace("\n", " ")
    codes = {int(code) for code in re.findall(pattern, text, flags=re.MULTILINE)}
    assert codes, f"{doc}: no exit codes found; the pattern is stale"
    assert codes <= set(EXIT_CODES), f"{doc} documents codes the CLI never uses: {codes - set(EXIT_CODES)}"


def test_output_in_the_way_is_one_code_everywhere() -> None:
    """The bug: README said 1 for 'output in the way' while export's existing folder exited 6."""
    assert errors.OutputError.exit_code == 1
    export_doc = (REPO / "docs/export.md").read_text(encoding="utf-8")
    assert "1 the output folder exists" in export_doc
    assert "6 export failed (incl. an existing folder" not in export_doc


def test_every_exit_code_mentioned_anywhere_is_in_the_table() -> None:
    """'exit 4', 'exits 7', 'exit code 3', 'exit 8/9' in the README or any docs page name a code the CLI uses."""
    mention = re.compile(r"\bexit(?:s| code| codes)? (\d+(?:/\d+)*)", flags=re.IGNORECASE)
    found: dict[str, set[int]] = {}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for group in mention.findall(doc.read_text(encoding="utf-8")):
            found.setdefault(doc.name, set()).update(int(code) for code in group.split("/"))
    assert len(found) >= 3, f"found exit codes in only {sorted(found)}; the pattern is stale"
    unknown = {doc: codes - set(EXIT_CODES) for doc, codes in found.items() if codes - set(EXIT_CODES)}
    assert not unknown, f"docs mention exit codes the CLI never uses: {unknown}"
