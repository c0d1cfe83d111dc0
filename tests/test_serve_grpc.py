"""``pvt-deploy serve --grpc-port``: the Open Inference Protocol over gRPC, driven by ``tritonclient.grpc`` against
real servers on 127.0.0.1 (torch blocked in them), and ``--instances``.

Answers are checked against in-process ``Runtime.classify`` on the same preprocessed tensors."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from pvt_deploy import Runtime
from pvt_deploy.serve.batching import DynamicBatcher
from pvt_deploy.serve.instances import (
    SERVE_THREADS_PER_INSTANCE,
    PooledBatcher,
    batcher_for,
    default_instances,
    serve_threads,
)
from tests.test_serve import MODEL_NAME, Server, modules_loaded_by, run_serve, start_server, torch_free_env

EXACT_ATOL = 1e-6  # the bound: the same tensor through the same session, batched or not
KEY_VARIABLE = "PVT_DEPLOY_TEST_GRPC_KEY"
KEY = "grpc-s3cret"


def grpc_target(server: Server) -> str:
    """The ``HOST:PORT`` the server's log says gRPC listens on (``--grpc-port 0`` picks a free port)."""
    for line in server.log:
        match = re.search(r"gRPC \(Open Inference Protocol\) running on (127\.0\.0\.1:\d+)", line)
        if match:
            return match.group(1)
    raise AssertionError("no gRPC line in the server log:\n" + "".join(server.log))


