"""The FastAPI app: /v1 JSON endpoints, the Open Inference Protocol (KServe v2 REST), /metrics and the web page.

Images arrive as multipart file fields (any field name, one or many) or as a raw image body; the server never
fetches a URL. Every image is decoded off the event loop, then the rows go through the ``InferenceBackend``
(local dynamic batching, or a Ray Serve replica's ``@serve.batch``)."""

from __future__ import annotations

import asyncio
import io
import os
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile

from pvt_deploy import __version__
from pvt_deploy.errors import ImageError
from pvt_deploy.runtime import Runtime
from pvt_deploy.serve.batching import DynamicBatcher, InferenceBackend, Outputs
from pvt_deploy.serve.limits import BodyTooLarge, LimitsMiddleware
from pvt_deploy.serve.metrics import MetricsMiddleware, ServeMetrics
from pvt_deploy.serve.page import render_page
from pvt_deploy.serve.settings import ServeSettings
from pvt_deploy.serve.v2 import build_v2_router

NPY_MEDIA_TYPE = "application/x-npy"
NPZ_MEDIA_TYPE = "application/x-npz"
RETRY_AFTER_S = 1
_ITEM_PREFIX = re.compile(r"^image \d+ \([^)]*\): ")
_SOURCE_PREFIX = re.compile(r"^<\d+ bytes>: ")


class HTTPProblem(Exception):
    """An error answer with a JSON body (and optional headers) that any route can raise."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("detail", ""))
        self.status = status
        self.body = body
        self.headers = headers or {}


@dataclass
class Upload:
    name: str
    data: bytes


def _reason(error: ImageError) -> str:
    """``Runtime``'s message without its "image 0 (<123 bytes>): " prefix: the HTTP answer names the item itself."""
    return _SOURCE_PREFIX.sub("", _ITEM_PREFIX.sub("", str(error)))


