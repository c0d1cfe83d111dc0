"""The Open Inference Protocol (KServe v2 REST, also spoken by Triton), with its binary tensor extension, so
``tritonclient.http`` and KServe clients call this server unchanged.

The model takes the preprocessed tensor ``input`` (FP32, [N, 3, H, W]: GET /v1/model gives the preprocessing) and
answers ``probabilities`` [N, classes] and ``embedding`` [N, D], through the same dynamic batcher as /v1. Requests
are validated by the pydantic models below (strict types: a shape of strings, nulls, floats or booleans is 400, as
is JSON nested deeper than the parser's limit); every refusal is 400/404 ``{"error": ...}``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from pvt_deploy import __version__
from pvt_deploy.serve.problems import ProtocolError
from pvt_deploy.serve.service import Service, ServiceDep

HEADER_LENGTH = "inference-header-content-length"
MODEL_VERSION = "1"
INPUT_NAME = "input"
OUTPUTS = ("probabilities", "embedding")


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TensorParameters(_Message):
    binary_data_size: StrictInt | None = Field(None, ge=0)


class InputTensor(_Message):
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: TensorParameters | None = None
    data: list[Any] | None = None


class OutputParameters(_Message):
    binary_data: StrictBool | None = None


class RequestedOutput(_Message):
    name: StrictStr
    parameters: OutputParameters | None = None


class RequestParameters(_Message):
    binary_data_output: StrictBool | None = None


class InferenceRequest(_Message):
    id: StrictStr | None = None
    parameters: RequestParameters | None = None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"invalid inference request: {where + ': ' if where else ''}{first.get('msg', 'invalid')}"


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON header (all of the body, or its first ``Inference-Header-Content-Length`` bytes) and the binary
    tensor data after it."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)} byte body"
            )
        header, binary = body[:length], body[length:]
    try:
        return InferenceRequest.model_validate_json(header), binary
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None


def the_input(inputs: Sequence[Any], size: tuple[int, int]) -> tuple[Any, list[int]]:
    """The one input tensor of a request (REST or gRPC: both have ``name``, ``datatype``, ``shape``) and its shape,
    checked against the model's contract: named ``input``, FP32, [N, 3, H, W] at the model's size."""
    if len(inputs) != 1:
        raise ProtocolError(f"expected exactly one input tensor named {INPUT_NAME!r}, got {len(inputs)}")
    tensor = inputs[0]
    if tensor.name != INPUT_NAME:
        raise ProtocolError(f"unknown input {tensor.name!r}; this model takes {INPUT_NAME!r}")
    if tensor.datatype != "FP32":
        raise ProtocolError(f"input datatype must be FP32, got {tensor.datatype!r}")
    shape = [int(dim) for dim in tensor.shape]
    expected = [3, *size]
    if not (len(shape) == 4 and shape[1:] == expected and shape[0] >= 1):
        raise ProtocolError(f"input shape must be [N, {', '.join(map(str, expected))}], got {shape}")
    return tensor, shape


def input_tensor(request: InferenceRequest, binary: bytes, size: tuple[int, int]) -> np.ndarray:
    """The request's ``input`` as a finite float32 (N, 3, H, W) array."""
    tensor, shape = the_input(request.inputs, size)
    count = math.prod(shape)
    binary_size = tensor.parameters.binary_data_size if tensor.parameters is not None else None
    if binary_size is not None:
        if binary_size != count * 4 or len(binary) < count * 4:
            raise ProtocolError(f"binary input has {binary_size} bytes, the shape needs {count * 4}")
        array = np.frombuffer(binary[: count * 4], dtype="<f4")
    else:
        if tensor.data is None:
            raise ProtocolError("input has neither 'data' nor binary_data_size")
        try:
            values = np.asarray(tensor.data)
        except ValueError:
            raise ProtocolError("input data must be a (nested) list of numbers of one shape") from None
        if values.dtype.kind not in "iuf":
            raise ProtocolError("input data must be a (nested) list of numbers")
        array = values.astype(np.float32).reshape(-1)
    if array.size != count:
        raise ProtocolError(f"input has {array.size} values, shape {shape} needs {count}")
    array = array.reshape(shape).astype(np.float32, copy=True)
    if not np.isfinite(array).all():
        raise ProtocolError("input contains NaN or infinite values (or values beyond float32)")
    return array


def requested_outputs(request: InferenceRequest) -> list[tuple[str, bool]]:
    """(name, as_binary) per requested output; all outputs when none are named."""
    default_binary = bool(request.parameters is not None and request.parameters.binary_data_output)
    if not request.outputs:
        return [(name, default_binary) for name in OUTPUTS]
    chosen = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise ProtocolError(f"unknown output {output.name!r}; this model has {', '.join(OUTPUTS)}")
        as_binary = output.parameters.binary_data if output.parameters is not None else None
        chosen.append((output.name, default_binary if as_binary is None else as_binary))
    return chosen


router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])


def _check_model(service: Service, name: str, version: str) -> None:
    if name != service.model_name or version != MODEL_VERSION:
        raise ProtocolError(
            f"unknown model {name!r} (version {version}); this server has {service.model_name!r}", status=404
        )


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
async def model_ready(name: str, service: ServiceDep, version: str = MODEL_VERSION) -> dict[str, Any]:
    _check_model(service, name, version)
    return {"name": name, "ready": True}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, service: ServiceDep, version: str = MODEL_VERSION) -> dict[str, Any]:
    _check_model(service, name, version)
    height, width = service.size
    return {
        "name": service.model_name,
        "versions": [MODEL_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, height, width]}],
        "outputs": [{"name": name, "datatype": "FP32", "shape": service.output_dims(name)} for name in OUTPUTS],
        "parameters": {"untrained": service.untrained},
    }


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, service: ServiceDep, version: str = MODEL_VERSION) -> Response:
    body = await request.body()  # read before any refusal, so a client still sending gets the answer, not EPIPE
    _check_model(service, name, version)
    payload, binary = parse_request(body, request.headers.get(HEADER_LENGTH))
    tensor = input_tensor(payload, binary, service.size)
    wanted = requested_outputs(payload)
    outputs = await service.infer_tensor(tensor)
    header: dict[str, Any] = {
        "model_name": name,
        "model_version": MODEL_VERSION,
        "parameters": {"untrained": service.untrained},
        "outputs": [],
    }
    if payload.id is not None:
        header["id"] = payload.id
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
        return JSONResponse(header, headers=service.untrained_headers)
    encoded = json.dumps(header).encode()
    return Response(
        encoded + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(encoded)), **service.untrained_headers},
    )
