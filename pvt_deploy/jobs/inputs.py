"""What a bulk job runs on: files, folders (recursive), globs and lists of paths, in a stable order.

A path that does not exist stays in the list, so it becomes a row with its error instead of vanishing. A folder
contributes its image files (by extension, sorted); a FIFO or device named ``*.jpg`` is listed too and fails as its
own row ("not a regular file") rather than hanging the job.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from pvt_deploy.errors import UsageError
from pvt_deploy.preprocess import IMAGE_EXTENSIONS, is_image_file

_GLOB_CHARACTERS = frozenset("*?[")


def _walk(folder: Path) -> list[str]:
    """Image files below ``folder``, recursively, sorted by path (symlinked folders are not followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in files if is_image_file(name))
    return sorted(found, key=lambda p: Path(p).as_posix())


MAX_LIST_LINE_BYTES = 4096
"""The longest line ``--from-list`` accepts: Linux's PATH_MAX. A longer one means the file is not a list of paths
(``/dev/zero``, a binary file), and bounding it keeps such a file from filling memory before that is noticed."""


def _not_a_list(source: str, why: str) -> UsageError:
    return UsageError(f"--from-list {source}: not a list of paths ({why})")


def _lines(handle: IO[Any], source: str) -> Iterator[str]:
    """The lines of ``handle`` (bytes or text), each read with a bounded ``readline``; a line that is too long, holds
    a NUL or is not UTF-8 stops the reading with one error."""
    number = 0
    while True:
        line = handle.readline(MAX_LIST_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if isinstance(line, bytes):
            if b"\0" in line:
                raise _not_a_list(source, f"line {number} holds a NUL byte")
            # the bound is on what readline read: decoded, a cut-off line of multi-byte characters is shorter
            if len(line) > MAX_LIST_LINE_BYTES and not line.endswith(b"\n"):
                raise _not_a_list(source, f"line {number} is longer than {MAX_LIST_LINE_BYTES} bytes")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_a_list(source, f"line {number} is not UTF-8 text") from None
        else:
            text = line
            if "\0" in text:
                raise _not_a_list(source, f"line {number} holds a NUL character")
            if len(text) > MAX_LIST_LINE_BYTES and not text.endswith("\n"):
                raise _not_a_list(source, f"line {number} is longer than {MAX_LIST_LINE_BYTES} bytes")
        yield text.rstrip("\n").rstrip("\r")


def read_path_list(source: str, stdin: TextIO | None = None) -> list[str]:
    """One path per line from a file, or from standard input for ``-``; blank lines are skipped.

    The list is read line by line (a FIFO such as ``<(find ...)`` works), each line bounded by
    ``MAX_LIST_LINE_BYTES``; a list that is not text is one ``UsageError`` (exit 2)."""
    try:
        if source == "-":
            stream = stdin or sys.stdin
            return [line for line in _lines(getattr(stream, "buffer", stream), source) if line.strip()]
        path = Path(source)
        if path.is_dir():
            raise _not_a_list(source, "it is a folder")
        with open(path, "rb") as handle:
            return [line for line in _lines(handle, source) if line.strip()]
    except UnicodeDecodeError:
        raise _not_a_list(source, "not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"--from-list {source}: cannot read ({exc.strerror or exc})") from None


def collect_inputs(paths: Sequence[str], from_list: Sequence[str] = (), stdin: TextIO | None = None) -> list[str]:
    """Expand ``paths`` (files as given, folders walked, globs matched) and append the ``from_list`` files' lines.

    A glob that matches nothing is an error (a typo would otherwise run an empty job); so is no input at all. A
    folder without images stays in the list, to fail as a row, unless nothing else was given."""
    found: list[str] = []
    empty_folders: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            images = _walk(path)
            if not images:  # kept as a row of its own ("is a folder"), never silently dropped
                empty_folders.append(given)
                images = [given]
            found.extend(images)
        elif not path.exists() and _GLOB_CHARACTERS & set(given):
            matches = sorted(glob.glob(given, recursive=True))
            files = [m for m in matches if not Path(m).is_dir()]
            if not files:
                raise UsageError(f"{given}: no files match this pattern")
            found.extend(files)
        else:
            found.append(given)
    for source in from_list:
        found.extend(read_path_list(source, stdin))
    if len(empty_folders) == len(found):
        described = ", ".join([*paths, *(f"--from-list {s}" for s in from_list)]) or "the arguments"
        raise UsageError(f"no images found in {described} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return found
