"""Staging folders that the next run can clean up, and Ctrl-C that libraries cannot swallow.

A command that builds ``OUT`` writes into a hidden sibling named ``.OUT.<tag>-<pid>-<starttime>`` and renames it
into place at the end. If the process is killed (SIGKILL, power loss) that sibling stays behind; the name says which
process made it, and ``clean_stale_staging`` removes it once that process no longer exists. The start time (field 22
of ``/proc/<pid>/stat``) tells a dead run from a new process that happens to have the same pid.

The lock that keeps two runs off one output is ``pvt_deploy.files.OutputLock``.

``sticky_interrupts`` makes Ctrl-C reliable around libraries that swallow it: onnxsim's C++ wraps its Python
callbacks (onnxruntime constant folding, shape inference) in catch-all blocks, so a ``KeyboardInterrupt`` raised
inside one is caught and the simplification simply continues. The handler also remembers the signal, and
``raise_if_interrupted`` raises it again at the next check (export checks before it renames anything into place).
Torch-free, standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

_TAG = re.compile(r"^[A-Za-z0-9_]+$")


def process_start_time(pid: int) -> int | None:
    """Clock ticks after boot at which ``pid`` started, or None when no such process exists.

    Where /proc is missing (macOS) a live process reports 0, so only "pid gone" counts as stale there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        return 0 if _pid_exists(pid) else None
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 overall; fields here start at field 3


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_path(final: Path, tag: str) -> Path:
    """``<parent>/.<name>.<tag>-<pid>-<starttime>``: a sibling of ``final`` that names the process writing it."""
    if not _TAG.match(tag):
        raise ValueError(f"staging tag must be letters, digits or '_': {tag!r}")
    final = Path(final)
    pid = os.getpid()
    return final.with_name(f".{final.name}.{tag}-{pid}-{process_start_time(pid) or 0}")


def _staging_owner(entry: str, name: str) -> tuple[int, int | None] | None:
    """(pid, start time) encoded in a staging name of ``name``, or None when ``entry`` is not one.

    ``.<name>.<tag>-<pid>-<hex>`` and ``<name>.tmp-<pid>`` carry no start time: they count as stale once the pid is
    gone."""
    prefix = f".{name}."
    if entry.startswith(prefix):
        match = re.fullmatch(r"([A-Za-z0-9_]+)-(\d+)-([0-9a-f]+)", entry[len(prefix) :])
        if match is None:
            return None
        pid, rest = int(match.group(2)), match.group(3)
        return pid, (int(rest) if rest.isdigit() else None)
    match = re.fullmatch(re.escape(name) + r"\.tmp-(\d+)", entry)
    if match is not None:
        return int(match.group(1)), None
    return None


def is_stale(pid: int, start_time: int | None) -> bool:
    """True when the process that made a staging entry no longer exists (gone, or its pid reused)."""
    current = process_start_time(pid)
    if current is None:
        return True
    return start_time is not None and current != 0 and start_time != 0 and current != start_time


def clean_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove staging of ``parent/name`` left by processes that no longer exist; return what was removed."""
    parent = Path(parent)
    try:
        entries = sorted(os.listdir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[Path] = []
    for entry in entries:
        owner = _staging_owner(entry, name)
        if owner is None or not is_stale(*owner):
            continue
        path = parent / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # not ours to remove (permissions): leave it, do not report it
                path.unlink(missing_ok=True)
        if not path.exists() and not path.is_symlink():
            removed.append(path)
    return removed


def describe_removed(removed: list[Path]) -> str:
    """One line for the user, e.g. "removed 2 leftovers of interrupted runs: .out.partial-12-345, ..."."""
    names = ", ".join(p.name for p in removed)
    plural = "s" if len(removed) != 1 else ""
    return f"removed {len(removed)} leftover{plural} of interrupted runs: {names}"


_interrupted = threading.Event()


def _remembering_handler(signum: int, frame: FrameType | None) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived inside ``sticky_interrupts``, even if a library swallowed it."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def sticky_interrupts() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` as usual and is also remembered until the block ends; the block ends by
    raising it if it was swallowed. Only takes over Python's default handler, in the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield  # ignored (nohup), someone else's handler, or already inside a sticky block
        return
    _interrupted.clear()
    signal.signal(signal.SIGINT, _remembering_handler)
    try:
        yield
        raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _interrupted.clear()
