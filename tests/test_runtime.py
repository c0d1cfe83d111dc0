"""Runtime API: input kinds, outputs, per-item errors, checksums, the optimized-graph cache, threads, devices."""

from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pvt_deploy import Runtime
from pvt_deploy.errors import ImageError, ModelDirError
from pvt_deploy.format.manifest import load_manifest
from pvt_deploy.preprocess import preprocess
from pvt_deploy.runtime import BatchResult, DeviceError, sessions
from pvt_deploy.runtime.config import RuntimeConfig

# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Runtime:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Runtime(model_dir, device="cpu")


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data does not matter: it is refused first)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def bad_corpus(folder: Path, photo: Path) -> dict[str, Path]:
    """Bad inputs of each kind, as files: empty, not an image, truncated, a decompression bomb, a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    jpeg = photo.read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "bomb.png").write_bytes(png_claiming_size(30_000, 30_000))
    (folder / "a_folder.jpg").mkdir(exist_ok=True)
    return {
        "missing": folder / "missing.jpg",
        "folder": folder / "a_folder.jpg",
        "empty": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
        "text": folder / "text.jpg",
        "bomb": folder / "bomb.png",
    }


EXPECTED_REASON = {
    "missing": "no such file",
    "folder": "is a folder",
    "empty": "empty file",
    "truncated": "truncated",
    "text": "not an image",
    "bomb": "decompression bomb",
}


# --- outputs --------------------------------------------------------------------------------------------------------


def test_outputs_shapes_and_dtypes(runtime: Runtime, photo_paths: list[Path]) -> None:
    probabilities, embedding = runtime.classify(photo_paths, return_embedding=True)
    assert probabilities.shape == (6, 10) and probabilities.dtype == np.float32
    assert embedding.shape == (6, 128) and embedding.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert runtime.embed(photo_paths).shape == (6, 128)
    features = runtime.features(photo_paths[:2])
    assert {k: v.shape for k, v in features.items()} == {
        "stage1": (2, 16, 16, 16),
        "stage2": (2, 32, 8, 8),
        "stage3": (2, 80, 4, 4),
        "stage4": (2, 128, 2, 2),
    }
    assert all(v.dtype == np.float32 for v in features.values())


def test_embed_graph_matches_classify_embedding(runtime: Runtime, photo_paths: list[Path]) -> None:
    _, embedding = runtime.classify(photo_paths, return_embedding=True)
    np.testing.assert_allclose(runtime.embed(photo_paths), embedding, atol=1e-5)


def test_predict_is_sorted_top_k_of_classify(runtime: Runtime, photo_paths: list[Path]) -> None:
    probabilities = runtime.classify(photo_paths)
    answers = runtime.predict(photo_paths, top_k=3)
    assert len(answers) == 6
    for row, answer in zip(probabilities, answers, strict=True):
        assert len(answer) == 3
        assert [label for label, _ in answer] == [runtime.labels[i] for i in np.argsort(-row, kind="stable")[:3]]
        assert [p for _, p in answer] == sorted((p for _, p in answer), reverse=True)
        assert answer[0][1] == pytest.approx(float(row.max()))


def test_labels_and_metadata(runtime: Runtime, model_dir: Path) -> None:
    assert runtime.labels == [f"class_{i}" for i in range(10)]
    metadata = runtime.metadata
    assert metadata["manifest"]["num_classes"] == 10
    assert metadata["preprocess"]["size"] == [64, 64]
    assert metadata["preprocess"]["rgb_stats"] == load_manifest(model_dir).to_json()["input"]["rgb_stats"]
    assert metadata["device"] == "cpu" and metadata["precision"] == "fp32"


def test_every_input_kind_gives_the_same_answer(runtime: Runtime, photo_paths: list[Path]) -> None:
    path = photo_paths[5]  # rocket.jpg, RGB
    expected = runtime.classify(path)
    data = path.read_bytes()
    with Image.open(path) as opened:
        pil = opened.convert("RGB")
    kinds = {
        "str": str(path),
        "bytes": data,
        "bytearray": bytearray(data),
        "file object": io.BytesIO(data),
        "PIL": pil,
        "uint8 array": np.asarray(pil),
        "preprocessed NCHW": runtime.preprocess(path),
        "list of one": [path],
        "generator": (p for p in [path]),
    }
    for name, images in kinds.items():
        np.testing.assert_array_equal(runtime.classify(images), expected, err_msg=name)
    assert expected.shape == (1, 10)


def test_preprocess_is_the_models_own(runtime: Runtime, photo_paths: list[Path], model_dir: Path) -> None:
    section = load_manifest(model_dir).to_json()["input"]
    expected = preprocess(photo_paths, section["size"], section["rgb_stats"])
    np.testing.assert_array_equal(runtime.preprocess(photo_paths), expected)


def test_preprocessed_batch_rows_are_items(runtime: Runtime, photo_paths: list[Path]) -> None:
    batch = runtime.preprocess(photo_paths)
    np.testing.assert_allclose(runtime.classify(batch), runtime.classify(photo_paths), atol=1e-6)


def test_micro_batch_size_does_not_change_answers(model_dir: Path, photo_paths: list[Path]) -> None:
    one = Runtime(model_dir, device="cpu", batch_size=1).classify(photo_paths * 2)
    four = Runtime(model_dir, device="cpu", batch_size=4).classify(photo_paths * 2)
    np.testing.assert_allclose(one, four, atol=1e-6)


def test_empty_input_gives_empty_outputs(runtime: Runtime) -> None:
    assert runtime.classify([]).shape == (0, 10)
    assert runtime.embed([]).shape == (0, 128)
    assert runtime.predict([]) == []


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_corpus_raises_per_item(runtime: Runtime, photo_paths: list[Path], tmp_path: Path) -> None:
    for kind, path in bad_corpus(tmp_path, photo_paths[5]).items():
        with pytest.raises(ImageError, match=EXPECTED_REASON[kind]) as caught:
            runtime.classify([photo_paths[0], path])
        assert "image 1" in str(caught.value) and path.name in str(caught.value)


def test_collect_keeps_good_answers_aligned(runtime: Runtime, photo_paths: list[Path], tmp_path: Path) -> None:
    corpus = bad_corpus(tmp_path, photo_paths[5])
    good = photo_paths
    mixed: list[object] = []
    for i, path in enumerate(good):
        mixed.append(path)
        mixed.append(list(corpus.values())[i])
    result = runtime.classify(mixed, return_embedding=True, on_error="collect")
    assert isinstance(result, BatchResult)
    assert result.ok.tolist() == [True, False] * 6
    assert [e.index for e in result.errors] == list(range(1, 12, 2))
    for error, kind in zip(result.errors, corpus, strict=True):
        assert EXPECTED_REASON[kind] in error.message
    probabilities, embedding = result.value
    expected_p, expected_e = runtime.classify(good, return_embedding=True)
    np.testing.assert_allclose(probabilities[0::2], expected_p, atol=1e-6)
    np.testing.assert_allclose(embedding[0::2], expected_e, atol=1e-6)
    assert np.isnan(probabilities[1::2]).all()
    np.testing.assert_allclose(result.good()[0], expected_p, atol=1e-6)

    predicted = runtime.predict(mixed, top_k=2, on_error="collect")
    assert predicted.value[1::2] == [None] * 6
    assert all(answer is not None for answer in predicted.value[0::2])


def test_collect_with_every_input_bad_still_has_shapes(runtime: Runtime, tmp_path: Path) -> None:
    result = runtime.features([tmp_path / "nope.png"], on_error="collect")
    assert result.ok.tolist() == [False]
    assert result.value["stage4"].shape == (1, 128, 2, 2)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((1, 3, 32, 32), np.float32), "this model takes 64x64"),
        (np.zeros((1, 3, 64, 64), np.float64), "must be float32"),
        (np.zeros((1, 4, 64, 64), np.float32), "3 channels"),
        (np.full((1, 3, 64, 64), np.nan, np.float32), "NaN"),
        (np.zeros((64, 64, 2), np.uint8), "HxWx3"),
        (np.zeros((64, 64, 3), np.int32), "uint8"),
        (np.zeros((2, 2, 3, 64, 64), np.float32), "NCHW"),
    ],
)
def test_bad_arrays_are_clear_errors(runtime: Runtime, array: np.ndarray, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        runtime.classify(array)
    result = runtime.classify([array, np.zeros((64, 64, 3), np.uint8)], on_error="collect")
    assert result.ok.tolist() == [False, True]


def test_bad_arguments(model_dir: Path, runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="device"):
        Runtime(model_dir, device="tpu")
    with pytest.raises(ValueError, match="on_error"):
        runtime.classify([], on_error="ignore")
    with pytest.raises(ValueError, match="top_k"):
        runtime.predict([], top_k=0)
    with pytest.raises(ModelDirError, match="precision 'int4'"):
        Runtime(model_dir, device="cpu", precision="int4")
    with pytest.raises(ModelDirError, match="no such folder"):
        Runtime(model_dir / "nope", device="cpu")


# --- the model folder -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["classify.onnx", "weights.bin"])
def test_corrupted_graph_is_a_model_dir_error(tiny_export_dir: Path, tmp_path: Path, victim: str) -> None:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    path = folder / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: still loadable, wrong answers if not caught
    path.write_bytes(bytes(data))
    runtime = Runtime(folder, device="cpu")
    with pytest.raises(ModelDirError, match=f"{victim}: checksum mismatch"):
        runtime.classify(np.zeros((64, 64, 3), np.uint8))


def test_missing_graph_is_a_model_dir_error(tiny_export_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    (folder / "features.onnx").unlink()
    runtime = Runtime(folder, device="cpu")
    runtime.classify(np.zeros((64, 64, 3), np.uint8))  # other graphs still work
    with pytest.raises(ModelDirError, match="features.onnx is listed in manifest.json but missing"):
        runtime.features(np.zeros((64, 64, 3), np.uint8))


def test_no_optimized_graph_cache_is_written_or_read(
    tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    """No optimized graph is saved (it would not pay for itself, docs/runtime.md): nothing is written into the
    folder, and an ``.ort-cache/`` found in it (here: a poisoned one) is never read."""
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    before = sorted(p.name for p in folder.iterdir())
    expected = Runtime(folder, device="cpu").classify(photo_paths)
    assert sorted(p.name for p in folder.iterdir()) == before
    poisoned = folder / ".ort-cache" / "classify.0123456789abcdef.ort-cpu"
    poisoned.mkdir(parents=True)
    (poisoned / "model.onnx").write_bytes((folder / "embed.onnx").read_bytes())
    (poisoned / "record.json").write_text("{}")
    np.testing.assert_array_equal(Runtime(folder, device="cpu").classify(photo_paths), expected)


# --- devices, threads -----------------------------------------------------------------------------------------------


def test_auto_on_a_machine_without_gpu_is_silent(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "nvidia_device_present", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        runtime = Runtime(model_dir, device="auto")
    assert runtime.active_device == "cpu"


def test_auto_warns_once_when_a_gpu_is_present_but_unusable(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "nvidia_device_present", lambda: True)
    monkeypatch.setattr(sessions, "cuda_provider_listed", lambda: False)
    monkeypatch.setattr(sessions, "_warned", set())
    with pytest.warns(RuntimeWarning, match="using the CPU") as record:
        runtime = Runtime(model_dir, device="auto")
        Runtime(model_dir, device="auto")
    assert len([w for w in record if "using the CPU" in str(w.message)]) == 1
    assert runtime.active_device == "cpu"


def test_cuda_request_without_gpu_is_a_device_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if sessions.nvidia_device_present():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(sessions, "cuda_provider_listed", lambda: False)
    with pytest.raises(DeviceError, match="no CUDAExecutionProvider"):
        Runtime(model_dir, device="cuda")


def test_threads_option_reaches_the_session(model_dir: Path) -> None:
    runtime = Runtime(model_dir, device="cpu", threads=1)
    runtime.classify(np.zeros((64, 64, 3), np.uint8))
    assert runtime.session("classify").session.get_session_options().intra_op_num_threads == 1


def test_spin_wait_option_reaches_the_session(model_dir: Path) -> None:
    key = "session.intra_op.allow_spinning"
    answers = {}
    for spin_wait in (False, True):
        runtime = Runtime(model_dir, device="cpu", threads=2, spin_wait=spin_wait)
        answers[spin_wait] = runtime.classify(np.zeros((64, 64, 3), np.uint8))
        options = runtime.session("classify").session.get_session_options()
        assert options.get_session_config_entry(key) == ("1" if spin_wait else "0")
    np.testing.assert_array_equal(answers[False], answers[True])  # a scheduling choice, never a numeric one


def test_eight_threads_give_the_serial_results(model_dir: Path, photo_paths: list[Path]) -> None:
    runtime = Runtime(model_dir, device="cpu", batch_size=2)
    jobs = [photo_paths[i:] + photo_paths[:i] for i in range(6)] + [photo_paths[::-1], photo_paths[1::2]]
    serial = [(runtime.classify(job), runtime.embed(job), runtime.features(job)["stage2"]) for job in jobs]
    results: dict[int, list[tuple[np.ndarray, ...]]] = {}
    barrier = threading.Barrier(8)

    def work(worker: int) -> None:
        barrier.wait()
        results[worker] = []
        for _ in range(3):
            job = jobs[worker]
            results[worker].append((runtime.classify(job), runtime.embed(job), runtime.features(job)["stage2"]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(8))
    for worker, runs in results.items():
        for run in runs:
            for got, expected in zip(run, serial[worker], strict=True):
                np.testing.assert_array_equal(got, expected)


def test_sessions_are_created_once_under_concurrency(model_dir: Path) -> None:
    runtime = Runtime(model_dir, device="cpu")
    created: list[str] = []
    original = runtime._create_session

    def counting(graph: str, image: bool) -> sessions.GraphSession:
        created.append(graph)
        return original(graph, image)

    runtime._create_session = counting  # type: ignore[method-assign]
    threads = [threading.Thread(target=runtime.embed, args=(np.zeros((64, 64, 3), np.uint8),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert created == ["embed"]


def test_io_binding_path_equals_plain_run_on_cpu(runtime: Runtime, photo_paths: list[Path]) -> None:
    """The CUDA path's onnxruntime calls (OrtValue input, device-allocated outputs), run with device "cpu"."""
    session = runtime.session("features")
    batch = runtime.preprocess(photo_paths[:3])
    bound = session.run_io_binding(batch, session.output_names, device="cpu")
    plain = session.run_plain(batch)
    for name, value in zip(session.output_names, bound, strict=True):
        np.testing.assert_array_equal(value, plain[name])