def input_tensor(pixels: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("input", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    return tensor


def status_of(call: object) -> grpc.StatusCode:
    """The gRPC status code a tritonclient call failed with."""
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    status = caught.value.status()
    return getattr(grpc.StatusCode, status.removeprefix("StatusCode."))


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Runtime:
    return Runtime(model_dir, device="cpu")


@pytest.fixture(scope="module")
def pixels(runtime: Runtime, photo_paths: list[Path]) -> np.ndarray:
    return runtime.preprocess(photo_paths[:3])


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """HTTP + gRPC, two instances on one-thread sessions, batching up to 8 rows."""
    options = ["--grpc-port", "0", "--instances", "2", "--threads", "1", "--max-batch", "8", "--max-wait-ms", "30"]
    running = start_server(model_dir, tmp_path_factory.mktemp("server"), *options)
    yield running
    assert running.stop() == 0, "".join(running.log)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(grpc_target(server)) as grpc_client:
        yield grpc_client


@pytest.fixture(scope="module")
def guarded(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An API key, a queue of 2 images, and a folder whose manifest says the weights are untrained."""
    folder = tmp_path_factory.mktemp("guarded")
    model = Path(shutil.copytree(tiny_export_dir, folder / "model"))
    manifest_path = model / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["random_weights"] = True
    manifest_path.write_text(json.dumps(manifest, indent=2))
    env = torch_free_env(folder)
    env[KEY_VARIABLE] = KEY
    running = start_server(
        model, folder, "--grpc-port", "0", "--max-queue", "2", "--api-key-env", KEY_VARIABLE, env=env
    )
    yield running
    assert running.stop() == 0, "".join(running.log)


# ----- the protocol -------------------------------------------------------------------------------------------------


def test_infer_equals_runtime_classify(
    client: triton.InferenceServerClient, runtime: Runtime, pixels: np.ndarray
) -> None:
    """Binary FP32 in (raw_input_contents), probabilities and embedding out, equal to in-process Runtime."""
    result = client.infer(MODEL_NAME, [input_tensor(pixels)], request_id="req-7")
    probabilities, embedding = runtime.classify(pixels, return_embedding=True)
    assert result.as_numpy("probabilities").shape == probabilities.shape
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=0, atol=EXACT_ATOL)
    np.testing.assert_allclose(result.as_numpy("embedding"), embedding, rtol=0, atol=EXACT_ATOL)
    response = result.get_response()
    assert response.id == "req-7"
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 2  # binary out, not typed contents
    assert "untrained" in response.parameters and response.parameters["untrained"].bool_param is False


def test_requested_output_only(client: triton.InferenceServerClient, runtime: Runtime, pixels: np.ndarray) -> None:
    result = client.infer(MODEL_NAME, [input_tensor(pixels[:1])], outputs=[triton.InferRequestedOutput("embedding")])
    assert [output.name for output in result.get_response().outputs] == ["embedding"]
    assert result.as_numpy("probabilities") is None
    _, embedding = runtime.classify(pixels[:1], return_embedding=True)
    np.testing.assert_allclose(result.as_numpy("embedding"), embedding, rtol=0, atol=EXACT_ATOL)


def test_concurrent_calls_through_two_instances_equal_runtime(
    server: Server, client: triton.InferenceServerClient, runtime: Runtime, pixels: np.ndarray
) -> None:
    """12 concurrent one-image calls through two instances: every answer equals its own in-process answer."""
    rows = np.concatenate([pixels] * 4)
    expected = runtime.classify(rows)

    def one(index: int) -> np.ndarray:
        return client.infer(MODEL_NAME, [input_tensor(rows[index : index + 1])]).as_numpy("probabilities")[0]

    with ThreadPoolExecutor(12) as pool:
        answers = np.stack(list(pool.map(one, range(len(rows)))))
    np.testing.assert_allclose(answers, expected, rtol=0, atol=EXACT_ATOL)
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    counted = re.search(r'pvt_grpc_requests_total\{code="OK",method="ModelInfer"\} (\S+)', metrics)
    assert counted and float(counted.group(1)) >= len(rows)


def test_health_and_metadata(client: triton.InferenceServerClient, runtime: Runtime, photo_paths: list[Path]) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME) and client.is_model_ready(MODEL_NAME, "1")
    assert client.get_server_metadata().name == "pvt-deploy"
    metadata = client.get_model_metadata(MODEL_NAME)
    height, width = runtime.metadata["preprocess"]["size"]
    assert metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 3, height, width])]
    assert [t.name for t in metadata.outputs] == ["probabilities", "embedding"]
    assert list(metadata.outputs[0].shape) == [-1, len(runtime.labels)]
    embedding_dim = runtime.embed(runtime.preprocess(photo_paths[:1])).shape[1]
    assert list(metadata.outputs[1].shape) == [-1, embedding_dim]  # fixed, as v2 REST's metadata gives it


def test_bad_requests_get_status_codes_and_the_server_stays_up(
    server: Server, client: triton.InferenceServerClient, pixels: np.ndarray
) -> None:
    wrong_size = np.zeros((1, 3, 32, 32), dtype=np.float32)
    assert status_of(lambda: client.infer(MODEL_NAME, [input_tensor(wrong_size)])) == grpc.StatusCode.INVALID_ARGUMENT
    three_d = pixels[0]
    assert status_of(lambda: client.infer(MODEL_NAME, [input_tensor(three_d)])) == grpc.StatusCode.INVALID_ARGUMENT
    as_fp64 = input_tensor(pixels[:1].astype(np.float64), "FP64")
    assert status_of(lambda: client.infer(MODEL_NAME, [as_fp64])) == grpc.StatusCode.INVALID_ARGUMENT
    with_nan = pixels[:1].copy()
    with_nan[0, 0, 0, 0] = np.nan
    assert status_of(lambda: client.infer(MODEL_NAME, [input_tensor(with_nan)])) == grpc.StatusCode.INVALID_ARGUMENT
    unknown_output = [triton.InferRequestedOutput("logits")]
    call = lambda: client.infer(MODEL_NAME, [input_tensor(pixels[:1])], outputs=unknown_output)  # noqa: E731
    assert status_of(call) == grpc.StatusCode.INVALID_ARGUMENT
    short = input_tensor(pixels[:1])
    short._raw_content = short._raw_content[:-4]  # a shape that promises more bytes than were sent
    assert status_of(lambda: client.infer(MODEL_NAME, [short])) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: client.infer("no_such_model", [input_tensor(pixels[:1])])) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: client.get_model_metadata(MODEL_NAME, "2")) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: client.is_model_ready("no_such_model")) == grpc.StatusCode.NOT_FOUND

    assert server.process.poll() is None
    assert client.infer(MODEL_NAME, [input_tensor(pixels[:1])]).as_numpy("probabilities").shape[0] == 1
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert re.search(r'pvt_grpc_requests_total\{code="INVALID_ARGUMENT",method="ModelInfer"\} [6-9]', metrics)


def test_api_key_queue_limit_and_untrained_flag(
    guarded: Server, tiny_export_dir: Path, photo_paths: list[Path]
) -> None:
    pixels = Runtime(tiny_export_dir, device="cpu").preprocess(photo_paths[:3])
    with triton.InferenceServerClient(grpc_target(guarded)) as client:
        assert client.is_server_live()  # probes need no key, as on HTTP
        missing = lambda: client.infer(MODEL_NAME, [input_tensor(pixels[:1])])  # noqa: E731
        assert status_of(missing) == grpc.StatusCode.UNAUTHENTICATED
        wrong = {"authorization": f"Bearer {KEY}x"}
        wrong_key = lambda: client.infer(MODEL_NAME, [input_tensor(pixels[:1])], headers=wrong)  # noqa: E731
        assert status_of(wrong_key) == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: client.get_model_metadata(MODEL_NAME)) == grpc.StatusCode.UNAUTHENTICATED

        key = {"authorization": f"Bearer {KEY}"}
        result = client.infer(MODEL_NAME, [input_tensor(pixels[:2])], headers=key)
        assert result.get_response().parameters["untrained"].bool_param is True
        over_queue = lambda: client.infer(MODEL_NAME, [input_tensor(pixels)], headers=key)  # noqa: E731
        assert status_of(over_queue) == grpc.StatusCode.RESOURCE_EXHAUSTED  # 3 images, --max-queue 2
        assert client.infer(MODEL_NAME, [input_tensor(pixels[:1])], headers=key).as_numpy("embedding") is not None
    assert guarded.process.poll() is None


def test_grpc_port_in_use_is_one_error_line(server: Server, model_dir: Path, tmp_path: Path) -> None:
    port = grpc_target(server).rsplit(":", 1)[1]
    done = run_serve([str(model_dir), "--port", "0", "--grpc-port", port], tmp_path)
    assert done.returncode == 13, done.stderr  # the service cannot listen
    assert done.stderr.startswith(f"Error: --grpc-port {port}: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr


def test_grpc_port_equal_to_http_port_is_refused(model_dir: Path, tmp_path: Path) -> None:
    done = run_serve([str(model_dir), "--port", "8123", "--grpc-port", "8123"], tmp_path)
    assert done.returncode == 2
    assert "--grpc-port must differ from --port" in done.stderr


def test_instances_refused_with_ray(model_dir: Path, tmp_path: Path) -> None:
    done = run_serve([str(model_dir), "--ray", "--instances", "2"], tmp_path)
    assert done.returncode == 2
    assert "--instances is for one uvicorn process; with --ray use --replicas" in done.stderr


def test_http_only_server_does_not_import_grpc(tmp_path: Path) -> None:
    """grpcio loads only with --grpc-port: the app, the CLI and the batcher stand without it."""
    imports = "import pvt_deploy.serve.app, pvt_deploy.cli.serve_cmds, pvt_deploy.serve.instances"
    loaded = modules_loaded_by(imports, tmp_path)
    assert [m for m in loaded if m.split(".")[0] == "grpc" or m.startswith("pvt_deploy.serve.protos")] == []


def test_stubs_load_beside_tritonclient() -> None:
    """Both define ``inference.*`` messages; ours live in a private descriptor pool, so one process holds both and
    their bytes are interchangeable."""
    from tritonclient.grpc import service_pb2 as triton_messages

    from pvt_deploy.serve.protos import grpc_predict_v2_pb2 as ours

    request = ours.ModelInferRequest(model_name="m", id="x", raw_input_contents=[b"\x00\x00\x80?"])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1])
    request.parameters["p"].int64_param = 3
    decoded = triton_messages.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded.inputs[0].shape == [1, 1] and decoded.parameters["p"].int64_param == 3
    assert ours.ModelInferRequest.FromString(decoded.SerializeToString()) == request


# ----- instances ----------------------------------------------------------------------------------------------------


def test_serve_defaults_to_one_single_threaded_instance_per_cpu() -> None:
    """Neither --threads nor --instances: 1 thread per session, so default_instances gives one per CPU (the faster
    layout measured on b2); either option given keeps the user's choice."""
    assert serve_threads(None, None) == SERVE_THREADS_PER_INSTANCE == 1
    assert default_instances(2, serve_threads(None, None)) == 2
    assert serve_threads(2, None) == 2
    assert serve_threads(None, 3) is None


def test_default_instances_follow_cpus_and_threads() -> None:
    assert default_instances(8, 2) == 4
    assert default_instances(2, 1) == 2
    assert default_instances(2, 2) == 1
    assert default_instances(2, 4) == 1
    assert default_instances(16, None) == 1  # onnxruntime's own pool already spans the cores
    assert default_instances(None, 1) == 1


class _OverlapRuntime:
    """A stand-in ``Runtime`` whose classify returns only once ``parties`` calls are inside it at the same time."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=30)
        self.threads: set[str] = set()

    def classify(self, rows: np.ndarray, return_embedding: bool = False) -> tuple[np.ndarray, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()  # BrokenBarrierError if the batches ran one after the other
        return rows.reshape(len(rows), -1)[:, :2] * 2, rows.reshape(len(rows), -1)[:, :1]


def test_pooled_batcher_runs_instances_at_once_and_keeps_rows_in_order() -> None:
    fake = _OverlapRuntime(parties=2)
    batcher = PooledBatcher(fake, instances=2, max_batch=1, max_wait_ms=0)  # type: ignore[arg-type]

    async def main() -> list[dict[str, np.ndarray]]:
        try:
            return await asyncio.gather(
                *(batcher.run("classify", np.full((1, 3), float(i), dtype=np.float32)) for i in range(4))
            )
        finally:
            await batcher.close()

    answers = asyncio.run(main())
    assert [float(answer["probabilities"][0, 0]) for answer in answers] == [0.0, 2.0, 4.0, 6.0]
    assert len(fake.threads) == 2


def test_batcher_for_picks_the_pool_only_for_several_instances(runtime: Runtime) -> None:
    assert type(batcher_for(runtime, 1, 8, 5.0)) is DynamicBatcher
    pooled = batcher_for(runtime, 3, 8, 5.0)
    assert isinstance(pooled, PooledBatcher) and pooled.instances == 3


# ----- Ray Serve's gRPC proxy ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_serve_grpc_proxy_answers_like_runtime(model_dir: Path, runtime: Runtime, pixels: np.ndarray) -> None:
    """Ray Serve's own gRPC proxy, one replica with the v2 methods: tritonclient.grpc gets Runtime's answers, and
    the same status codes as the uvicorn server."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from pvt_deploy.runtime.config import RuntimeConfig
    from pvt_deploy.serve.ray_app import DEPLOYMENT_NAME, PvtDeployment
    from pvt_deploy.serve.ray_grpc import grpc_options
    from pvt_deploy.serve.settings import ServeSettings
    from tests.test_serve_ray import _free_port

    http_port, grpc_port = _free_port(), _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, grpc_options=grpc_options(grpc_port, "::"))
        config = RuntimeConfig(device="cpu", threads=1, batch_size=8)
        settings = ServeSettings(model_dir, runtime=config, max_batch=8, max_wait_ms=5, api_key=KEY)
        deployment = PvtDeployment.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
        serve.run(deployment.bind(settings), name=DEPLOYMENT_NAME, route_prefix="/")
        key = {"authorization": f"Bearer {KEY}"}
        with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            assert client.is_server_live()
            result = client.infer(MODEL_NAME, [input_tensor(pixels)], headers=key)
            probabilities, embedding = runtime.classify(pixels, return_embedding=True)
            np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=0, atol=EXACT_ATOL)
            np.testing.assert_allclose(result.as_numpy("embedding"), embedding, rtol=0, atol=EXACT_ATOL)
            assert client.get_model_metadata(MODEL_NAME, headers=key).inputs[0].name == "input"
            missing_key = lambda: client.infer(MODEL_NAME, [input_tensor(pixels[:1])])  # noqa: E731
            assert status_of(missing_key) == grpc.StatusCode.UNAUTHENTICATED
            wrong_size = input_tensor(np.zeros((1, 3, 32, 32), dtype=np.float32))
            wrong = lambda: client.infer(MODEL_NAME, [wrong_size], headers=key)  # noqa: E731
            assert status_of(wrong) == grpc.StatusCode.INVALID_ARGUMENT
            assert client.infer(MODEL_NAME, [input_tensor(pixels[:1])], headers=key).as_numpy("embedding") is not None
    finally:
        serve.shutdown()
        ray.shutdown()
