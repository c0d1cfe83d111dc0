"""The same app on Ray Serve (local Ray, 2 CPUs, 2 replicas with ``@serve.batch``) answers like the single-process
uvicorn server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from pvt_deploy import Runtime
from pvt_deploy.runtime.config import RuntimeConfig
from pvt_deploy.serve.settings import ServeSettings
from tests.test_serve import EMBEDDING_COSINE_MIN, PROBABILITY_ATOL, Server, cosine_min, files, start_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPLICAS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(model_dir: Path) -> Iterator[str]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from pvt_deploy.serve.ray_app import DEPLOYMENT_NAME, PvtDeployment

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(model_dir, runtime=RuntimeConfig(device="cpu", threads=1), max_batch=8, max_wait_ms=30)
        deployment = PvtDeployment.options(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0.5})
        serve.run(deployment.bind(settings), name=DEPLOYMENT_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(model_dir, tmp_path_factory.mktemp("local"), "--threads", "1")
    yield running
    assert running.stop() == 0


def test_ray_serve_answers_like_the_single_process_server(
    ray_url: str, local: Server, model_dir: Path, photo_paths: list[Path]
) -> None:
    with httpx.Client(base_url=ray_url, timeout=120) as on_ray, httpx.Client(base_url=local.url, timeout=60) as alone:
        assert on_ray.get("/v1/model").json()["labels"] == alone.get("/v1/model").json()["labels"]
        ray_predict = on_ray.post("/v1/predict", files=files(photo_paths), params={"top_k": 3})
        assert ray_predict.status_code == 200, ray_predict.text
        local_predict = alone.post("/v1/predict", files=files(photo_paths), params={"top_k": 3}).json()
        for got, want in zip(ray_predict.json()["results"], local_predict["results"], strict=True):
            assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]

        # concurrent single-image requests: batched by @serve.batch across requests, same answers as uvicorn's
        def classify(client: httpx.Client, path: Path) -> dict:
            response = client.post("/v1/classify", params={"embedding": "true"}, files=files([path]))
            assert response.status_code == 200, response.text
            return response.json()["results"][0]

        with ThreadPoolExecutor(len(photo_paths)) as pool:
            from_ray = list(pool.map(lambda path: classify(on_ray, path), photo_paths))
        from_local = [classify(alone, path) for path in photo_paths]
        np.testing.assert_allclose([r["probabilities"] for r in from_ray], [r["probabilities"] for r in from_local],
                                   atol=PROBABILITY_ATOL)  # fmt: skip
        ray_embedding = np.array([r["embedding"] for r in from_ray], np.float32)
        assert cosine_min(ray_embedding, np.array([r["embedding"] for r in from_local], np.float32)) >= (
            EMBEDDING_COSINE_MIN
        )

        # the replica's Runtime runs with the settings' batch size, threads and providers (its loaded session's)
        runtime = on_ray.get("/v1/model").json()["runtime"]
        assert runtime["batch_size"] == 8 and runtime["config"]["threads"] == 1
        assert runtime["session_providers"] == ["CPUExecutionProvider"]

        bad = on_ray.post("/v1/predict", files=[("image", ("text.jpg", b"not an image"))])
        assert bad.status_code == 422 and bad.json()["errors"][0]["item"] == "text.jpg"
    expected = Runtime(model_dir, device="cpu").predict(photo_paths, top_k=1)
    assert [r["predictions"][0]["label"] for r in ray_predict.json()["results"]] == [a[0][0] for a in expected]


def test_serve_run_builder_reads_its_arguments(model_dir: Path) -> None:
    """``serve run pvt_deploy.serve.ray_app:build_app model_dir=... replicas=2 max_batch=4`` builds this deployment."""
    from pvt_deploy.serve.ray_app import build_app

    application = build_app({"model_dir": str(model_dir), "replicas": "2", "max_batch": "4", "max_wait_ms": "2.5"})
    deployment = application._bound_deployment
    settings = deployment.init_args[0]
    assert deployment.num_replicas == 2
    assert settings == ServeSettings(model_dir.resolve(), max_batch=4, max_wait_ms=2.5)
    runtime_options = {
        "model_dir": str(model_dir),
        "threads": "1",
        "providers": "CPUExecutionProvider",
        "device": "cpu",
    }
    settings = build_app(runtime_options)._bound_deployment.init_args[0]
    assert settings.runtime == RuntimeConfig(device="cpu", threads=1, providers=("CPUExecutionProvider",), batch_size=8)
    with pytest.raises(ValueError, match="unknown option 'batch'"):
        build_app({"model_dir": str(model_dir), "batch": "4"})
    with pytest.raises(ValueError, match="model_dir=PATH is required"):
        build_app({})