class Service:
    """State shared by the routes: the runtime, the backend, admission control and metrics."""

    def __init__(self, runtime: Runtime, settings: ServeSettings, backend: InferenceBackend | None) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = ServeMetrics()
        self.admitted = 0
        self.batcher = (
            DynamicBatcher(
                runtime,
                settings.max_batch,
                settings.max_wait_ms,
                on_batch=self.metrics.batch_size.observe,
                in_flight=lambda: self.admitted,
            )
            if backend is None
            else None
        )
        self.backend: InferenceBackend = backend if backend is not None else self.batcher  # type: ignore[assignment]
        self.decoder = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="pvt-decode")
        self.manifest = runtime.manifest
        self.model_name = self.manifest.model_name or runtime.model_dir.name
        self.labels = runtime.labels
        self.preprocessing = dict(runtime.metadata["preprocess"])
        height, width = self.preprocessing["size"]
        self.size = (int(height), int(width))

    # ----- admission ---------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, count: int) -> AsyncIterator[None]:
        """Hold ``count`` places of the bounded queue until the answer is ready; refuse with 503 when it is full."""
        limit = self.settings.max_queue
        if count > limit:
            raise HTTPProblem(413, {"detail": f"{count} images in one request; this server takes at most {limit}"})
        if self.admitted + count > limit:
            raise HTTPProblem(
                503,
                {"detail": f"server busy: {self.admitted} images queued (--max-queue {limit}); retry shortly"},
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.admitted += count
        self.metrics.queue_depth.set(self.admitted)
        try:
            yield
        finally:
            self.admitted -= count
            self.metrics.queue_depth.set(self.admitted)

    # ----- inputs ------------------------------------------------------------------------------------------------

    async def uploads(self, request: Request) -> list[Upload]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            limit = self.settings.max_queue
            form = await request.form(max_files=limit + 1, max_fields=limit + 16)
            files: list[Upload] = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.append(Upload(value.filename or key, await value.read()))
            await form.close()
            if not files:
                raise HTTPProblem(422, {"detail": "the multipart form has no file field; send images as files"})
            return files
        body = await request.body()
        if content_type.startswith(("application/json", "text/")):
            raise HTTPProblem(
                415, {"detail": "send images as multipart file fields or as a raw image body; URLs are not fetched"}
            )
        return [Upload("body", body)]

    def _decode_all(self, uploads: list[Upload]) -> np.ndarray:
        rows: list[np.ndarray] = []
        errors: list[dict[str, Any]] = []
        for index, upload in enumerate(uploads):
            try:
                rows.append(self.runtime.preprocess(upload.data)[0])
            except ImageError as exc:
                errors.append({"index": index, "item": upload.name, "reason": _reason(exc)})
        if errors:
            raise HTTPProblem(
                422, {"detail": f"{len(errors)} of {len(uploads)} images could not be used", "errors": errors}
            )
        return np.stack(rows)

    async def infer(self, request: Request, operation: str) -> tuple[list[Upload], Outputs]:
        uploads = await self.uploads(request)
        async with self.admit(len(uploads)):
            loop = asyncio.get_running_loop()
            rows = await loop.run_in_executor(self.decoder, self._decode_all, uploads)
            outputs = await self.backend.run(operation, rows)
        self.metrics.images.labels(operation).inc(len(uploads))
        return uploads, outputs

    async def infer_tensor(self, rows: np.ndarray) -> Outputs:
        async with self.admit(len(rows)):
            outputs = await self.backend.run("classify", rows)
        self.metrics.images.labels("v2").inc(len(rows))
        return outputs

    # ----- answers -----------------------------------------------------------------------------------------------

    def top_k(self, probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [{"label": self.labels[i], "index": int(i), "probability": float(probabilities[i])} for i in order]

    def describe(self) -> dict[str, Any]:
        manifest = self.manifest
        return {
            "name": self.model_name,
            "network": manifest.network,
            "num_classes": len(self.labels),
            "labels": self.labels,
            "input": {
                "size": list(self.size),
                "layout": "NCHW",
                "dtype": "float32",
                "rgb_stats": self.preprocessing["rgb_stats"],
                "center_crop": self.preprocessing["center_crop"],
            },
            "precision": self.runtime.precision,
            "precisions": self.runtime.precisions,
            "device": self.runtime.active_device,
            "untrained": manifest.random_weights,
            "checksums": {name: record.sha256 for name, record in manifest.files.items()},
            "batching": {"max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms},
            "limits": {"max_body_mb": self.settings.max_body_mb, "max_queue": self.settings.max_queue},
            "pvt_deploy_version": __version__,
        }

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self.decoder.shutdown(wait=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32))
    return buffer.getvalue()


def _heatmap(stage: np.ndarray) -> list[list[float]]:
    """(C, H, W) -> (H, W) channel L2 norm scaled to 0..1: where the stage responds, for the page."""
    energy = np.sqrt(np.square(stage.astype(np.float64)).sum(axis=0))
    low, high = float(energy.min()), float(energy.max())
    scaled = (energy - low) / (high - low) if high > low else np.zeros_like(energy)
    return np.round(scaled, 3).tolist()


def create_app(runtime: Runtime, settings: ServeSettings, backend: InferenceBackend | None = None) -> Any:
    """The ASGI app. ``backend=None``: this process batches requests itself (uvicorn); Ray passes its replica."""
    service = Service(runtime, settings, backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.close()  # uvicorn calls this after SIGTERM, once in-flight requests have drained

    app = FastAPI(
        title="pvt-deploy",
        version=__version__,
        summary=f"{service.model_name}: top-k species, probabilities, embeddings and feature maps",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(HTTPProblem)
    async def problem_handler(_: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large_handler(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            render_page(
                service.model_name,
                needs_key=settings.api_key is not None,
                untrained=service.manifest.random_weights,
            )
        )

    @app.post("/v1/predict", tags=["v1"])
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> dict[str, Any]:
        """Top-k labels per image, most likely first."""
        uploads, outputs = await service.infer(request, "classify")
        results = [
            {"image": upload.name, "predictions": service.top_k(row, top_k)}
            for upload, row in zip(uploads, outputs["probabilities"], strict=True)
        ]
        return {"model": service.model_name, "results": results}

    @app.post("/v1/classify", tags=["v1"])
    async def classify(request: Request, embedding: bool = Query(False)) -> dict[str, Any]:
        """Softmax probabilities in label order (labels: GET /v1/model), optionally the embedding too."""
        uploads, outputs = await service.infer(request, "classify")
        results = []
        for index, upload in enumerate(uploads):
            result: dict[str, Any] = {"image": upload.name, "probabilities": outputs["probabilities"][index].tolist()}
            if embedding:
                result["embedding"] = outputs["embedding"][index].tolist()
            results.append(result)
        return {"model": service.model_name, "results": results}

    @app.post("/v1/embed", tags=["v1"], responses={200: {"content": {NPY_MEDIA_TYPE: {}}}})
    async def embed(request: Request) -> Any:
        """(N, D) float32 embeddings: JSON lists, or ``.npy`` bytes with ``Accept: application/x-npy``."""
        uploads, outputs = await service.infer(request, "embed")
        embeddings = outputs["embedding"]
        if NPY_MEDIA_TYPE in request.headers.get("accept", ""):
            return Response(_npy_bytes(embeddings), media_type=NPY_MEDIA_TYPE)
        results = [{"image": u.name, "embedding": row.tolist()} for u, row in zip(uploads, embeddings, strict=True)]
        return {"model": service.model_name, "dim": int(embeddings.shape[1]), "results": results}

    @app.post("/v1/features", tags=["v1"], responses={200: {"content": {NPZ_MEDIA_TYPE: {}}}})
    async def features(request: Request, format: str = Query("npz", pattern="^(npz|heatmap)$")) -> Any:
        """stage1..stage4 NCHW float32 maps as an ``.npz`` body; ``format=heatmap``: per-stage 0..1 maps as JSON."""
        uploads, outputs = await service.infer(request, "features")
        if format == "heatmap":
            results = [
                {"image": u.name, "stages": {name: _heatmap(value[i]) for name, value in sorted(outputs.items())}}
                for i, u in enumerate(uploads)
            ]
            return {"model": service.model_name, "results": results}
        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.ascontiguousarray(value) for name, value in outputs.items()})
        return Response(
            buffer.getvalue(),
            media_type=NPZ_MEDIA_TYPE,
            headers={"Content-Disposition": 'attachment; filename="features.npz"'},
        )

    @app.get("/v1/model", tags=["v1"])
    async def model() -> dict[str, Any]:
        """Labels, input size, precisions, file checksums, and whether the weights are untrained."""
        return service.describe()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(build_v2_router(service))
    with_limits = LimitsMiddleware(app, settings.max_body_bytes, settings.api_key)
    return MetricsMiddleware(with_limits, service.metrics)
