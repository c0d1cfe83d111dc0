"""The Open Inference Protocol (KServe v2 REST, also spoken by Triton), with its binary tensor extension, so
``tritonclient.http`` and KServe clients call this server unchanged.

The model takes the preprocessed tensor ``input`` (FP32, [N, 3, H, W]: GET /v1/model gives the preprocessing) and
answers ``probabilities`` [N, classes] and ``embedding`` [N, D], through the same dynamic batcher as /v1."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pvt_deploy import __version__

if TYPE_CHECKING:
    from pvt_deploy.serve.app import Service

HEADER_LENGTH = "inference-header-content-length"
MODEL_VERSION = "1"
OUTPUTS = ("probabilities", "embedding")


class ProtocolError(Exception):
    """A malformed v2 request: answered 400 with the protocol's ``{"error": ...}`` body."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _parse(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    try:
        if header_length is None:
            return json.loads(body), b""
        length = int(header_length)
        if not 0 <= length <= len(body):
            raise ValueError
        return json.loads(body[:length]), body[length:]
    except ValueError:
        raise ProtocolError("the request is not valid JSON (or Inference-Header-Content-Length is wrong)") from None


def _input_tensor(request: dict[str, Any], binary: bytes, size: tuple[int, int]) -> np.ndarray:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError("expected exactly one input tensor named 'input'")
    tensor = inputs[0]
    if tensor.get("name") != "input":
        raise ProtocolError(f"unknown input {tensor.get('name')!r}; this model takes 'input'")
    if tensor.get("datatype") != "FP32":
        raise ProtocolError(f"input datatype must be FP32, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    expected = [3, *size]
    if not (isinstance(shape, list) and len(shape) == 4 and list(shape[1:]) == expected and int(shape[0]) >= 1):
        raise ProtocolError(f"input shape must be [N, {', '.join(map(str, expected))}], got {shape}")
    count = int(np.prod(shape))
    binary_size = (tensor.get("parameters") or {}).get("binary_data_size")
    try:
        if binary_size is not None:
            if int(binary_size) != count * 4 or len(binary) < count * 4:
                raise ProtocolError(f"binary input has {binary_size} bytes, the shape needs {count * 4}")
            array = np.frombuffer(binary[: count * 4], dtype="<f4")
        else:
            array = np.asarray(tensor.get("data"), dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise ProtocolError("input data must be a list of numbers") from None
    if array.size != count:
        raise ProtocolError(f"input has {array.size} values, shape {shape} needs {count}")
    array = array.reshape(shape).astype(np.float32, copy=True)
    if not np.isfinite(array).all():
        raise ProtocolError("input contains NaN or infinite values")
    return array


def _requested_outputs(request: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, as_binary) per requested output; all outputs when none are named."""
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    requested = request.get("outputs")
    if not requested:
        return [(name, default_binary) for name in OUTPUTS]
    chosen = []
    for output in requested:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
        chosen.append((name, bool((output.get("parameters") or {}).get("binary_data", default_binary))))
    return chosen


def build_v2_router(service: Service) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

    def metadata() -> dict[str, Any]:
        height, width = service.size
        return {
            "name": service.model_name,
            "versions": [MODEL_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, height, width]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(service.labels)]},
                {"name": "embedding", "datatype": "FP32", "shape": [-1, -1]},
            ],
        }

    def known(name: str) -> bool:
        return name == service.model_name

    @router.get("")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "pvt-deploy", "version": __version__, "extensions": ["binary_tensor_data"]}

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}  # the runtime is loaded before the server starts listening

    @router.get("/models/{name}/ready")
    @router.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = MODEL_VERSION) -> Any:
        if not known(name) or version != MODEL_VERSION:
            return _error(404, f"unknown model {name!r} (version {version}); this server has {service.model_name!r}")
        return {"name": name, "ready": True}

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = MODEL_VERSION) -> Any:
        if not known(name) or version != MODEL_VERSION:
            return _error(404, f"unknown model {name!r} (version {version}); this server has {service.model_name!r}")
        return metadata()

    @router.post("/models/{name}/infer")
    @router.post("/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = MODEL_VERSION) -> Any:
        if not known(name) or version != MODEL_VERSION:
            return _error(404, f"unknown model {name!r} (version {version}); this server has {service.model_name!r}")
        try:
            payload, binary = _parse(await request.body(), request.headers.get(HEADER_LENGTH))
            tensor = _input_tensor(payload, binary, service.size)
            wanted = _requested_outputs(payload)
        except ProtocolError as exc:
            return _error(400, str(exc))
        outputs = await service.infer_tensor(tensor)
        header: dict[str, Any] = {"model_name": name, "model_version": MODEL_VERSION, "outputs": []}
        if "id" in payload:
            header["id"] = payload["id"]
        blobs: list[bytes] = []
        for output_name, as_binary in wanted:
            value = np.ascontiguousarray(outputs[output_name], dtype="<f4")
            entry: dict[str, Any] = {"name": output_name, "datatype": "FP32", "shape": list(value.shape)}
            if as_binary:
                blob = value.tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = value.reshape(-1).tolist()
            header["outputs"].append(entry)
        if not blobs:
            return header
        encoded = json.dumps(header).encode()
        return Response(
            encoded + b"".join(blobs),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(encoded))},
        )

    return router
