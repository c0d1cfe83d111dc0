"""File safety in one place: atomic writes, sha256, and the output lock. Standard library only (torch-free).

* ``atomic_write(path, write)``: ``write(handle)`` fills a temp file beside ``path``; it is flushed, fsynced and
  renamed over ``path`` only when ``write`` returns, so a reader sees the old file or the whole new one, never
  half of one, and a failure (or Ctrl-C) leaves no temp file. ``atomic_write_bytes``, ``atomic_write_text`` and
  ``atomic_write_json`` are the common cases; ``torch.save(obj, handle)`` or ``pyarrow`` writers fit ``write``.
* ``sha256_file(path)``: the hex digest, read in chunks (the one sha256 helper of the package).
* ``OutputLock(path)``: exclusive use of an output path by one process (``flock`` on ``.NAME.lock``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pvt_deploy.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, the lock is a no-op there
    fcntl = None  # type: ignore[assignment]

CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str], chunk_size: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], Any],
    *,
    durable: bool = True,
    staging: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``path`` through a temp file in the same folder: ``write(handle)`` gets the open binary handle and
    may raise to abandon the write (e.g. a checksum that does not match): nothing is renamed then.

    ``durable`` fsyncs the data before the rename (so a power cut leaves the old or the new file). ``staging``
    names the temp file (``staging.staging_path``, so the next run can tell a dead run's leftover); by default a
    unique ``.NAME.*.tmp``. The folder is created if needed; the temp file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
    else:
        tmp = Path(staging)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    return atomic_write(path, lambda handle: handle.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(
    path: str | os.PathLike[str], value: Any, *, indent: int | None = 2, durable: bool = True
) -> Path:
    """``value`` as JSON (UTF-8, a trailing newline)."""
    return atomic_write_text(path, json.dumps(value, indent=indent) + "\n", durable=durable)


def lock_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """Exclusive use of an output path for one process: ``with OutputLock(out): ...``.

    Non-blocking: a second run fails at once with ``OutputError("another run (pid N) is using OUT")``. The kernel
    drops an ``flock`` when its process dies, so a lock is never stale; the pid written inside names the holder.
    The lock file is removed on release; a run that opened the file just before that re-checks the inode and
    retries."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_file = lock_path(self.path)
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        while True:
            try:
                self.lock_file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(f"cannot lock {self.path}: {exc.strerror}") from None
                raise OutputError(f"another run (pid {self._holder()}) is using {self.path}") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder released and removed the file between our open and flock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its pid right after taking the lock
            try:
                text = self.lock_file.read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                return text
            time.sleep(0.01)
        return "unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
