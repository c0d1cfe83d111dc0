"""uvicorn's HTTP protocol (httptools) with the deadlines it lacks, and an access log without query strings.

uvicorn times out only idle keep-alive connections: a connection that opens and never finishes its headers is held
forever, and 400 of them (slowloris) filled the connection cap, so even ``/v2/health/live`` answered 503. Here:

* headers must be complete ``header_timeout_s`` after the connection opens (or after its previous answer) and
  within ``MAX_HEADER_BYTES``; else the connection is closed;
* the body must be complete ``body_timeout_s`` after the headers; else the connection is closed (the handler sees
  the client gone);
* ``/v2/health/*`` is answered even when uvicorn's ``limit_concurrency`` is reached, so probes see a live server
  that is busy, not a dead one.

A reverse proxy in front should still buffer requests and bound connections per client (docs/serve.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024
"""The request line and headers together; more is refused (431) and the connection closed."""

PROBE_PREFIX = b"/v2/health/"


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` + header and body deadlines; the timeouts come from ``configure``."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 120.0

    @classmethod
    def configure(cls, header_timeout_s: float, body_timeout_s: float) -> type[DeadlineHttpToolsProtocol]:
        """A subclass with these timeouts (uvicorn takes a protocol class and builds one per connection)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = True
        """Bytes read now belong to a request's headers: from the connection's start and after each request's
        last body byte, until its headers are complete."""

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
            if self._deadline is None:  # a new request on a kept-alive connection
                self._arm(self.header_timeout_s)
        super().data_received(data)
        # counted per read, so a read holding headers and body is judged by whether its headers completed
        if self._in_headers and self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._refuse_headers()

    def _refuse_headers(self) -> None:
        message = b"request headers too large"
        self._disarm()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\nconnection: close\r\n"
            b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message
        )
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._arm(self.body_timeout_s)
        try:
            probe = httptools.parse_url(self.url).path.startswith(PROBE_PREFIX)
        except httptools.HttpParserInvalidURLError:
            probe = False
        if not probe:
            super().on_headers_complete()
            return
        limit, self.limit_concurrency = self.limit_concurrency, None
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = limit

    def on_message_complete(self) -> None:
        self._disarm()  # uvicorn's keep-alive timer covers the idle time; ours starts with the next request's bytes
        self._in_headers = True
        self._header_bytes = 0
        super().on_message_complete()


class QueryStringFilter(logging.Filter):
    """Drops query strings from uvicorn's access log lines: a key or token sent as ``?api_key=`` must not be
    written to logs (this server reads keys only from ``Authorization``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def install_access_log_filter() -> None:
    logging.getLogger("uvicorn.access").addFilter(QueryStringFilter())
