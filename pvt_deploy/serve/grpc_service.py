"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), beside the HTTP server.

``pvt-deploy serve --grpc-port 8001`` starts it in the same process and on the same event loop as uvicorn (grpcio's
asyncio server), so both protocols share one ``Service``: its batcher (a gRPC request and an HTTP request can share
a batch), its admission limit, its metrics registry and its API key. ``tritonclient.grpc`` and KServe's gRPC client
call it unchanged. The model is the v2 REST one: input ``input`` FP32 ``[N, 3, H, W]`` (preprocessed as GET
/v1/model says), outputs ``probabilities`` ``[N, classes]`` and ``embedding`` ``[N, D]``, as raw little-endian bytes
(``raw_input_contents`` / ``raw_output_contents``; typed ``fp32_contents`` input is accepted too).

Errors are status codes: INVALID_ARGUMENT (shape, datatype, byte size, NaN, unknown output), NOT_FOUND (unknown
model or version), UNAUTHENTICATED (``--api-key-env`` set and no or a wrong ``authorization: Bearer`` metadata),
RESOURCE_EXHAUSTED (more images than ``--max-queue`` in one request, or the queue is full)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from grpc import aio
from prometheus_client import Counter, Histogram

from pvt_deploy import __version__
from pvt_deploy.serve.limits import bearer_matches
from pvt_deploy.serve.metrics import LATENCY_BUCKETS
from pvt_deploy.serve.problems import ProtocolError
from pvt_deploy.serve.protos import grpc_predict_v2_pb2 as pb
from pvt_deploy.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from pvt_deploy.serve.v2 import INPUT_NAME, MODEL_VERSION, OUTPUTS, the_input

if TYPE_CHECKING:
    from pvt_deploy.serve.service import Service

SERVICE_NAME = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
"""Answered without the API key, like HTTP's /v2 and /v2/health/*: probes and the server's name need no secret."""
GRACE_S = 30.0
"""On shutdown, how long in-flight RPCs may take before they are cancelled (uvicorn's drain uses the same)."""

logger = logging.getLogger("uvicorn.error")  # the server's own log stream, so gRPC lines read like uvicorn's
Reply = TypeVar("Reply")


