"""The Open Inference Protocol over gRPC on Ray Serve, through Ray Serve's own gRPC proxy.

Ray's proxy registers ``inference.GRPCInferenceService`` from our generated ``add_..._to_server`` function, decodes
each call with our message classes, and calls the replica's method of the same name (``ModelInfer(request,
grpc_context)``); with one application it needs no ``application`` metadata, so ``tritonclient.grpc`` calls it
unchanged. What this module adds is only the methods: each hands the call to the same ``InferenceServicer`` that
``serve --grpc-port`` uses, over the replica's ``Service`` (its ``@serve.batch`` backend, admission limit and
metrics), with a context whose ``abort`` becomes Ray's ``set_code`` / ``set_details``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import grpc

from pvt_deploy.serve.grpc_service import InferenceServicer
from pvt_deploy.serve.protos import grpc_predict_v2_pb2 as pb

if TYPE_CHECKING:
    from pvt_deploy.serve.service import Service

SERVICER_FUNCTION = "pvt_deploy.serve.protos.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
"""What ``gRPCOptions(grpc_servicer_functions=[...])`` imports in Ray's proxy."""


def grpc_options(port: int, host: str) -> Any:
    """Ray Serve's ``gRPCOptions`` for the v2 service on ``port``. Ray's gRPC proxy has no host option: it listens on
    every interface, which is said once on stderr when ``--host`` asked for less."""
    from ray.serve.config import gRPCOptions

    if host not in ("0.0.0.0", "::"):
        print(
            f"pvt-deploy: Ray Serve's gRPC proxy listens on all interfaces ([::]:{port}), not only {host}",
            file=sys.stderr,
        )
    return gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION])


class _Aborted(Exception):
    """The call ended with a status code already set on Ray's context."""


class _RayContext:
    """The two things ``InferenceServicer`` asks of its context, on Ray's ``RayServegRPCContext``."""

    def __init__(self, grpc_context: Any) -> None:
        self._context = grpc_context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Aborted


def service_of(app: Any) -> Service:
    """The ``Service`` inside the app ``create_app`` returned (under its ASGI middleware)."""
    while not hasattr(app, "state"):
        app = app.app
    return app.state.service


class RayGrpcMethods:
    """Mixed into the Ray deployment: the v2 gRPC methods, over the ``Service`` of the replica's HTTP app."""

    _grpc_servicer: InferenceServicer | None = None

    def _bind_grpc(self, app: Any) -> Any:
        """Called with the replica's ASGI app once it is built; returns it unchanged."""
        service = service_of(app)
        self._grpc_servicer = InferenceServicer(service)
        return app

    async def _call(self, method: str, request: Any, grpc_context: Any, empty: Any) -> Any:
        assert self._grpc_servicer is not None, "the replica's app is built before Ray routes calls to it"
        try:
            return await getattr(self._grpc_servicer, method)(request, _RayContext(grpc_context))
        except _Aborted:
            return empty

    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context: Any) -> pb.ServerLiveResponse:
        return await self._call("ServerLive", request, grpc_context, pb.ServerLiveResponse())

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context: Any) -> pb.ServerReadyResponse:
        return await self._call("ServerReady", request, grpc_context, pb.ServerReadyResponse())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context: Any) -> pb.ServerMetadataResponse:
        return await self._call("ServerMetadata", request, grpc_context, pb.ServerMetadataResponse())

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: Any) -> pb.ModelReadyResponse:
        return await self._call("ModelReady", request, grpc_context, pb.ModelReadyResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context: Any) -> pb.ModelMetadataResponse:
        return await self._call("ModelMetadata", request, grpc_context, pb.ModelMetadataResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: Any) -> pb.ModelInferResponse:
        return await self._call("ModelInfer", request, grpc_context, pb.ModelInferResponse())
