"""Shared test setup. Fixtures live in tests/fixtures/*.py, one module per area, registered below."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.checkpoints",
    "tests.fixtures.exported",
]


def _cuda_provider_available() -> bool:
    try:
        from pvt_deploy.runtime.sessions import cuda_usable
    except ImportError:  # no onnxruntime
        return False
    return cuda_usable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly where onnxruntime has no usable CUDA provider (CI, this dev machine)."""
    if _cuda_provider_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device / CUDAExecutionProvider available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
