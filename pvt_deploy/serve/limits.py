"""Request limits enforced before any handler runs: the body-size cap (413) and the bearer token (401)."""

from __future__ import annotations

import json
import secrets
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]

OPEN_PATHS = ("/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/metrics", "/v2", "/favicon.ico")
OPEN_PREFIXES = ("/v2/health/", "/docs/assets/")
"""Reachable without the API key: the page (it asks for the key), the docs, Prometheus, and the health probes."""


def bearer_matches(authorization: bytes, api_key: bytes) -> bool:
    """Whether an ``Authorization`` value (HTTP header or gRPC metadata) is ``Bearer <api_key>``. Bytes, not str:
    compare_digest refuses non-ASCII str (a 500), and any byte sequence is a token."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), api_key)


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the cap; the app answers it with 413."""


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                        *headers],
        }
    )  # fmt: skip
    await send({"type": "http.response.body", "body": payload})


class LimitsMiddleware:
    """Pure ASGI, so a huge body is refused from its Content-Length (or while streaming) without being buffered."""

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = None if api_key is None else api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and not self._is_open(scope["path"]) and not self._authorized(scope):
            await _send_json(
                send, 401, {"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                [(b"www-authenticate", b"Bearer")],
            )  # fmt: skip
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_json(send, 413, {"detail": f"request body over the {limit} byte limit (--max-body-mb)"})
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body over the {limit} byte limit (--max-body-mb)")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"detail": f"request body over the {limit} byte limit (--max-body-mb)"})

    @staticmethod
    def _is_open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return bearer_matches(value, self.api_key)
        return False
