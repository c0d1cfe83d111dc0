"""The one place the service builds its ``Runtime``: the settings' device / precision / threads, micro-batches as
large as ``--max-batch`` (so one gathered batch is one onnxruntime call), all graphs loaded before serving."""

from __future__ import annotations

from pvt_deploy.runtime import Runtime
from pvt_deploy.serve.settings import ServeSettings


def open_runtime(settings: ServeSettings) -> Runtime:
    runtime = Runtime(
        settings.model_dir,
        device=settings.device,
        precision=settings.precision,
        threads=settings.threads,
        batch_size=settings.max_batch,
    )
    return runtime.load()
