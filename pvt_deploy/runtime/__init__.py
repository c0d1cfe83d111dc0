"""The torch-free runtime: an exported folder run with onnxruntime, numpy and Pillow only.

``from pvt_deploy import Runtime`` (or ``from pvt_deploy.runtime import Runtime``). Nothing here imports torch."""

from pvt_deploy.errors import DeviceError
from pvt_deploy.runtime.results import BatchResult, ItemError
from pvt_deploy.runtime.runtime import DEFAULT_BATCH_SIZE, Runtime

__all__ = ["DEFAULT_BATCH_SIZE", "BatchResult", "DeviceError", "ItemError", "Runtime"]
