"""Published birder PVT v2 weights: where they live, and a verified, atomic download into a local cache (no torch).

The registry repeats birder 0.8.4's ``register_weights`` entries for the PVT v2 B2 bird classifiers
(``birder/net/pvt_v2.py``): the file is ``<base_url>/<name>.pt`` and is checked against its published sha256.

Cache folder, first that is set: the ``cache_dir`` argument (CLI ``--cache-dir``), ``$PVT_DEPLOY_CACHE``,
``~/.cache/pvt-deploy``. Base URL, first that is set: the ``base_url`` argument, ``$PVT_DEPLOY_BASE_URL`` (tests
point it at a local server), the registry's URL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pvt_deploy.errors import CheckpointError, DownloadError
from pvt_deploy.files import atomic_write, sha256_file
from pvt_deploy.staging import clean_stale_staging, describe_removed, staging_path

CACHE_ENV = "PVT_DEPLOY_CACHE"
BASE_URL_ENV = "PVT_DEPLOY_BASE_URL"
DEFAULT_CACHE_DIR = Path("~/.cache/pvt-deploy")
BIRDER_HUB_URL = "https://huggingface.co/birder-project/pvt_v2_b2_mmcr-il-all/resolve/main"
DEFAULT_TIMEOUT = 900.0
"""Seconds a whole download may take (``--timeout``): a server dripping bytes cannot keep it running forever."""
READ_TIMEOUT = 60.0
"""Seconds any single connect or read may wait for data (a stalled server fails sooner than the deadline)."""
SIZE_MARGIN = 0.10
"""How far past the published size a download may run before it is stopped: registries state sizes roughly (MB)."""
_CHUNK = 1 << 20
_USER_AGENT = "pvt-deploy"
_URL_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint (birder's registry entry)."""

    name: str
    network: str
    resolution: tuple[int, int]
    sha256: str
    file_size_mb: float  # as birder's registry states it (approximate, MB)
    base_url: str
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    @property
    def max_bytes(self) -> int:
        """The most bytes a download of this file may bring: the published size (read as MiB, the larger reading)
        plus ``SIZE_MARGIN``. An endless or oversized answer stops here, well within twice the published size."""
        return int(self.file_size_mb * (1 << 20) * (1 + SIZE_MARGIN))


_DESCRIPTION = "PVT v2 B2 model pretrained using MMCR, then fine-tuned on the il-all dataset (550 bird species)"

PUBLISHED: dict[str, PublishedWeights] = {
    weights.name: weights
    for weights in (
        PublishedWeights(
            name="pvt_v2_b2_mmcr-il-all",
            network="pvt_v2_b2",
            resolution=(384, 384),
            sha256="c0ffa0feb298e40c4335347ff648fe952fb0310e4c931d79be96a6af6bcbf1eb",
            file_size_mb=96.0,
            base_url=BIRDER_HUB_URL,
            description=_DESCRIPTION,
        ),
        PublishedWeights(
            name="pvt_v2_b2_mmcr-il-all256px",
            network="pvt_v2_b2",
            resolution=(256, 256),
            sha256="1b160a37d6fdd172ba21842de2d32cf2cc9524db155218a6949be81b88a70fe4",
            file_size_mb=96.0,
            base_url=BIRDER_HUB_URL,
            description=_DESCRIPTION + ", at 256 px",
        ),
    )
}


