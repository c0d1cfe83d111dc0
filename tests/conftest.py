"""Shared test setup. Fixtures live in tests/fixtures/*.py, one module per area, registered below."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.checkpoints",
    "tests.fixtures.exported",
]


@pytest.fixture(autouse=True)
def _sigint_handler_restored() -> Iterator[None]:
    """Tests that start Ray in-process (ray.init) leave their own SIGINT handler behind, and subprocesses inherit an
    ignored SIGINT; the interrupt tests need Python's default handler, so every test gets it back."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


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
