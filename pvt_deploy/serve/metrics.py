"""Prometheus metrics (prometheus-client), one registry per app so several apps in one process never collide."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests by route and status, latency by route, batch sizes, queue depth, images answered."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pvt_requests", "HTTP requests by route template and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pvt_request_latency_seconds", "Request latency by route", ["route"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "pvt_batch_size", "Rows per model call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge(
            "pvt_queue_depth", "Images admitted and not yet answered (decode + queue + model)", registry=self.registry
        )
        self.images = Counter("pvt_images", "Images answered, by operation", ["operation"], registry=self.registry)


class MetricsMiddleware:
    """Times every HTTP request and counts it under its route template (``/v2/models/{name}/infer``): the one
    routing set, or (plain Starlette routes such as ``/openapi.json``, and requests answered before routing, such
    as a 401) the first of ``routes()`` that matches; ``unmatched`` only when no route does."""

    def __init__(self, app: Any, metrics: ServeMetrics, routes: Callable[[], Sequence[BaseRoute]] = tuple) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            template = self._template(scope)
            self.metrics.requests.labels(template, str(status)).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - started)

    def _template(self, scope: dict[str, Any]) -> str:
        path = getattr(scope.get("route"), "path", None)
        if path:
            return path
        for route in self.routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", None) or "unmatched"
        return "unmatched"


router = APIRouter(include_in_schema=False)


def registry_of(request: Request) -> CollectorRegistry:
    """The app's metrics registry (``app.state.service.metrics``), for ``Depends``."""
    return request.app.state.service.metrics.registry


@router.get("/metrics")
async def metrics(registry: Annotated[CollectorRegistry, Depends(registry_of)]) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
