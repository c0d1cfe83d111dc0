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
def _default_sigint_handler() -> Iterator[None]:
    """Every test starts with Python's own SIGINT handler and leaves the process as it found it.

    The interrupt tests need it, and it is not a given: a test suite started in the background by a script
    inherits an ignored SIGINT (bash does that to background jobs), and ray.init installs its own handler."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
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
