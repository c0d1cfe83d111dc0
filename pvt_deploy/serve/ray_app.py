"""The same app on Ray Serve: each replica holds its own ``Runtime`` and batches with Ray Serve's ``@serve.batch``.

``pvt-deploy serve MODEL_DIR --ray [--address ADDR] --replicas N`` runs it; so does
``serve run pvt_deploy.serve.ray_app:build_app model_dir=MODEL_DIR [max_batch=8 ...]`` (the builder below)."""

from __future__ import annotations

import asyncio
import signal
import threading
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from pvt_deploy.runtime.config import RuntimeConfig
from pvt_deploy.serve.batching import Outputs, run_grouped
from pvt_deploy.serve.ray_grpc import RayGrpcMethods, grpc_options
from pvt_deploy.serve.settings import ServeSettings

DEPLOYMENT_NAME = "pvt_deploy"


def _rows_in(requests: list[tuple[str, np.ndarray]]) -> int:
    return sum(len(rows) for _, rows in requests)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class PvtDeployment(RayGrpcMethods):  # hook: the v2 gRPC methods for Ray's gRPC proxy (ray_grpc.py)
    """One replica: a loaded ``Runtime`` plus the FastAPI app, whose backend is this replica's batch queue."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.runtime = settings.open_runtime()
        self._batched.set_max_batch_size(settings.max_batch)
        self._batched.set_batch_wait_timeout_s(settings.max_wait_ms / 1000.0)

    def __serve_build_asgi_app__(self) -> Any:
        from pvt_deploy.serve.app import create_app

        return self._bind_grpc(create_app(self.runtime, self.settings, backend=self))  # hook: gRPC over its Service

    async def run(self, operation: str, rows: np.ndarray) -> Outputs:
        return await self._batched((operation, rows))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_rows_in)
    async def _batched(self, requests: list[tuple[str, np.ndarray]]) -> list[Outputs]:
        return await asyncio.to_thread(run_grouped, self.runtime, requests)


def deployment(settings: ServeSettings, replicas: int) -> Any:
    """The bound deployment: ``replicas`` replicas, each taking up to ``--max-queue`` requests at once."""
    options = PvtDeployment.options(num_replicas=replicas, max_ongoing_requests=max(settings.max_queue, 1))
    return options.bind(settings)


def build_app(args: dict[str, str]) -> Any:
    """``serve run`` builder: ``model_dir=...`` plus any ServeSettings or RuntimeConfig field as ``key=value``
    (``threads=2``, ``device=cpu``, ``providers=A,B``); ``replicas=N``."""
    options = dict(args)
    replicas = int(options.pop("replicas", 1))
    model_dir = options.pop("model_dir", None)
    if model_dir is None:
        raise ValueError("serve run ... model_dir=PATH is required")
    serve_fields = {f.name: f for f in fields(ServeSettings) if f.name not in ("model_dir", "runtime")}
    runtime_fields = {f.name: f for f in fields(RuntimeConfig)}
    typed: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    for key, value in options.items():
        if key in serve_fields:
            typed[key] = _typed(str(serve_fields[key].type), value)
        elif key in runtime_fields:
            runtime[key] = _typed(str(runtime_fields[key].type), value)
        else:
            raise ValueError(f"unknown option {key!r}")
    settings = ServeSettings(model_dir=Path(model_dir).resolve(), runtime=RuntimeConfig(**runtime), **typed)
    return deployment(settings, replicas)


def _typed(kind: str, value: str) -> Any:
    if "tuple" in kind:
        return tuple(part for part in value.split(",") if part)
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    return int(value) if "int" in kind else float(value) if "float" in kind else value


def run_on_ray(
    settings: ServeSettings, *, host: str, port: int, address: str | None, replicas: int, grpc_port: int | None = None
) -> None:
    """Start (or join) Ray, deploy ``replicas`` replicas behind Ray Serve's HTTP proxy (and its gRPC proxy on
    ``grpc_port``), and stay up until stopped."""
    import ray

    # replicas never start a gRPC server of their own: Ray's proxy serves gRPC
    settings = replace(settings, model_dir=Path(settings.model_dir).resolve(), grpc_address=None)
    ray.init(address=address)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # replaces ray.init's handler, which exits 15
    try:
        serve.start(
            http_options={"host": host, "port": port},
            grpc_options=grpc_options(grpc_port, host) if grpc_port is not None else None,  # hook: gRPC on Ray
        )
        serve.run(deployment(settings, replicas), name=DEPLOYMENT_NAME, route_prefix="/")
        while not stop.wait(1.0):
            pass
    finally:
        # Ray Serve drains its replicas' in-flight requests; ray.shutdown stops the processes it started (and
        # signals our own process group, which must not turn this clean stop into a non-zero exit)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()