def published(name: str) -> PublishedWeights:
    try:
        return PUBLISHED[name]
    except KeyError:
        known = ", ".join(sorted(PUBLISHED))
        raise DownloadError(f"unknown published model {name!r}; known: {known}") from None


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder (argument, then ``$PVT_DEPLOY_CACHE``, then ``~/.cache/pvt-deploy``); not created here."""
    chosen = override if override is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


_resolve_cache_dir = cache_dir  # ``download``/``resolve_source`` take a ``cache_dir`` argument that shadows it


def url_for(name: str, base_url: str | None = None) -> str:
    weights = published(name)
    base = base_url or os.environ.get(BASE_URL_ENV) or weights.base_url
    _check_base_url(base)
    return f"{base.rstrip('/')}/{weights.filename}"


def _check_base_url(base: str) -> None:
    """One ``DownloadError`` line for a base URL urllib would reject with a ValueError or InvalidURL traceback."""
    expected = "expected http://host/path, https://host/path or file:///path"
    try:
        parts = urllib.parse.urlsplit(base)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise DownloadError(f"base URL {base!r} is malformed ({exc}); {expected}") from None
    if parts.scheme not in _URL_SCHEMES or (parts.scheme != "file" and not parts.hostname):
        raise DownloadError(f"base URL {base!r} is malformed; {expected}")


def cached_path(name: str, cache_dir_override: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache_dir_override) / published(name).filename


class _Progress:
    """A one-line progress display on stderr; silent when disabled or when stderr is not a terminal."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        mb = done / 1e6
        if self.total:
            line = f"{self.label}: {mb:.1f}/{self.total / 1e6:.1f} MB ({100 * done / self.total:.0f}%)"
        else:
            line = f"{self.label}: {mb:.1f} MB"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def close(self, done: int) -> None:
        if self.live:
            self.update(done, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Deadline:
    """The overall ``--timeout``: how long is left, and how long the next socket wait may be."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def passed(self) -> bool:
        return self.remaining() <= 0

    def socket_timeout(self) -> float:
        return max(0.01, min(READ_TIMEOUT, self.remaining()))


class _DeadlinePassed(Exception):
    pass


class _TooLarge(Exception):
    pass


class _Watchdog:
    """Holds the overall deadline over everything a socket does: connect, the status line, every header line and the
    body. urllib's timeout is per socket operation, so a server that sends one header line a second would never
    trip it; at the deadline the watchdog shuts the sockets down, and whatever read was waiting returns at once."""

    def __init__(self, deadline: _Deadline) -> None:
        self.deadline = deadline
        self.fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        if deadline.end is not None:
            self._timer = threading.Timer(max(0.0, deadline.remaining()), self._fire)
            self._timer.daemon = True
            self._timer.start()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.fired:
                _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _Watched:
    """A connection whose socket the watchdog shuts at the deadline, whatever phase the exchange is in."""

    def __init__(self, *args: object, watchdog: _Watchdog, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.watchdog = watchdog

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.watchdog.track(self.sock)  # type: ignore[attr-defined]


class _WatchedHTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_WatchedHTTPConnection, watchdog=self.watchdog), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_WatchedHTTPSConnection, watchdog=self.watchdog)
        return self.do_open(connection, req, context=self._context)  # type: ignore[attr-defined]


def _set_read_timeout(response: object, seconds: float) -> None:
    """Shorten the socket timeout to what is left of the deadline (best effort: urllib hides the socket)."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _stream(
    response: IO[bytes],
    handle: IO[bytes],
    total: int | None,
    progress: _Progress,
    deadline: _Deadline,
    max_bytes: int | None,
) -> tuple[int, str]:
    digest = hashlib.sha256()
    done = 0
    # read1 returns whatever one socket read gave, so a trickle of bytes cannot hold a 1 MiB read open forever
    read = getattr(response, "read1", response.read)
    while True:
        if deadline.passed():
            raise _DeadlinePassed(done)
        _set_read_timeout(response, deadline.socket_timeout())
        try:
            chunk = read(_CHUNK)
        except TimeoutError:
            if deadline.passed():
                raise _DeadlinePassed(done) from None
            raise
        if not chunk:
            if deadline.passed():  # the watchdog shut the socket: not the end of the file
                raise _DeadlinePassed(done)
            break
        if max_bytes is not None and done + len(chunk) > max_bytes:
            raise _TooLarge(done + len(chunk))
        handle.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        progress.update(done)
    progress.close(done)
    return done, digest.hexdigest()


