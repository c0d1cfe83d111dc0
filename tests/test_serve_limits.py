"""The server's limits over real HTTP: 401 without the key, 413 over the body cap, 503 + Retry-After on a full
queue, and SIGTERM draining an in-flight request before exiting 0.

One server for the module with ``--max-queue 1``: a second request overflows the queue while a first one, a large
(slow to decode) image, holds it. The drain test keeps a request in flight by uploading its body slowly."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.test_serve import Server, files, start_server, torch_free_env

KEY_VARIABLE = "PVT_DEPLOY_TEST_API_KEY"
KEY = "s3cret-token"
MAX_BODY_MB = 0.5


@pytest.fixture(scope="module")
def server(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("limits")
    model_dir = Path(shutil.copytree(tiny_export_dir, folder / "model"))
    env = torch_free_env(folder)
    env[KEY_VARIABLE] = KEY
    options = ["--max-queue", "1", "--max-body-mb", str(MAX_BODY_MB), "--api-key-env", KEY_VARIABLE]
    running = start_server(model_dir, folder, *options, env=env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers={"authorization": f"Bearer {KEY}"}) as http:
        yield http


def test_unset_key_variable_is_a_clear_error(tiny_export_dir: Path, tmp_path: Path) -> None:
    env = torch_free_env(tmp_path)
    env.pop("PVT_DEPLOY_NO_SUCH_VARIABLE", None)
    command = [sys.executable, "-m", "pvt_deploy", "serve", str(tiny_export_dir)]
    command += ["--api-key-env", "PVT_DEPLOY_NO_SUCH_VARIABLE"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "Error: --api-key-env PVT_DEPLOY_NO_SUCH_VARIABLE: the environment variable is unset or empty"
    )


def test_401_without_the_bearer_token(server: Server, photo_paths: list[Path]) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        response = anonymous.post("/v1/predict", files=files(photo_paths[5:6]))
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        wrong = {"authorization": "Bearer not-the-key"}
        assert anonymous.post("/v1/predict", files=files(photo_paths[5:6]), headers=wrong).status_code == 401
        assert anonymous.get("/v1/model").status_code == 401
        assert anonymous.post("/v2/models/tiny/infer", json={}).status_code == 401
        # health probes, metrics and the page (which asks for the key) stay open
        assert anonymous.get("/v2/health/ready").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        assert '<div id="key-row" >' in anonymous.get("/").text  # the key field is shown


def test_non_ascii_bearer_token_is_401(server: Server, photo_paths: list[Path]) -> None:
    """Compared as bytes: a token that is not ASCII is a wrong key (401), never a 500."""
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        for token in ("Bearer k\u00e9y".encode(), b"Bearer \xff\xfe", "Bearer s3cret-tok\u00e9n".encode()):
            response = anonymous.post("/v1/predict", files=files(photo_paths[5:6]), headers={"authorization": token})
            assert response.status_code == 401, (token, response.text)
    assert server.process.poll() is None


def test_413_over_the_body_cap(client: httpx.Client) -> None:
    too_big = b"\0" * int(MAX_BODY_MB * 1024 * 1024 + 1)
    response = client.post("/v1/predict", content=too_big, headers={"content-type": "image/png"})
    assert response.status_code == 413 and "--max-body-mb" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is enforced while streaming
        for _ in range(8):
            yield b"\0" * (128 * 1024)

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413
    multipart = client.post("/v1/predict", files=[("image", ("big.png", too_big))])
    assert multipart.status_code == 413


def test_413_for_more_images_than_the_queue_holds(client: httpx.Client) -> None:
    small = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 160, 90)).save(small, format="PNG")
    for count in (2, 5):  # one over the queue, and well over it (the form parser's own file limit)
        response = client.post("/v1/predict", files=[("image", ("a.png", small.getvalue()))] * count)
        assert response.status_code == 413 and "at most 1" in response.json()["detail"], response.text


def _large_png() -> bytes:
    """Small on the wire, slow to decode and resize: holds its place in the queue for a while."""
    buffer = io.BytesIO()
    Image.new("RGB", (7000, 7000), (90, 140, 60)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < MAX_BODY_MB * 1024 * 1024
    return buffer.getvalue()


def test_503_with_retry_after_when_the_queue_is_full(client: httpx.Client, photo_paths: list[Path]) -> None:
    large = _large_png()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/predict", content=large, headers={"content-type": "image/png"})
        time.sleep(0.3)  # the first image is admitted and decoding (about a second)
        second = client.post("/v1/predict", files=files(photo_paths[1:2]))
        answers = [first.result(), second]
    # normally the second is refused; on a very loaded machine the first may be the one that arrived late
    assert sorted(a.status_code for a in answers) == [200, 503], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "--max-queue 1" in refused.json()["detail"]
    assert client.post("/v1/predict", files=files(photo_paths[1:2])).status_code == 200  # room again


def test_503_while_another_request_is_still_uploading(client: httpx.Client, photo_paths: list[Path]) -> None:
    """Bodies being read count against --max-queue too, so the bodies held in memory are bounded by it."""
    photo = photo_paths[5].read_bytes()
    sent_first_part = threading.Event()
    release = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield photo[:1000]
        sent_first_part.set()
        release.wait(30)
        yield photo[1000:]

    with ThreadPoolExecutor(1) as pool:
        uploading = pool.submit(client.post, "/v1/predict", content=slow_body(), headers={"content-type": "image/jpeg"})
        assert sent_first_part.wait(30)
        time.sleep(0.3)  # the first request's body is being read by now
        second = client.post("/v1/predict", files=files(photo_paths[1:2]))
        release.set()
        first = uploading.result()
    assert second.status_code == 503 and "uploading" in second.json()["detail"], second.text
    assert first.status_code == 200, first.text


def test_sigterm_drains_in_flight_requests_then_exits_0(
    server: Server, client: httpx.Client, photo_paths: list[Path]
) -> None:
    photo = photo_paths[5].read_bytes()
    sent_first_part = threading.Event()

    def slow_body() -> Iterator[bytes]:
        step = len(photo) // 4 + 1
        for start in range(0, len(photo), step):
            yield photo[start : start + step]
            sent_first_part.set()
            time.sleep(0.4)

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.post, "/v1/predict", content=slow_body(), headers={"content-type": "image/jpeg"})
        assert sent_first_part.wait(30)
        server.process.terminate()  # SIGTERM while the request's body is still arriving
        response = in_flight.result()
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"]
    assert server.process.wait(timeout=60) == 0, "".join(server.log)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v2/health/live", timeout=5)
