"""``pvt-deploy serve`` over real HTTP: one uvicorn server per module, started with torch blocked, on 127.0.0.1.

Answers are checked against in-process ``Runtime`` calls on the same images."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pvt_deploy import Runtime
from pvt_deploy.errors import MissingExtraError
from tests.test_runtime import png_claiming_size
from tests.test_runtime_torch_free import BLOCKER

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 90
PROBABILITY_ATOL = 1e-5  # the fp32 parity threshold on probabilities
EMBEDDING_COSINE_MIN = 0.99999  # ... and on embeddings
MODEL_NAME = "pvt_v2_tiny"  # the tiny fixture's manifest model_name: the v2 protocol's model name


@dataclass
class Server:
    """A ``pvt-deploy serve`` subprocess and where it listens."""

    process: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def torch_free_env(folder: Path) -> dict[str, str]:
    """The environment of a process where ``import torch`` fails, as if torch were not installed."""
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO)])
    env["PVT_DEPLOY_CACHE"] = str(folder / "cache")
    return env


def run_serve(args: list[str], folder: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``pvt-deploy serve ARGS`` run to its end with torch blocked (for commands that exit: refusals, errors)."""
    command = [sys.executable, "-m", "pvt_deploy", "serve", *args]
    return subprocess.run(command, env=env or torch_free_env(folder), capture_output=True, text=True, timeout=120)


def modules_loaded_by(imports: str, folder: Path) -> list[str]:
    """``sys.modules`` after the statements ``imports`` ran in a fresh interpreter with torch blocked."""
    script = f"{imports}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], env=torch_free_env(folder), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_server(
    model_dir: Path, folder: Path, *options: str, env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL
) -> Server:
    """Start the server on a free port (``--port 0``) and wait until it is ready; torch is blocked in it.
    (uvicorn writes its access log to ``stdout``.)"""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pvt_deploy", "serve", str(model_dir), "--port", "0", "--device", "cpu", *options]
    process = subprocess.Popen(
        command, env=env or torch_free_env(folder), cwd=folder, stdout=stdout, stderr=subprocess.PIPE, text=True
    )
    server = Server(process, "")
    found = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            server.log.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                server.url = match.group(1)
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not found.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError("server did not start:\n" + "".join(server.log))
    return server


