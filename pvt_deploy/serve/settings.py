"""The service's options, one picklable dataclass (Ray ships it to every replica), and the one place the service's
``Runtime`` is built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pvt_deploy.decode_budget import DEFAULT_DECODE_BUDGET_BYTES, MB
from pvt_deploy.errors import ServeError
from pvt_deploy.runtime.config import RuntimeConfig

if TYPE_CHECKING:
    from pvt_deploy.runtime import Runtime


@dataclass(frozen=True)
class ServeSettings:
    """How one server (or one Ray replica) runs. Defaults are the CLI's.

    ``runtime`` is the whole ``Runtime`` configuration; its ``batch_size`` defaults to ``max_batch``, so one
    gathered batch is one onnxruntime call."""

    model_dir: Path
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_body_mb: float = 32.0
    max_queue: int = 64
    max_decode_mb: float = DEFAULT_DECODE_BUDGET_BYTES / MB
    """Decoded image bytes in flight across the decode pool (``pvt_deploy.decode_budget``)."""
    decode_wait_s: float = 10.0
    """How long a decode waits for room in that budget before the request gets 503."""
    header_timeout_s: float = 10.0
    """A connection must finish a request's headers this long after it opens (or after its previous answer)."""
    body_timeout_s: float = 120.0
    """... and its body this long after the headers."""
    api_key: str | None = None
    # gRPC and model instances (pvt_deploy/serve/grpc_service.py, instances.py)
    grpc_address: str | None = None  # "HOST:PORT" for the Open Inference Protocol over gRPC; None: HTTP only
    instances: int | None = None  # batches in the model at once; None: from the CPU count and threads

    def __post_init__(self) -> None:
        if self.runtime.batch_size is None:
            object.__setattr__(self, "runtime", self.runtime.replace(batch_size=self.max_batch))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MB)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * MB)

    def open_runtime(self) -> Runtime:
        """The service's ``Runtime``, every graph loaded before the server listens (local and Ray replicas)."""
        from pvt_deploy.runtime import Runtime

        return Runtime(self.model_dir, config=self.runtime).load()

    @staticmethod
    def api_key_from_env(variable: str | None) -> str | None:
        """The bearer token named by ``--api-key-env``; an unset or empty variable is an error, never "no auth"."""
        if variable is None:
            return None
        value = os.environ.get(variable, "")
        if not value.strip():
            raise ServeError(f"--api-key-env {variable}: the environment variable is unset or empty")
        return value.strip()
