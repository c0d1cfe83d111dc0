"""``Service``: what the routes share (the runtime, the backend, admission control, the decode pool and its memory
budget, metrics), reached from a route through ``Depends(service_of)`` on ``app.state``.

Images arrive as multipart file fields (any field name, one or many) or as a raw image body; the server never
fetches a URL. Every image is decoded off the event loop within the decoded-memory budget, then the rows go
through the ``InferenceBackend`` (local dynamic batching, or a Ray Serve replica's ``@serve.batch``)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pvt_deploy import __version__
from pvt_deploy.decode_budget import DecodeBudget
from pvt_deploy.errors import ImageError
from pvt_deploy.runtime import Runtime
from pvt_deploy.serve.batching import InferenceBackend, Outputs
from pvt_deploy.serve.instances import batcher_for
from pvt_deploy.serve.metrics import ServeMetrics
from pvt_deploy.serve.problems import HTTPProblem, busy
from pvt_deploy.serve.settings import ServeSettings

UNTRAINED_HEADER = "Pvt-Untrained"
"""``true`` on every model answer from a folder exported with random weights (binary answers have no JSON field)."""

_ITEM_PREFIX = re.compile(r"^image \d+(?: \([^)]*\))?: ")
_SOURCE_PREFIX = re.compile(r"^<\d+ bytes>: ")


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class Decoded:
    """A request's images after decoding: the good rows, and an error per bad item (``index``, ``item``, ``reason``)."""

    uploads: list[Upload]
    rows: np.ndarray
    good: list[int]
    errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Answer:
    """The model's outputs for a request's good rows (``good[i]`` is the upload index of output row ``i``)."""

    uploads: list[Upload]
    outputs: Outputs
    good: list[int]
    errors: list[dict[str, Any]]

    def rows_by_upload(self) -> dict[int, int]:
        return {upload: row for row, upload in enumerate(self.good)}


def item_reason(error: ImageError) -> str:
    """``Runtime``'s message without its "image 0 (<123 bytes>): " prefixes: the answer names the item itself."""
    return _SOURCE_PREFIX.sub("", _ITEM_PREFIX.sub("", str(error)))


