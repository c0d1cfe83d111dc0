"""The service's options, one picklable dataclass (Ray ships it to every replica)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pvt_deploy.errors import ServeError


@dataclass(frozen=True)
class ServeSettings:
    """How one server (or one Ray replica) runs. Defaults are the CLI's."""

    model_dir: Path
    device: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_body_mb: float = 32.0
    max_queue: int = 64
    api_key: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @staticmethod
    def api_key_from_env(variable: str | None) -> str | None:
        """The bearer token named by ``--api-key-env``; an unset or empty variable is an error, never "no auth"."""
        if variable is None:
            return None
        value = os.environ.get(variable, "")
        if not value.strip():
            raise ServeError(f"--api-key-env {variable}: the environment variable is unset or empty")
        return value.strip()
