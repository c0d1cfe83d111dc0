"""Shared test setup. Fixtures live in tests/fixtures/*.py, one module per area, registered below."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.checkpoints",
    "tests.fixtures.exported",
]


def _cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and _has_nvidia_device()


def _has_nvidia_device() -> bool:
    import os

    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly where onnxruntime has no usable CUDA provider (CI, this dev machine)."""
    if _cuda_provider_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device / CUDAExecutionProvider available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