def test_dynamic_size_export_takes_other_sizes(tiny_dynamic_export_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_dynamic_export_dir, tmp_path / "model"))
    runtime = Runtime(folder, device="cpu", batch_size=4)
    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    large = rng.standard_normal((1, 3, 96, 128)).astype(np.float32)
    mixed = runtime.classify([small, large, small])  # one size per micro-batch, rows stay in order
    np.testing.assert_allclose(mixed[0], runtime.classify(small)[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], runtime.classify(large)[0], atol=1e-6)
    np.testing.assert_allclose(mixed[2], mixed[0], atol=1e-6)
    assert runtime.features(large)["stage4"].shape == (1, 128, 3, 4)
    with pytest.raises(ImageError, match="multiple of 32"):
        runtime.classify(np.zeros((1, 3, 70, 64), np.float32))


def test_cuda_provider_that_fails_to_load(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without usable CUDA libraries (this machine): "cuda" is an error, "auto" warns and uses CPU."""
    if sessions.nvidia_device_present() or not sessions.cuda_provider_listed():
        pytest.skip("needs onnxruntime-gpu on a machine whose CUDA provider cannot start")
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(DeviceError, match="could not start its CUDA provider"):
        Runtime(model_dir, device="cuda").classify(image)
    monkeypatch.setattr(sessions, "nvidia_device_present", lambda: True)
    monkeypatch.setattr(sessions, "_warned", set())
    runtime = Runtime(model_dir, device="auto")
    with pytest.warns(RuntimeWarning, match="CUDA provider failed to load"):
        probabilities = runtime.classify(image)
    assert runtime.active_device == "cpu"
    np.testing.assert_array_equal(probabilities, Runtime(model_dir, device="cpu").classify(image))


def test_prepared_rows_are_checked_once(runtime: Runtime, photo_paths: list[Path], monkeypatch) -> None:
    """Rows a caller hands in are checked (dtype, size, NaN) once per run; rows the runtime itself decoded
    (``Runtime.prepare``) are not checked again inside the run, and give the same answers."""
    from pvt_deploy.preprocess import Preprocessor

    checked: list[tuple[int, ...]] = []
    original = Preprocessor.validate_preprocessed

    def counting(self: Preprocessor, array: np.ndarray) -> np.ndarray:
        checked.append(array.shape)
        return original(self, array)

    monkeypatch.setattr(Preprocessor, "validate_preprocessed", counting)
    prepared = runtime.prepare(photo_paths[:3])
    assert checked == []  # decoding makes valid rows; nothing to check
    from_prepared = runtime.classify(prepared)
    assert checked == []
    from_floats = runtime.classify(prepared.rows)
    assert len(checked) == 3  # a caller's own float rows: checked once each
    np.testing.assert_array_equal(from_prepared, from_floats)
    two = type(prepared).concat([prepared, runtime.prepare(photo_paths[3])])
    assert len(two) == 4 and np.array_equal(runtime.embed(two)[:3], runtime.embed(prepared))


def test_describe_is_the_one_published_description(model_dir: Path) -> None:
    """What services publish about a folder: identity, labels, input, the contract as manifest.json holds it,
    graphs and image graphs, and the whole run configuration (so a worker built from it runs the same)."""
    runtime = Runtime(model_dir, device="cpu", batch_size=3)
    described = runtime.describe()
    document = load_manifest(model_dir).to_json()
    assert described["random_weights"] is document["random_weights"] is False
    assert described["network"] == document["network"] and described["labels"] == document["labels"]
    assert described["input"] == {"name": "input", "size": [64, 64], "dynamic_size": False}
    assert described["preprocess"] == document["input"]["preprocess"]
    assert set(described["image_graphs"]) == {"classify", "embed"}
    assert described["image_graphs"]["embed"] == {"file": "embed.image.onnx", "outputs": ["embedding"]}
    assert described["batch_size"] == 3 and described["config"]["batch_size"] == 3
    assert Runtime(model_dir, config=RuntimeConfig.from_json(described["config"])).config == runtime.config
    json.dumps(described)  # plain JSON