def files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("image", (path.name, path.read_bytes())) for path in paths]


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float((np.sum(a64 * b64, 1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))).min())


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Runtime:
    return Runtime(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    options = ("--max-batch", "8", "--max-wait-ms", "30", "--providers", "CPUExecutionProvider", "--spin-wait")
    running = start_server(model_dir, tmp_path_factory.mktemp("server"), *options)
    yield running
    assert running.stop() == 0, "".join(running.log)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


# ----- torch-free ---------------------------------------------------------------------------------------------------


def test_serving_imports_no_torch(tmp_path: Path) -> None:
    """The serve command and the app load without torch, onnx, or the export / model / train layers."""
    imports = (
        "from pvt_deploy.cli import cli\n"
        "from pvt_deploy.cli.serve_cmds import serve\n"
        "import pvt_deploy.serve.app, pvt_deploy.serve.v2, pvt_deploy.serve.batching"
    )
    layers = ("pvt_deploy.export", "pvt_deploy.model", "pvt_deploy.train")
    loaded = modules_loaded_by(imports, tmp_path)
    assert [m for m in loaded if m.split(".")[0] in ("torch", "torchvision", "onnx") or m.startswith(layers)] == []


def test_missing_serve_extra_is_one_error_line(model_dir: Path, tmp_path: Path) -> None:
    env = torch_free_env(tmp_path)
    blocker = tmp_path / "sitecustomize.py"
    blocked = blocker.read_text().replace('BLOCKED = ("torch", "torchvision")', 'BLOCKED = ("torch", "fastapi")')
    assert blocked != blocker.read_text()
    blocker.write_text(blocked)
    done = run_serve([str(model_dir)], tmp_path, env=env)
    assert done.returncode == MissingExtraError.exit_code
    assert done.stderr.strip() == (
        "Error: `pvt-deploy serve` needs the [serve] extra (fastapi is not installed): pip install 'pvt-deploy[serve]' "
        "(from a source checkout: pip install -e '.[serve]')"
    )


def test_server_runs_with_torch_blocked(client: httpx.Client) -> None:
    """The module's server process has the torch blocker active (see ``start_server``) and still answers."""
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


# ----- the /v1 API contract -----------------------------------------------------------------------------------------


def test_predict_matches_runtime(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    response = client.post("/v1/predict", params={"top_k": 3}, files=files(photo_paths[:3]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL_NAME
    expected = runtime.predict(photo_paths[:3], top_k=3)
    assert [r["image"] for r in body["results"]] == [p.name for p in photo_paths[:3]]
    for result, answer in zip(body["results"], expected, strict=True):
        assert [p["label"] for p in result["predictions"]] == [label for label, _ in answer]
        np.testing.assert_allclose([p["probability"] for p in result["predictions"]], [p for _, p in answer],
                                   atol=PROBABILITY_ATOL)  # fmt: skip
        assert [p["index"] for p in result["predictions"]] == [runtime.labels.index(label) for label, _ in answer]


def test_raw_body_is_one_image(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    response = client.post("/v1/predict", content=photo_paths[5].read_bytes(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["image"] == "body"
    assert result["predictions"][0]["label"] == runtime.predict(photo_paths[5])[0][0][0]
    assert len(result["predictions"]) == 5  # the default top_k


def test_classify_with_embedding(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    response = client.post("/v1/classify", params={"embedding": "true"}, files=files(photo_paths[:2]))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    probabilities, embedding = runtime.classify(photo_paths[:2], return_embedding=True)
    np.testing.assert_allclose([r["probabilities"] for r in results], probabilities, atol=PROBABILITY_ATOL)
    assert cosine_min(np.array([r["embedding"] for r in results], np.float32), embedding) >= EMBEDDING_COSINE_MIN
    plain = client.post("/v1/classify", files=files(photo_paths[:1])).json()["results"][0]
    assert "embedding" not in plain and len(plain["probabilities"]) == len(runtime.labels)


def test_embed_json_and_npy(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    expected = runtime.embed(photo_paths[:4])
    as_json = client.post("/v1/embed", files=files(photo_paths[:4]))
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["dim"] == expected.shape[1]
    got = np.array([r["embedding"] for r in as_json.json()["results"]], np.float32)
    assert cosine_min(got, expected) >= EMBEDDING_COSINE_MIN
    as_npy = client.post("/v1/embed", files=files(photo_paths[:4]), headers={"accept": "application/x-npy"})
    assert as_npy.status_code == 200 and as_npy.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(as_npy.content))
    assert array.dtype == np.float32 and array.shape == expected.shape
    assert cosine_min(array, expected) >= EMBEDDING_COSINE_MIN


def test_features_npz_and_heatmap(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    expected = runtime.features(photo_paths[:2])
    response = client.post("/v1/features", files=files(photo_paths[:2]))
    assert response.status_code == 200, response.text
    stored = np.load(io.BytesIO(response.content))
    assert sorted(stored.files) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(stored[name], value, atol=1e-4, err_msg=name)
    heatmap = client.post("/v1/features", params={"format": "heatmap"}, files=files(photo_paths[:1])).json()
    stages = heatmap["results"][0]["stages"]
    assert {name: np.array(grid).shape for name, grid in stages.items()} == {
        name: value.shape[2:] for name, value in expected.items()
    }
    assert all(np.min(grid) >= 0.0 and np.max(grid) == 1.0 for grid in stages.values())


def test_model_description(client: httpx.Client, runtime: Runtime, model_dir: Path) -> None:
    body = client.get("/v1/model").json()
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert body["labels"] == runtime.labels and body["num_classes"] == len(runtime.labels)
    assert body["input"]["size"] == runtime.metadata["preprocess"]["size"]
    assert body["precisions"] == ["fp32"] and body["precision"] == "fp32"
    assert body["checksums"] == {name: record["sha256"] for name, record in manifest["files"].items()}
    assert body["untrained"] is False
    assert body["batching"] == {"max_batch": 8, "max_wait_ms": 30.0}


def test_openapi_docs_and_page(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/classify", "/v1/embed", "/v1/features", "/v1/model", "/v2/models/{name}/infer"} <= set(
        paths
    )
    page = client.get("/").text
    assert 'id="file"' in page and "tiny" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must load no external assets"


# ----- bad input ----------------------------------------------------------------------------------------------------


def test_bad_image_corpus_gets_422_naming_each_item(client: httpx.Client, photo_paths: list[Path]) -> None:
    jpeg = photo_paths[5].read_bytes()
    corpus = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "text.jpg": (b"this is not a JPEG\n", "not an image"),
        "bomb.png": (png_claiming_size(30_000, 30_000), "decompression bomb"),
    }
    upload = [("image", ("good.png", photo_paths[0].read_bytes()))]
    upload += [("image", (name, data)) for name, (data, _) in corpus.items()]
    response = client.post("/v1/predict", files=upload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] == f"{len(corpus)} of {len(corpus) + 1} images could not be used"
    assert [e["item"] for e in body["errors"]] == list(corpus)
    assert [e["index"] for e in body["errors"]] == [1, 2, 3, 4]
    for error, (_, reason) in zip(body["errors"], corpus.values(), strict=True):
        assert reason in error["reason"], error
    assert client.post("/v1/predict", files=files(photo_paths[:1])).status_code == 200  # the server is fine after


def test_json_body_and_missing_files_are_refused(client: httpx.Client) -> None:
    assert client.post("/v1/predict", json={"url": "http://example.com/a.jpg"}).status_code == 415
    assert client.post("/v1/predict", data={"note": "no file"}, files={}).status_code in (415, 422)
    assert client.post("/v1/predict", params={"top_k": 0}, content=b"x").status_code == 422


# ----- batching -----------------------------------------------------------------------------------------------------


def _probabilities(client: httpx.Client, path: Path) -> tuple[np.ndarray, np.ndarray]:
    response = client.post("/v1/classify", params={"embedding": "true"}, files=files([path]))
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    return np.array(result["probabilities"], np.float32), np.array(result["embedding"], np.float32)


def test_fp32_answers_are_batch_invariant(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    """An image's answer alone equals its answer gathered with others (7 concurrent requests) and in one request."""
    images = [*photo_paths, photo_paths[0]]
    alone = [_probabilities(client, path) for path in images]
    before = _batch_count(client)
    start_together = threading.Barrier(len(images))

    def at_once(path: Path) -> tuple[np.ndarray, np.ndarray]:
        start_together.wait(timeout=30)
        return _probabilities(client, path)

    with ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(at_once, images))
    after = _batch_count(client)
    assert after["rows"] - before["rows"] == len(images)
    assert after["batches"] - before["batches"] < len(images), "concurrent requests were never batched together"
    in_one = client.post("/v1/classify", params={"embedding": "true"}, files=files(images)).json()["results"]
    reference_p, reference_e = runtime.classify(images[0], return_embedding=True)
    for (p_alone, e_alone), (p_together, e_together), row in zip(alone, together, in_one, strict=True):
        np.testing.assert_allclose(p_together, p_alone, atol=PROBABILITY_ATOL)
        np.testing.assert_allclose(row["probabilities"], p_alone, atol=PROBABILITY_ATOL)
        assert cosine_min(e_together[None], e_alone[None]) >= EMBEDDING_COSINE_MIN
        assert cosine_min(np.array([row["embedding"]], np.float32), e_alone[None]) >= EMBEDDING_COSINE_MIN
    np.testing.assert_allclose(alone[0][0], reference_p[0], atol=PROBABILITY_ATOL)


def _batch_count(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        "batches": float(re.search(r"^pvt_batch_size_count (\S+)$", text, re.M).group(1)),
        "rows": float(re.search(r"^pvt_batch_size_sum (\S+)$", text, re.M).group(1)),
    }


# ----- KServe v2 through tritonclient -------------------------------------------------------------------------------


def test_v2_protocol_through_tritonclient(server: Server, runtime: Runtime, photo_paths: list[Path]) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    name = MODEL_NAME
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["inputs"][0]["shape"] == [-1, 3, *runtime.metadata["preprocess"]["size"]]
    tensor = runtime.preprocess(photo_paths[:3])
    probabilities, embedding = runtime.classify(tensor, return_embedding=True)
    for binary in (True, False):
        request = triton.InferInput("input", list(tensor.shape), "FP32")
        request.set_data_from_numpy(tensor, binary_data=binary)
        outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary),
                   triton.InferRequestedOutput("embedding", binary_data=not binary)]  # fmt: skip
        result = client.infer(name, [request], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=PROBABILITY_ATOL)
        assert cosine_min(result.as_numpy("embedding"), embedding) >= EMBEDDING_COSINE_MIN
    wrong = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException, match="input shape must be"):
        client.infer(name, [wrong])
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")


# ----- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_count_routes_statuses_and_batches(client: httpx.Client, photo_paths: list[Path]) -> None:
    client.post("/v1/predict", files=files(photo_paths[:1]))
    client.post("/v1/predict", content=b"not an image", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert re.search(r'^pvt_requests_total\{route="/v1/predict",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^pvt_requests_total\{route="/v1/predict",status="422"\} [1-9]', text, re.M)
    assert re.search(r'^pvt_request_latency_seconds_count\{route="/v1/predict"\} [1-9]', text, re.M)
    assert re.search(r"^pvt_batch_size_bucket\{le=", text, re.M)
    assert re.search(r"^pvt_queue_depth 0\.0$", text, re.M)


# ----- every answer says what it is (issue 18) -------------------------------------------------------------------


def _v2_infer_body(runtime: Runtime, photo: Path) -> dict:
    tensor = runtime.preprocess([photo])
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(tensor.shape),
                        "data": tensor.reshape(-1).tolist()}]}  # fmt: skip


def test_every_answer_says_whether_the_weights_are_untrained(
    client: httpx.Client, runtime: Runtime, photo_paths: list[Path]
) -> None:
    for path, params in [("/v1/predict", {}), ("/v1/classify", {}), ("/v1/embed", {}),
                         ("/v1/features", {"format": "heatmap"})]:  # fmt: skip
        response = client.post(path, params=params, files=files(photo_paths[:1]))
        assert response.status_code == 200, response.text
        assert response.json()["untrained"] is False, path
        assert response.headers["pvt-untrained"] == "false", path
    for path, accept in [("/v1/embed", "application/x-npy"), ("/v1/features", "*/*")]:
        binary = client.post(path, files=files(photo_paths[:1]), headers={"accept": accept})
        assert binary.status_code == 200 and binary.headers["pvt-untrained"] == "false", path
    v2 = client.post(f"/v2/models/{MODEL_NAME}/infer", json=_v2_infer_body(runtime, photo_paths[0]))
    assert v2.status_code == 200, v2.text
    assert v2.json()["parameters"] == {"untrained": False}


def test_untrained_folder_is_flagged_in_answers(model_dir: Path, tmp_path: Path, photo_paths: list[Path]) -> None:
    """A folder exported with random weights: the flag is true in JSON, in the header and in v2 parameters."""
    import asyncio

    from pvt_deploy.runtime.config import RuntimeConfig
    from pvt_deploy.serve.app import create_app
    from pvt_deploy.serve.settings import ServeSettings

    untrained_dir = Path(shutil.copytree(model_dir, tmp_path / "untrained"))
    manifest = json.loads((untrained_dir / "manifest.json").read_text())
    manifest["random_weights"] = True
    (untrained_dir / "manifest.json").write_text(json.dumps(manifest))
    settings = ServeSettings(untrained_dir, runtime=RuntimeConfig(device="cpu"))
    runtime = settings.open_runtime()
    app = create_app(runtime, settings)

    async def ask() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=60) as local:
            predicted = await local.post("/v1/predict", files=files(photo_paths[:1]))
            as_npy = await local.post(
                "/v1/embed", files=files(photo_paths[:1]), headers={"accept": "application/x-npy"}
            )
            v2 = await local.post(f"/v2/models/{MODEL_NAME}/infer", json=_v2_infer_body(runtime, photo_paths[0]))
            return predicted, as_npy, v2

    predicted, as_npy, v2 = asyncio.run(ask())
    assert predicted.json()["untrained"] is True and predicted.headers["pvt-untrained"] == "true"
    assert as_npy.headers["pvt-untrained"] == "true"
    assert v2.json()["parameters"] == {"untrained": True}


def test_model_publishes_the_preprocessing_contract(client: httpx.Client, model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    body = client.get("/v1/model").json()
    assert body["preprocess"] == manifest["input"]["preprocess"]
    assert body["preprocess"]["resize"]["to"]


def test_running_runtime_has_the_command_line_options(client: httpx.Client) -> None:
    """``--max-batch 8 --providers CPUExecutionProvider --spin-wait`` reach the Runtime and its loaded session."""
    runtime = client.get("/v1/model").json()["runtime"]
    assert runtime["batch_size"] == 8 and runtime["config"]["batch_size"] == 8
    assert runtime["config"]["spin_wait"] is True
    assert runtime["config"]["providers"] == ["CPUExecutionProvider"]
    assert runtime["session_providers"] == ["CPUExecutionProvider"]


def test_v2_metadata_has_fixed_output_dims(client: httpx.Client, runtime: Runtime, photo_paths: list[Path]) -> None:
    outputs = {o["name"]: o["shape"] for o in client.get(f"/v2/models/{MODEL_NAME}").json()["outputs"]}
    dim = runtime.embed(photo_paths[:1]).shape[1]
    assert outputs == {"probabilities": [-1, len(runtime.labels)], "embedding": [-1, dim]}


def test_unknown_v2_routes_answer_the_protocol_error_shape(client: httpx.Client) -> None:
    for method, path, status in [("GET", "/v2/no-such-route", 404), ("POST", f"/v2/models/{MODEL_NAME}/nope", 404),
                                 ("GET", f"/v2/models/{MODEL_NAME}/infer", 405)]:  # fmt: skip
        response = client.request(method, path)
        assert response.status_code == status, (path, response.text)
        assert set(response.json()) == {"error"}, response.text
    assert set(client.get("/v1/no-such-route").json()) == {"detail"}  # /v1 keeps FastAPI's shape


def test_wrong_model_name_is_404_after_reading_a_large_body(server: Server) -> None:
    """The 404 comes after the body is read: a client still sending does not get an answer (and a close) in the
    middle of its upload, which some clients report as a broken pipe instead of the 404."""
    import socket

    body = b"0" * (8 * 1024 * 1024)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            b"POST /v2/models/no-such-model/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        connection.settimeout(2)
        with pytest.raises(TimeoutError):
            early = connection.recv(65536)  # the old server answered here, half-way through the upload
            pytest.fail(f"answered before the body was read: {early[:200]!r}")
        connection.settimeout(60)
        connection.sendall(body[len(body) // 2 :])
        answer = b""
        while not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), answer[:300]
    assert "no-such-model" in json.loads(payload)["error"]


def test_multipart_error_names_the_item_once(client: httpx.Client, photo_paths: list[Path]) -> None:
    upload = [("image", ("good.png", photo_paths[0].read_bytes())), ("image", ("README.md", b"# not an image\n"))]
    response = client.post("/v1/predict", files=upload)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"index": 1, "item": "README.md", "reason": "not an image (unknown or unsupported format)"}
    ]


def test_metrics_count_docs_under_their_route(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    text = client.get("/metrics").text
    assert re.search(r'^pvt_requests_total\{route="/docs",status="200"\} [1-9]', text, re.M), text
    assert re.search(r'^pvt_requests_total\{route="/openapi.json",status="200"\} [1-9]', text, re.M), text


def test_docs_load_no_external_url(client: httpx.Client) -> None:
    """/docs works on an air-gapped host: Swagger UI's assets come from this server."""
    docs = client.get("/docs").text
    assert "SwaggerUIBundle" in docs
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", docs), "the docs page must load nothing external"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", docs)
    assert len(assets) >= 3
    for asset in assets:
        assert asset.startswith("/") and client.get(asset).status_code == 200, asset
    assert client.get("/docs/assets/..%2Fpage.py").status_code == 404


# ----- partial answers (issue 21) -----------------------------------------------------------------------------------


def test_on_error_collect_answers_every_item_in_order(
    client: httpx.Client, runtime: Runtime, photo_paths: list[Path]
) -> None:
    upload = [("image", ("a.png", photo_paths[0].read_bytes())), ("image", ("bad.jpg", b"not an image")),
              ("image", ("c.jpg", photo_paths[5].read_bytes()))]  # fmt: skip
    response = client.post("/v1/predict", params={"on_error": "collect", "top_k": 2}, files=upload)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["image"] for r in results] == ["a.png", "bad.jpg", "c.jpg"]
    assert results[1] == {"image": "bad.jpg", "index": 1, "error": "not an image (unknown or unsupported format)"}
    expected = runtime.predict([photo_paths[0], photo_paths[5]], top_k=2)
    assert [[p["label"] for p in results[i]["predictions"]] for i in (0, 2)] == [
        [label for label, _ in answer] for answer in expected
    ]
    embedded = client.post("/v1/embed", params={"on_error": "collect"}, files=upload,
                           headers={"accept": "application/x-npy"})  # fmt: skip
    assert embedded.status_code == 200 and embedded.headers["pvt-failed-items"] == "1"
    array = np.load(io.BytesIO(embedded.content))
    assert np.isnan(array[1]).all() and np.isfinite(array[[0, 2]]).all()
    assert cosine_min(array[[0, 2]], runtime.embed([photo_paths[0], photo_paths[5]])) >= EMBEDDING_COSINE_MIN
    all_bad = client.post("/v1/classify", params={"on_error": "collect"}, files=upload[1:2])
    assert all_bad.status_code == 200 and "error" in all_bad.json()["results"][0]
    assert client.post("/v1/predict", files=upload).status_code == 422  # the default stays all-or-nothing


# ----- malformed v2 requests (issue 20 item 7) ----------------------------------------------------------------------

_INPUT = {"name": "input", "datatype": "FP32", "data": [0.0]}
MALFORMED_V2 = {
    "shape of strings": json.dumps({"inputs": [{**_INPUT, "shape": ["abc", 3, 64, 64]}]}),
    "shape with null": json.dumps({"inputs": [{**_INPUT, "shape": [None, 3, 64, 64]}]}),
    "shape with a list": json.dumps({"inputs": [{**_INPUT, "shape": [[1], 3, 64, 64]}]}),
    "shape with a huge float": json.dumps({"inputs": [{**_INPUT, "shape": [1e308, 3, 64, 64]}]}),
    "shape with a boolean": json.dumps({"inputs": [{**_INPUT, "shape": [True, 3, 64, 64]}]}),
    "parameters not an object": json.dumps({"inputs": [{**_INPUT, "shape": [1, 3, 64, 64]}], "parameters": "x"}),
    "a list as the body": json.dumps([{"inputs": []}]),
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "inputs nested deep": '{"inputs": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "data of strings": json.dumps({"inputs": [{**_INPUT, "shape": [1, 3, 64, 64], "data": ["x"] * 12288}]}),
    "ragged data": json.dumps({"inputs": [{**_INPUT, "shape": [1, 3, 64, 64], "data": [[1.0], [1.0, 2.0]]}]}),
    "huge batch dim": json.dumps({"inputs": [{**_INPUT, "shape": [10**15, 3, 64, 64]}]}),
    "outputs not a list": json.dumps({"inputs": [{**_INPUT, "shape": [1, 3, 64, 64]}], "outputs": {"name": "x"}}),
    "not JSON": "{inputs",
}


@pytest.mark.parametrize("body", list(MALFORMED_V2.values()), ids=list(MALFORMED_V2))
def test_malformed_v2_request_is_400_with_the_protocol_error(client: httpx.Client, body: str) -> None:
    response = client.post(f"/v2/models/{MODEL_NAME}/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and response.json()["error"]
    assert client.get("/v2/health/live").status_code == 200
