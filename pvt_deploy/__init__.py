"""pvt-deploy: birder's PVT v2 classifier as verified ONNX graphs and a torch-free runtime.

Importing this package never imports torch: ``Runtime`` is loaded lazily and depends only on onnxruntime,
numpy and pillow. The torch side lives in ``pvt_deploy.model``, ``pvt_deploy.export`` and ``pvt_deploy.train``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pvt_deploy.runtime import Runtime


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from pvt_deploy.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'pvt_deploy' has no attribute {name!r}")


__all__ = ["Runtime", "__version__"]