class RpcError(Exception):
    """An answer with a gRPC status code other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def input_rows(request: pb.ModelInferRequest, size: tuple[int, int]) -> np.ndarray:
    """The request's one FP32 ``input`` tensor as a writable (N, 3, H, W) float32 array, checked before any copy."""
    try:
        tensor, shape = the_input(request.inputs, size)  # the REST protocol's rule for name, datatype and shape
    except ProtocolError as exc:
        raise _invalid(str(exc)) from None
    count = math.prod(shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise _invalid(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
        raw = request.raw_input_contents[0]
        if len(raw) != count * 4:
            raise _invalid(f"raw input has {len(raw)} bytes, shape {shape} as FP32 needs {count * 4}")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise _invalid(f"input has {len(values)} fp32_contents, shape {shape} needs {count}")
        array = np.asarray(values, dtype=np.float32)
    rows = array.reshape(shape).astype(np.float32, copy=True)
    if not np.isfinite(rows).all():
        raise _invalid("input contains NaN or infinite values")
    return rows


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs to answer, in the order asked (all of them when none are named)."""
    if not request.outputs:
        return list(OUTPUTS)
    names = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise _invalid(f"unknown output {output.name!r}; this model has {', '.join(OUTPUTS)}")
        if "classification" in output.parameters:
            raise _invalid("the classification extension is not supported; ask for 'probabilities' and rank them")
        names.append(output.name)
    return names


class GrpcMetrics:
    """gRPC calls by method and status code, and their latency, in the service's registry (so /metrics shows both
    protocols; batch sizes, queue depth and images are the service's own, shared with HTTP)."""

    def __init__(self, registry: Any) -> None:
        self.requests = Counter(
            "pvt_grpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=registry
        )
        self.latency = Histogram(
            "pvt_grpc_request_latency_seconds", "gRPC call latency by method", ["method"], buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 gRPC methods over a ``Service`` (the same object the HTTP routes use)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.api_key = service.api_key.encode() if service.api_key is not None else None
        self.metrics = GrpcMetrics(service.metrics.registry)

    # ----- plumbing -----------------------------------------------------------------------------------------------

    def _authorized(self, context: aio.ServicerContext) -> bool:
        assert self.api_key is not None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return bearer_matches(value.encode() if isinstance(value, str) else bytes(value), self.api_key)
        return False

    async def _answer(
        self, method: str, context: aio.ServicerContext, produce: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        """Check the key, run ``produce``, count the call; any failure becomes a status code, never a dead server."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        try:
            if self.api_key is not None and method not in OPEN_METHODS and not self._authorized(context):
                raise RpcError(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key: send 'authorization: Bearer <key>'"
                )
            return await produce()
        except RpcError as exc:
            code, message = exc.code, str(exc)
        except Exception as exc:  # an HTTPProblem from admission, or a model failure
            code, message = _status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("gRPC %s failed", method)
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - started)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    def _check_model(self, name: str, version: str) -> None:
        if name != self.service.model_name or version not in ("", MODEL_VERSION):
            raise RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r} (version {version or MODEL_VERSION}); this server has "
                f"{self.service.model_name!r} version {MODEL_VERSION}",
            )

    # ----- methods ------------------------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        async def produce() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._answer("ServerLive", context, produce)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        async def produce() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=True)  # the runtime is loaded before either server listens

        return await self._answer("ServerReady", context, produce)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async def produce() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name="pvt-deploy", version=__version__, extensions=[])

        return await self._answer("ServerMetadata", context, produce)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        async def produce() -> pb.ModelReadyResponse:
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer("ModelReady", context, produce)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def produce() -> pb.ModelMetadataResponse:
            self._check_model(request.name, request.version)
            height, width = self.service.size
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=self.service.model_name,
                versions=[MODEL_VERSION],
                platform="onnxruntime_onnx",
                inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, 3, height, width])],
                outputs=[tensor(name=name, datatype="FP32", shape=self.service.output_dims(name)) for name in OUTPUTS],
            )

        return await self._answer("ModelMetadata", context, produce)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        async def produce() -> pb.ModelInferResponse:
            self._check_model(request.model_name, request.model_version)
            rows = input_rows(request, self.service.size)
            wanted = requested_outputs(request)
            outputs = await self.service.infer_tensor(rows)
            response = pb.ModelInferResponse(model_name=self.service.model_name, model_version=MODEL_VERSION)
            if request.id:
                response.id = request.id
            response.parameters["untrained"].bool_param = self.service.untrained
            for name in wanted:
                value = np.ascontiguousarray(outputs[name], dtype="<f4")
                response.outputs.add(name=name, datatype="FP32", shape=list(value.shape))
                response.raw_output_contents.append(value.tobytes())
            return response

        return await self._answer("ModelInfer", context, produce)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code for a non-protocol failure: admission refusals (HTTP 413 / 503 in the HTTP app) are
    RESOURCE_EXHAUSTED; anything else is INTERNAL."""
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if status in (413, 503):
        detail = body.get("detail") if isinstance(body, dict) else None
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(detail or exc)
    return grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}"


class GrpcServer:
    """grpcio's asyncio server on the running event loop (uvicorn's), serving one ``Service``."""

    def __init__(self, service: Service, address: str, *, max_message_bytes: int, max_concurrent_rpcs: int) -> None:
        self.address = address
        self.port: int | None = None
        self._server = aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),  # the HTTP body cap, --max-body-mb
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a second listener
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,  # beyond it grpcio answers RESOURCE_EXHAUSTED itself
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), self._server)

    async def start(self) -> None:
        try:
            self.port = self._server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"gRPC cannot listen on {self.address} (in use, or not an address of this machine)") from exc
        await self._server.start()
        host = self.address.rsplit(":", 1)[0]
        logger.info("gRPC (Open Inference Protocol) running on %s:%d", host, self.port)

    async def stop(self, grace_s: float = GRACE_S) -> None:
        """Refuse new calls, let in-flight ones finish (up to ``grace_s``), then close."""
        await self._server.stop(grace_s)


async def start_grpc_server(service: Service) -> GrpcServer | None:
    """The lifespan hook: a started server when the settings ask for one (``grpc_address``), else None."""
    settings = service.settings
    address = settings.grpc_address
    if address is None:
        return None
    server = GrpcServer(
        service,
        address,
        max_message_bytes=settings.max_body_bytes,
        max_concurrent_rpcs=4 * settings.max_queue + 64,
    )
    await server.start()
    return server
