"""The one place errors become HTTP answers: routes and the service raise, the handlers installed here answer.

/v1 and the rest answer ``{"detail": ...}`` (FastAPI's shape); everything under /v2 answers ``{"error": ...}``, the
Open Inference Protocol's shape that tritonclient and KServe clients decode, unknown /v2 routes included."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pvt_deploy.decode_budget import DecodeBusy
from pvt_deploy.serve.limits import BodyTooLarge

RETRY_AFTER_S = 1
V2_PREFIX = "/v2"


class HTTPProblem(Exception):
    """An error answer with a JSON body (and optional headers) that any route or the service can raise."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("detail", body.get("error", "")))
        self.status = status
        self.body = body
        self.headers = headers or {}


class ProtocolError(HTTPProblem):
    """A v2 request the protocol refuses: 400 (or ``status``) with the protocol's ``{"error": ...}`` body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status, {"error": message})


def busy(detail: str) -> HTTPProblem:
    """503 + Retry-After: the server is at a limit now, the same request may pass in a moment."""
    return HTTPProblem(503, {"detail": detail}, {"Retry-After": str(RETRY_AFTER_S)})


def _body(request: Request, message: str) -> dict[str, Any]:
    return {"error": message} if request.url.path.startswith(V2_PREFIX) else {"detail": message}


async def _problem(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPProblem)
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


async def _body_too_large(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_body(request, str(exc)), status_code=413)


async def _decode_busy(request: Request, exc: Exception) -> JSONResponse:
    message = f"server busy: {exc}; retry shortly"
    return JSONResponse(_body(request, message), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    return JSONResponse(_body(request, str(exc.detail)), status_code=exc.status_code, headers=headers)


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if request.url.path.startswith(V2_PREFIX):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)
    return await request_validation_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPProblem, _problem)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(DecodeBusy, _decode_busy)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation)
