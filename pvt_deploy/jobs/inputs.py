"""What a bulk job runs on: files, folders (recursive), globs and lists of paths, in a stable order.

A path that does not exist stays in the list, so it becomes a row with its error instead of vanishing. A folder
contributes its image files (by extension, sorted); a FIFO or device named ``*.jpg`` is listed too and fails as its
own row ("not a regular file") rather than hanging the job.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import IMAGE_EXTENSIONS, is_image_file

_GLOB_CHARACTERS = frozenset("*?[")


def _walk(folder: Path) -> list[str]:
    """Image files below ``folder``, recursively, sorted by path (symlinked folders are not followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in files if is_image_file(name))
    return sorted(found, key=lambda p: Path(p).as_posix())


def read_path_list(source: str, stdin: TextIO | None = None) -> list[str]:
    """One path per line from a file, or from standard input for ``-``; blank lines are skipped."""
    try:
        text = (stdin or sys.stdin).read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"--from-list {source}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


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
                raise ImageError(f"{given}: no files match this pattern")
            found.extend(files)
        else:
            found.append(given)
    for source in from_list:
        found.extend(read_path_list(source, stdin))
    if len(empty_folders) == len(found):
        described = ", ".join([*paths, *(f"--from-list {s}" for s in from_list)]) or "the arguments"
        raise ImageError(f"no images found in {described} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return found
