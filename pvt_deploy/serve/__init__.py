"""``pvt-deploy serve``: an HTTP inference service over the public ``Runtime`` API (FastAPI + uvicorn, or Ray Serve).

Torch-free: nothing here imports torch, onnx, or pvt_deploy.export / model / train. FastAPI loads on first use of
``create_app``; Ray only in ``pvt_deploy.serve.ray_app``."""

from __future__ import annotations

from typing import Any

from pvt_deploy.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from pvt_deploy.serve.app import create_app

        return create_app
    raise AttributeError(name)
