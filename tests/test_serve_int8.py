"""Batch invariance of the int8 variant through the HTTP app (in-process ASGI, concurrent requests batched).

Dynamic int8 takes its activation scale from the whole batch, so unless ``Runtime`` serves a batch-invariant int8
(or runs int8 rows one by one), an image's answer moves with its batch mates: on the tiny model by up to 6.6e-2 in
probability between batch 1 and batch 7."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from pvt_deploy.runtime.config import RuntimeConfig
from pvt_deploy.serve.app import create_app
from pvt_deploy.serve.settings import ServeSettings
from tests.fixtures.exported import export_tiny
from tests.test_serve import PROBABILITY_ATOL, files


@pytest.fixture(scope="module")
def int8_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tiny_checkpoint, tmp_path_factory.mktemp("serve-int8") / "model", precisions=("fp32", "int8"))


async def _answers(model_dir: Path, precision: str, photos: list[Path]) -> tuple[np.ndarray, np.ndarray, int]:
    settings = ServeSettings(
        model_dir, runtime=RuntimeConfig(device="cpu", precision=precision), max_batch=8, max_wait_ms=50
    )
    app = create_app(settings.open_runtime(), settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=60) as client:

        async def one(path: Path) -> list[float]:
            response = await client.post("/v1/classify", files=files([path]))
            assert response.status_code == 200, response.text
            return response.json()["results"][0]["probabilities"]

        alone = [await one(path) for path in photos]
        together = await asyncio.gather(*(one(path) for path in photos))
        metrics = (await client.get("/metrics")).text
    batches = re.search(r"^pvt_batch_size_count (\S+)$", metrics, re.M)
    assert batches is not None
    return np.array(alone), np.array(together), int(float(batches.group(1)))


@pytest.mark.parametrize("precision", ["fp32", "int8"])  # dynamic int8: the Runtime runs its rows one by one
def test_answers_do_not_depend_on_batch_mates(int8_dir: Path, photo_paths: list[Path], precision: str) -> None:
    photos = [*photo_paths, photo_paths[0]]
    alone, together, batches = asyncio.run(_answers(int8_dir, precision, photos))
    assert batches < 2 * len(photos), "the concurrent requests were not batched together"  # alone: one batch each
    np.testing.assert_allclose(together, alone, atol=PROBABILITY_ATOL)
