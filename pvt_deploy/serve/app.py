"""The ASGI app, wired: the ``Service`` on ``app.state``, one router per module (/v1, /v2, the page and docs,
/metrics), the error handlers (``problems``), and the pure-ASGI limits and metrics around it all.

The routes live in ``v1``, ``v2``, ``page`` and ``metrics``; what they share lives in ``service``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from pvt_deploy import __version__
from pvt_deploy.runtime import Runtime
from pvt_deploy.serve import metrics, page, v1, v2
from pvt_deploy.serve.batching import InferenceBackend
from pvt_deploy.serve.limits import LimitsMiddleware
from pvt_deploy.serve.problems import HTTPProblem, install_error_handlers
from pvt_deploy.serve.service import Service, Upload
from pvt_deploy.serve.settings import ServeSettings

__all__ = ["HTTPProblem", "Service", "Upload", "create_app"]


def create_app(runtime: Runtime, settings: ServeSettings, backend: InferenceBackend | None = None) -> Any:
    """The ASGI app. ``backend=None``: this process batches requests itself (uvicorn); Ray passes its replica."""
    service = Service(runtime, settings, backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        grpc_server = None
        if settings.grpc_address is not None:
            from pvt_deploy.serve.grpc_service import start_grpc_server  # grpcio only when asked for

            grpc_server = await start_grpc_server(service)
        yield
        if grpc_server is not None:
            await grpc_server.stop()  # drains in-flight gRPC calls before the batcher closes
        await service.close()  # uvicorn calls this after SIGTERM, once in-flight requests have drained

    app = FastAPI(
        title="pvt-deploy",
        version=__version__,
        summary=f"{service.model_name}: top-k species, probabilities, embeddings and feature maps",
        lifespan=lifespan,
        docs_url=None,  # served by ``page`` from local assets
        redoc_url=None,  # ReDoc loads from a CDN; /docs covers the same
    )
    app.state.service = service
    install_error_handlers(app)
    for module in (page, v1, v2, metrics):
        app.include_router(module.router)
    with_limits = LimitsMiddleware(app, settings.max_body_bytes, settings.api_key)
    return metrics.MetricsMiddleware(with_limits, service.metrics, routes=lambda: app.router.routes)