def _fetch(
    url: str, handle: IO[bytes], label: str, progress: bool, deadline: _Deadline, max_bytes: int | None = None
) -> tuple[int | None, int, str]:
    """Stream ``url`` into ``handle``; returns (Content-Length or None, bytes received, sha256 hex).

    ``deadline`` covers the whole exchange (a watchdog shuts the socket when it passes); more than ``max_bytes``,
    announced by Content-Length or received, stops the download."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    except ValueError as exc:
        raise DownloadError(f"{url}: not a URL that can be downloaded ({exc})") from None
    watchdog = _Watchdog(deadline)
    opener = urllib.request.build_opener(_WatchedHTTPHandler(watchdog), _WatchedHTTPSHandler(watchdog))
    too_large = f"larger than the published size allows ({max_bytes} bytes)"
    try:
        with opener.open(request, timeout=deadline.socket_timeout()) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if max_bytes is not None and total is not None and total > max_bytes:
                raise DownloadError(f"{url}: the server announces {total} bytes, {too_large}; nothing was kept")
            done, digest = _stream(response, handle, total, _Progress(label, total, progress), deadline, max_bytes)
    except _DeadlinePassed as exc:
        raise DownloadError(
            f"{url}: not finished within the {deadline.seconds:g} s timeout ({exc.args[0]} bytes received); "
            "raise --timeout for a slow connection"
        ) from None
    except _TooLarge as exc:
        raise DownloadError(f"{url}: stopped at {exc.args[0]} bytes, {too_large}; nothing was kept") from None
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise DownloadError(f"{url}: too many redirects (HTTP {exc.code}: a redirect loop)") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {_first_line(exc.reason)}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if deadline.passed() or watchdog.fired:
            raise DownloadError(f"{url}: no complete answer within the {deadline.seconds:g} s timeout") from None
        if isinstance(exc, urllib.error.URLError):
            raise DownloadError(f"{url}: cannot connect ({_first_line(exc.reason)})") from None
        if isinstance(exc, TimeoutError):
            raise DownloadError(f"{url}: download stalled (no data for {READ_TIMEOUT:g} s)") from None
        raise DownloadError(f"{url}: download interrupted ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        watchdog.cancel()
    return total, done, digest


def _first_line(reason: object) -> str:
    lines = str(reason).strip().splitlines()
    return lines[0] if lines else ""


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Path:
    """Fetch a published checkpoint into the cache and return its path; reuse a cached copy whose sha256 matches.

    The file is streamed into ``.<name>.pt.part-<pid>-<starttime>`` in the cache folder, fsynced, checked against
    the published sha256 and only then renamed into place, so an interrupted or corrupted download never leaves a
    file under the final name; such part files of runs that no longer exist are removed by the next download.
    ``timeout`` bounds the whole exchange in seconds, headers included (None: no limit; any single read still gives
    up after ``READ_TIMEOUT``). The size is bounded too: a Content-Length or a body beyond the published size plus
    ``SIZE_MARGIN`` stops the download. Failures raise ``DownloadError`` with one line (a checksum mismatch says
    expected vs got)."""
    if timeout is not None and not timeout > 0:
        raise DownloadError(f"--timeout must be a positive number of seconds, got {timeout}")
    deadline = _Deadline(timeout)
    weights = published(name)
    folder = _resolve_cache_dir(cache_dir)
    final = folder / weights.filename
    if final.is_file():
        if sha256_file(final) == weights.sha256:
            return final
        if progress:
            sys.stderr.write(f"{final}: cached file fails its sha256 check; downloading it again\n")
    url = url_for(name, base_url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create cache folder {folder} ({exc.strerror or exc})") from None
    removed = clean_stale_staging(folder, weights.filename)
    if removed and progress:
        sys.stderr.write(f"{folder}: {describe_removed(removed)}\n")
    if progress:
        sys.stderr.write(f"Downloading {url} -> {final}\n")

    def fetch_checked(handle: IO[bytes]) -> None:
        total, done, digest = _fetch(url, handle, name, progress, deadline, weights.max_bytes)
        if total is not None and done != total:
            raise DownloadError(f"{url}: download interrupted: got {done} of {total} bytes")
        if digest != weights.sha256:
            raise DownloadError(
                f"{url}: sha256 mismatch: expected {weights.sha256}, got {digest}; the downloaded file was deleted"
            )

    try:
        atomic_write(final, fetch_checked, staging=staging_path(final, "part"))
    except OSError as exc:  # e.g. the part file was removed meanwhile by a run that could not see this pid
        raise DownloadError(f"{url}: cannot write the download into place ({exc.strerror or exc})") from None
    return final


def resolve_source(
    source: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """A checkpoint path, or a published name (downloaded into the cache if needed) -> local file path."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file or a published name")
    if str(source) in PUBLISHED:
        return download(str(source), cache_dir=cache_dir, base_url=base_url, progress=progress)
    known = ", ".join(sorted(PUBLISHED))
    raise CheckpointError(f"{source}: no such file, and not a published model name (known: {known})")


__all__ = [
    "BASE_URL_ENV",
    "CACHE_ENV",
    "DEFAULT_TIMEOUT",
    "PUBLISHED",
    "PublishedWeights",
    "cache_dir",
    "cached_path",
    "download",
    "published",
    "resolve_source",
    "url_for",
]