class Service:
    """State shared by the routes (and by any other front end of the same process, such as a gRPC server)."""

    def __init__(self, runtime: Runtime, settings: ServeSettings, backend: InferenceBackend | None) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = ServeMetrics()
        self.admitted = 0
        self.reading_bodies = 0
        self.batcher = (
            batcher_for(  # --instances: several batches in the model at once (instances.py)
                runtime,
                settings.instances,
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
        self.decode_budget = DecodeBudget(settings.max_decode_bytes)
        self.model_name = str(runtime.manifest.model_name or runtime.model_dir.name)
        self.labels = runtime.labels
        self.untrained = bool(runtime.manifest.random_weights)
        self.preprocessing = dict(runtime.metadata["preprocess"])
        height, width = self.preprocessing["size"]
        self.size = (int(height), int(width))

    @property
    def api_key(self) -> str | None:
        """The bearer token every model route requires (``None``: open)."""
        return self.settings.api_key

    @property
    def untrained_headers(self) -> dict[str, str]:
        return {UNTRAINED_HEADER: "true" if self.untrained else "false"}

    # ----- admission ---------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, count: int) -> AsyncIterator[None]:
        """Hold ``count`` places of the bounded queue until the answer is ready; refuse with 503 when it is full."""
        limit = self.settings.max_queue
        if count > limit:
            raise HTTPProblem(413, {"detail": f"{count} images in one request; this server takes at most {limit}"})
        if self.admitted + count > limit:
            raise busy(f"server busy: {self.admitted} images queued (--max-queue {limit}); retry shortly")
        self.admitted += count
        self.metrics.queue_depth.set(self.admitted)
        try:
            yield
        finally:
            self.admitted -= count
            self.metrics.queue_depth.set(self.admitted)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """At most ``--max-queue`` requests read their bodies at once (503 beyond): admission counts images, which
        are known only once a body is read, so without this the bodies in memory were bounded only by uvicorn's
        connection cap x ``--max-body-mb``."""
        limit = self.settings.max_queue
        if self.reading_bodies >= limit:
            raise busy(f"server busy: {self.reading_bodies} requests uploading (--max-queue {limit}); retry shortly")
        self.reading_bodies += 1
        try:
            yield
        finally:
            self.reading_bodies -= 1

    # ----- inputs ------------------------------------------------------------------------------------------------

    async def uploads(self, request: Request) -> list[Upload]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            limit = self.settings.max_queue
            try:
                form = await request.form(max_files=limit, max_fields=limit + 16)
            except StarletteHTTPException as exc:
                if "Too many files" in str(exc.detail):
                    raise HTTPProblem(
                        413, {"detail": f"more than {limit} images in one request; this server takes at most {limit}"}
                    ) from None
                raise
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

    def _decode_one(self, data: bytes) -> np.ndarray:
        """One image -> its (3, H, W) row, holding its estimated decoded bytes of the budget while it decodes."""
        with self.decode_budget.decoding(data, timeout=self.settings.decode_wait_s):
            return self.runtime.preprocess([data])[0]

    def decode(self, uploads: list[Upload]) -> Decoded:
        """Every upload in order; a bad image is an error entry naming it (``DecodeBusy`` propagates: 503)."""
        rows: list[np.ndarray] = []
        good: list[int] = []
        errors: list[dict[str, Any]] = []
        for index, upload in enumerate(uploads):
            try:
                rows.append(self._decode_one(upload.data))
                good.append(index)
            except ImageError as exc:
                errors.append({"index": index, "item": upload.name, "reason": item_reason(exc)})
        stacked = np.stack(rows) if rows else np.empty((0, 3, *self.size), dtype=np.float32)
        return Decoded(uploads, stacked, good, errors)

    async def infer(self, request: Request, operation: str, *, collect: bool = False) -> Answer:
        """Read, decode and run a request's images. Bad images: 422 naming each, or (``collect``) error entries
        in the answer while the good ones are answered."""
        async with self.reading():
            uploads = await self.uploads(request)
        async with self.admit(len(uploads)):
            loop = asyncio.get_running_loop()
            decoded = await loop.run_in_executor(self.decoder, self.decode, uploads)
            if decoded.errors and not collect:
                count = len(decoded.errors)
                raise HTTPProblem(
                    422,
                    {"detail": f"{count} of {len(uploads)} images could not be used", "errors": decoded.errors},
                    self.untrained_headers,
                )
            outputs = await self.backend.run(operation, decoded.rows) if decoded.good else {}
        self.metrics.images.labels(operation).inc(len(decoded.good))
        return Answer(uploads, outputs, decoded.good, decoded.errors)

    async def infer_tensor(self, rows: np.ndarray) -> Outputs:
        """Preprocessed (N, 3, H, W) rows -> classify outputs (the v2 protocol's path), within the same queue."""
        async with self.admit(len(rows)):
            outputs = await self.backend.run("classify", rows)
        self.metrics.images.labels("v2").inc(len(rows))
        return outputs

    # ----- description -------------------------------------------------------------------------------------------

    def output_dims(self, name: str) -> list[int]:
        """A classify output's shape from the manifest, dynamic dims as -1 (the v2 protocol's notation)."""
        return [dim if isinstance(dim, int) else -1 for dim in self.runtime.output_shape("classify", name)]

    def describe(self) -> dict[str, Any]:
        """GET /v1/model: ``Runtime.describe()``'s facts under this API's names, plus what only the server knows."""
        session = self.runtime.session("classify")  # loaded first, so "device" is where it runs
        runtime = self.runtime.describe()
        return {
            "name": self.model_name,
            "network": runtime["network"],
            "num_classes": len(self.labels),
            "labels": self.labels,
            "input": {
                "size": list(self.size),
                "layout": "NCHW",
                "dtype": "float32",
                "rgb_stats": self.preprocessing["rgb_stats"],
                "center_crop": self.preprocessing["center_crop"],
            },
            "preprocess": runtime["preprocess"],
            "precision": runtime["precision"],
            "precisions": self.runtime.precisions,
            "device": runtime["device"],
            "untrained": self.untrained,
            "runtime": {
                "config": runtime["config"],
                "batch_size": runtime["batch_size"],
                "session_providers": list(session.providers),
            },
            "checksums": {name: record.sha256 for name, record in self.runtime.manifest.files.items()},
            "batching": {"max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms},
            "limits": {
                "max_body_mb": self.settings.max_body_mb,
                "max_queue": self.settings.max_queue,
                "max_decode_mb": self.settings.max_decode_mb,
                "header_timeout_s": self.settings.header_timeout_s,
                "body_timeout_s": self.settings.body_timeout_s,
            },
            "pvt_deploy_version": __version__,
        }

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self.decoder.shutdown(wait=False)


def service_of(request: Request) -> Service:
    """The app's ``Service`` (``app.state.service``), for ``Depends``."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]
