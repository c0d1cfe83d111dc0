"""The /v1 JSON endpoints: top-k labels, probabilities, embeddings, feature maps, and the model's description.

Every answer says whether the weights are untrained: ``"untrained"`` in JSON, the ``Pvt-Untrained`` header on
every answer (the only place a ``.npy`` / ``.npz`` body can say it). ``?on_error=collect``: a bad image becomes an
``{"image", "index", "error"}`` entry in its place and the others are answered (200); by default the request gets
422 naming every bad image."""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from pvt_deploy.runtime.operations import top_k_indices
from pvt_deploy.serve.service import Answer, Service, ServiceDep

NPY_MEDIA_TYPE = "application/x-npy"
NPZ_MEDIA_TYPE = "application/x-npz"
FAILED_ITEMS_HEADER = "Pvt-Failed-Items"
"""With ``on_error=collect`` on a binary answer: the indexes of the failed images, whose rows are NaN."""

OnError = Literal["raise", "collect"]
ON_ERROR = Query("raise", description="'collect': answer the good images and put an error entry in place of a bad one")

router = APIRouter(prefix="/v1", tags=["v1"])


def _json(service: Service, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(
        {"model": service.model_name, "untrained": service.untrained, **body}, headers=service.untrained_headers
    )


def _results(answer: Answer, render: Any) -> list[dict[str, Any]]:
    """One entry per upload, in order: ``render(upload, row)`` for a good one, the error entry for a bad one."""
    rows = answer.rows_by_upload()
    errors = {error["index"]: error for error in answer.errors}
    results = []
    for index, upload in enumerate(answer.uploads):
        if index in rows:
            results.append({"image": upload.name, **render(rows[index])})
        else:
            results.append({"image": upload.name, "index": index, "error": errors[index]["reason"]})
    return results


def _scattered(answer: Answer, value: np.ndarray) -> np.ndarray:
    """Output rows in upload order, NaN where an image failed (the ``Runtime`` ``on_error="collect"`` rule)."""
    if not answer.errors:
        return value
    shape = (len(answer.uploads), *value.shape[1:]) if len(value) else (len(answer.uploads),)
    full = np.full(shape, np.nan, dtype=np.float32)
    if answer.good:
        full[answer.good] = value
    return full


def _binary(service: Service, answer: Answer, content: bytes, media_type: str, **headers: str) -> Response:
    headers = {**service.untrained_headers, **headers}
    if answer.errors:
        headers[FAILED_ITEMS_HEADER] = ",".join(str(error["index"]) for error in answer.errors)
    return Response(content, media_type=media_type, headers=headers)


@router.post("/predict")
async def predict(
    request: Request, service: ServiceDep, top_k: int = Query(5, ge=1, le=1000), on_error: OnError = ON_ERROR
) -> JSONResponse:
    """Top-k labels per image, most likely first."""
    answer = await service.infer(request, "classify", collect=on_error == "collect")
    probabilities = answer.outputs.get("probabilities", np.empty((0, len(service.labels)), np.float32))
    ranked = top_k_indices(probabilities, top_k)

    def render(row: int) -> dict[str, Any]:
        return {
            "predictions": [
                {"label": service.labels[i], "index": int(i), "probability": float(probabilities[row][i])}
                for i in ranked[row]
            ]
        }

    return _json(service, {"results": _results(answer, render)})


@router.post("/classify")
async def classify(
    request: Request, service: ServiceDep, embedding: bool = Query(False), on_error: OnError = ON_ERROR
) -> JSONResponse:
    """Softmax probabilities in label order (labels: GET /v1/model), optionally the embedding too."""
    answer = await service.infer(request, "classify", collect=on_error == "collect")

    def render(row: int) -> dict[str, Any]:
        result: dict[str, Any] = {"probabilities": answer.outputs["probabilities"][row].tolist()}
        if embedding:
            result["embedding"] = answer.outputs["embedding"][row].tolist()
        return result

    return _json(service, {"results": _results(answer, render)})


@router.post("/embed", responses={200: {"content": {NPY_MEDIA_TYPE: {}}}})
async def embed(request: Request, service: ServiceDep, on_error: OnError = ON_ERROR) -> Response:
    """(N, D) float32 embeddings: JSON lists, or ``.npy`` bytes with ``Accept: application/x-npy`` (with
    ``on_error=collect``, failed rows NaN and their indexes in the ``Pvt-Failed-Items`` header)."""
    answer = await service.infer(request, "embed", collect=on_error == "collect")
    dim = int(service.output_dims("embedding")[-1])
    embeddings = answer.outputs.get("embedding", np.empty((0, dim), np.float32))
    if NPY_MEDIA_TYPE in request.headers.get("accept", ""):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(_scattered(answer, embeddings), dtype=np.float32))
        return _binary(service, answer, buffer.getvalue(), NPY_MEDIA_TYPE)
    results = _results(answer, lambda row: {"embedding": embeddings[row].tolist()})
    return _json(service, {"dim": dim, "results": results})


@router.post("/features", responses={200: {"content": {NPZ_MEDIA_TYPE: {}}}})
async def features(
    request: Request,
    service: ServiceDep,
    format: str = Query("npz", pattern="^(npz|heatmap)$"),
    on_error: OnError = ON_ERROR,
) -> Response:
    """stage1..stage4 NCHW float32 maps as an ``.npz`` body; ``format=heatmap``: per-stage 0..1 maps as JSON."""
    answer = await service.infer(request, "features", collect=on_error == "collect")
    outputs = answer.outputs
    if format == "heatmap":
        results = _results(
            answer, lambda row: {"stages": {name: _heatmap(value[row]) for name, value in sorted(outputs.items())}}
        )
        return _json(service, {"results": results})
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.ascontiguousarray(_scattered(answer, value)) for name, value in outputs.items()})
    return _binary(
        service,
        answer,
        buffer.getvalue(),
        NPZ_MEDIA_TYPE,
        **{"Content-Disposition": 'attachment; filename="features.npz"'},
    )


@router.get("/model")
async def model(service: ServiceDep) -> JSONResponse:
    """Labels, the preprocessing contract, precisions, file checksums, limits, and whether the weights are
    untrained."""
    return JSONResponse(service.describe(), headers=service.untrained_headers)


def _heatmap(stage: np.ndarray) -> list[list[float]]:
    """(C, H, W) -> (H, W) channel L2 norm scaled to 0..1: where the stage responds, for the page."""
    energy = np.sqrt(np.square(stage.astype(np.float64)).sum(axis=0))
    low, high = float(energy.min()), float(energy.max())
    scaled = (energy - low) / (high - low) if high > low else np.zeros_like(energy)
    return np.round(scaled, 3).tolist()
