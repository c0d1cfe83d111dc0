"""``predict``, ``embed`` (incl. ``--resume`` after an interruption), ``features`` and ``info`` on the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from pvt_deploy import Runtime
from pvt_deploy.cli import cli
from pvt_deploy.jobs.store import partial_dir, read_run_info
from tests.test_runtime import EXPECTED_REASON, bad_corpus


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Runtime:
    return Runtime(model_dir, device="cpu")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


# --- predict --------------------------------------------------------------------------------------------------------


def test_predict_text(model_dir: Path, runtime: Runtime, photo_paths: list[Path]) -> None:
    result = invoke("predict", model_dir, *photo_paths[:2], "--top-k", 2, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(photo_paths[0]) and lines[3] == str(photo_paths[1])
    (label, probability), _ = runtime.predict(photo_paths[0], top_k=2)[0]
    assert lines[1].split() == [f"{probability:.6f}", label]


def test_predict_json_with_bad_corpus(
    model_dir: Path, runtime: Runtime, photo_paths: list[Path], tmp_path: Path
) -> None:
    corpus = bad_corpus(tmp_path, photo_paths[5])
    images = [photo_paths[0], *corpus.values(), photo_paths[5]]
    result = invoke("predict", model_dir, *images, "--json", "--device", "cpu", "--batch-size", 2)
    assert result.exit_code == 4  # ImageError: some inputs failed
    records = json.loads(result.stdout)
    assert [r["image"] for r in records] == [str(p) for p in images]  # every input, in order
    assert "predictions" in records[0] and "predictions" in records[-1]
    expected = runtime.predict([photo_paths[0], photo_paths[5]])
    assert [(p["label"], p["probability"]) for p in records[0]["predictions"]] == expected[0]
    assert [(p["label"], p["probability"]) for p in records[-1]["predictions"]] == expected[1]
    for record, (kind, path) in zip(records[1:-1], corpus.items(), strict=True):
        assert EXPECTED_REASON[kind] in record["error"] and str(path) in record["error"]
    errors = error_lines(result)
    assert len(errors) == len(corpus) + 1  # one per bad input, then the summary
    for line, (kind, path) in zip(errors[:-1], corpus.items(), strict=True):
        assert str(path) in line and EXPECTED_REASON[kind] in line
    assert errors[-1] == f"Error: {len(corpus)} of {len(images)} inputs failed (listed above)"
    assert "Traceback" not in result.output


def test_predict_bad_model_dir_exit_codes(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    result = invoke("predict", tmp_path / "nope", photo_paths[0])
    assert result.exit_code == 5 and error_lines(result) == [f"Error: {tmp_path / 'nope'}: no such folder"]
    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    (broken / "classify.onnx").write_bytes(b"garbage")
    result = invoke("predict", broken, photo_paths[0], "--device", "cpu")
    assert result.exit_code == 5 and "checksum mismatch" in result.stderr
    result = invoke("predict", model_dir, photo_paths[0], "--precision", "int4", "--device", "cpu")
    assert result.exit_code == 5 and "int4" in result.stderr


# --- embed ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_tree(photo_paths: list[Path], tmp_path: Path) -> Path:
    """photos/ with a nested folder, upper-case extensions, a non-image file and two bad images."""
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    for i, photo in enumerate(photo_paths):
        target = root / ("nested" if i % 2 else "") / f"{i}_{photo.name}"
        shutil.copyfile(photo, target)
    shutil.copyfile(photo_paths[5], root / "nested" / "deeper" / "UPPER.JPG")
    (root / "notes.txt").write_text("not an image, and not picked up")
    (root / "nested" / "broken.jpg").write_text("not a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def _expected_inputs(root: Path) -> list[str]:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png")]
    return [str(p) for p in sorted(files, key=lambda p: p.as_posix())]


def test_embed_folder_recursively(model_dir: Path, runtime: Runtime, image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("embed", model_dir, image_tree, "--out", out, "--device", "cpu", "--chunk-size", 3)
    assert result.exit_code == 4, result.stderr  # two bad images
    inputs = _expected_inputs(image_tree)
    bad = {str(image_tree / "nested" / "broken.jpg"), str(image_tree / "empty.png")}
    paths = (out / "paths.txt").read_text().splitlines()
    assert paths == [p for p in inputs if p not in bad]
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (7, 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, runtime.embed(paths), atol=1e-6)
    errors = json.loads((out / "errors.json").read_text())
    assert {e["path"] for e in errors} == bad
    assert len(error_lines(result)) == 3
    run = json.loads((out / "run.json").read_text())
    assert run["rows"] == 7 and run["failed"] == 2 and run["inputs"] == 9
    assert not partial_dir(out).exists()


def test_embed_refuses_to_overwrite(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("embed", model_dir, photo_paths[0], "--out", out, "--device", "cpu").exit_code == 0
    before = (out / "embeddings.npy").read_bytes()
    result = invoke("embed", model_dir, *photo_paths[:2], "--out", out, "--device", "cpu")
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert (out / "embeddings.npy").read_bytes() == before
    result = invoke("embed", model_dir, *photo_paths[:2], "--out", out, "--device", "cpu", "--overwrite")
    assert result.exit_code == 0 and np.load(out / "embeddings.npy").shape == (2, 128)


def test_embed_resume_after_interruption(
    model_dir: Path, image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    invoke("embed", model_dir, image_tree, "--out", reference, "--device", "cpu", "--chunk-size", 3)

    calls: list[list[str]] = []
    original = Runtime.embed

    def interrupted(self: Runtime, images: list[str], **kwargs: object) -> object:
        if len(calls) == 2:  # Ctrl-C while computing the third chunk
            raise KeyboardInterrupt
        images = list(images)  # jobs pass a generator (progress moves as the runtime pulls each image)
        calls.append(images)
        return original(self, images, **kwargs)

    monkeypatch.setattr(Runtime, "embed", interrupted)
    out = tmp_path / "out"
    result = invoke("embed", model_dir, image_tree, "--out", out, "--device", "cpu", "--chunk-size", 3)
    assert result.exit_code == 130
    assert "interrupted after 6 of 9 inputs" in result.stderr and "--resume" in result.stderr
    assert not out.exists()  # nothing half-written where the result goes
    work = partial_dir(out)
    assert sorted(p.name for p in work.glob("part-*.json")) == ["part-000000.json", "part-000001.json"]
    (work / ".part-000002.npy.999.tmp").write_bytes(b"half a part")  # what a kill mid-write leaves

    result = invoke("embed", model_dir, image_tree, "--out", out, "--device", "cpu")
    assert result.exit_code == 1 and "--resume" in result.stderr  # never silently restarts or mixes runs

    monkeypatch.setattr(Runtime, "embed", original)
    resumed: list[list[str]] = []

    def counting(self: Runtime, images: list[str], **kwargs: object) -> object:
        images = list(images)
        resumed.append(images)
        return original(self, images, **kwargs)

    monkeypatch.setattr(Runtime, "embed", counting)
    result = invoke("embed", model_dir, image_tree, "--out", out, "--device", "cpu", "--resume")
    assert result.exit_code == 4, result.stderr  # the two bad images: one from before the interruption, one after
    assert "Resuming: 6 of 9 inputs already done" in result.stderr
    assert len(error_lines(result)) == 3  # both bad images, then the summary
    done_before = {p for chunk in calls for p in chunk}
    assert not done_before & {p for chunk in resumed for p in chunk}  # nothing recomputed
    for name in ("paths.txt", "errors.json"):
        assert (out / name).read_text() == (reference / name).read_text(), name
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), np.load(reference / "embeddings.npy"))
    assert not work.exists()


def test_embed_resume_rejects_changed_inputs(model_dir: Path, image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = partial_dir(out)
    work.mkdir()
    (work / "plan.json").write_text(json.dumps({"inputs": ["other.jpg"], "model": {}, "chunk_size": 3}))
    result = invoke("embed", model_dir, image_tree, "--out", out, "--device", "cpu", "--resume")
    assert result.exit_code == 1 and "holds a run with other" in result.stderr and "model" in result.stderr


def test_embed_missing_paths_are_reported_not_dropped(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("embed", model_dir, tmp_path / "missing.jpg", photo_paths[0], "--out", out, "--device", "cpu")
    assert result.exit_code == 4
    assert error_lines(result)[0] == f"Error: {tmp_path / 'missing.jpg'}: no such file"
    assert (out / "paths.txt").read_text().splitlines() == [str(photo_paths[0])]


# --- features, info -------------------------------------------------------------------------------------------------


def test_features_npz(model_dir: Path, runtime: Runtime, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "maps.npz"
    result = invoke("features", model_dir, photo_paths[3], "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    stored = np.load(out)
    expected = runtime.features(photo_paths[3])
    assert sorted(stored.files) == ["stage1", "stage2", "stage3", "stage4"]
    for name, value in expected.items():
        np.testing.assert_array_equal(stored[name], value)
    assert [p.name for p in tmp_path.iterdir()] == ["maps.npz"]  # no temp file left


def test_features_bad_image_writes_nothing(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "text.jpg").write_text("hello")
    out = tmp_path / "maps.npz"
    result = invoke("features", model_dir, tmp_path / "text.jpg", "--out", out, "--device", "cpu")
    assert result.exit_code == 4 and "not an image" in result.stderr and not out.exists()


def test_info(model_dir: Path, tmp_path: Path) -> None:
    result = invoke("info", model_dir)
    assert result.exit_code == 0, result.stderr
    assert "classes:    10 (labels: 10)" in result.stdout
    assert "checksums:  OK (7 files)" in result.stdout  # 3 graphs, 2 image graphs, weights.bin, labels.txt
    assert "graph:      classify [fp32] classify.onnx" in result.stdout
    assert "input[batchx3x64x64] float32" in result.stdout
    # the image-input graphs other languages call are listed too
    assert "graph:      classify [image input] classify.image.onnx" in result.stdout
    assert "graph:      embed [image input] embed.image.onnx" in result.stdout
    assert "image[heightxwidthxchannels] uint8" in result.stdout
    summary = json.loads(invoke("info", model_dir, "--json").stdout)
    assert summary["precisions"] == ["fp32"] and summary["checksums_ok"] is True
    assert {g: e["file"] for g, e in summary["image_graphs"].items()} == {
        "classify": "classify.image.onnx",
        "embed": "embed.image.onnx",
    }

    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    (broken / "weights.bin").write_bytes(b"\0" * 10)
    result = invoke("info", broken)
    assert result.exit_code == 5
    assert "checksums:  FAILED weights.bin: checksum mismatch" in result.stdout
    assert error_lines(result) == [
        f"Error: {broken}: 1 file(s) fail the manifest check (weights.bin: checksum mismatch)"
    ]


def test_embed_with_no_images_found(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty_folder").mkdir()
    result = invoke("embed", model_dir, tmp_path / "empty_folder", "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and "no images found" in result.stderr  # a usage mistake, not a failed input
    assert not (tmp_path / "out").exists()


def test_job_store_keeps_only_whole_parts(tmp_path: Path) -> None:
    """A kill between a part's .npy and its .json (or mid-write) leaves that part to be recomputed, nothing more."""
    from pvt_deploy.jobs.store import JobStore, Part

    def row(index: int, path: str, error: str | None = None) -> dict:
        return {"index": index, "path": path, "status": "error" if error else "ok", "error": error}

    store = JobStore(tmp_path / "out")
    store.start({"chunk_size": 2}, ["a", "b", "c", "d"])
    store.write_part(
        Part(0, 0, 2, [row(0, "a"), row(1, "b", "b: bad")]), np.array([[1, 1, 1], [np.nan] * 3], np.float32)
    )
    store.write_part(Part(1, 2, 4, [row(2, "c"), row(3, "d")]), np.zeros((2, 3), np.float32))
    (store.work / "part-000001.json").unlink()  # killed after the .npy, before the .json
    (store.work / ".part-000002.npy.1.tmp").write_bytes(b"partial")
    parts, changed = store.completed_parts()
    assert changed is None
    assert [(p.index, p.start, p.stop, [r["path"] for r in p.rows]) for p in parts] == [(0, 0, 2, ["a", "b"])]
    assert sorted(p.name for p in store.work.iterdir()) == [
        "inputs.txt",
        "part-000000.json",
        "part-000000.npy",
        "plan.json",
    ]
    assert store.plan()["chunk_size"] == 2
    store.write_part(Part(1, 2, 4, [row(2, "c"), row(3, "d")]), np.zeros((2, 3), np.float32))
    out = store.finalize(store.completed_parts()[0], "npy", {"task": "embed"}, 3)
    assert (out / "paths.txt").read_text() == "a\nc\nd\n"
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    assert json.loads((out / "errors.json").read_text()) == [{"path": "b", "error": "b: bad"}]
    assert not store.work.exists()


# --- usage mistakes, row shape ----------------------------------------------------------------------------------------


def test_usage_mistakes_exit_2_with_one_error_line(model_dir: Path, tmp_path: Path) -> None:
    """No images at all, or a glob that matches nothing, is a usage mistake (2), not "some inputs failed" (4)."""
    result = invoke("predict", model_dir, "--device", "cpu")
    assert result.exit_code == 2 and len(error_lines(result)) == 1 and "no images found" in result.stderr
    result = invoke("predict", model_dir, tmp_path / "*.jpg", "--device", "cpu")
    assert result.exit_code == 2
    assert error_lines(result) == [f"Error: {tmp_path / '*.jpg'}: no files match this pattern"]


def test_spin_wait_reaches_the_runtime_and_the_run_metadata(
    model_dir: Path, photo_paths: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "e.jsonl"
    result = invoke("embed", model_dir, str(photo_paths[0]), "--out", out, "--threads", "2", "--spin-wait", "-q")
    assert result.exit_code == 0, result.output
    info = read_run_info(out)
    assert info is not None and info["runtime"]["spin_wait"] is True and info["runtime"]["threads"] == 2


def test_json_predictions_have_the_http_row_shape(model_dir: Path, runtime: Runtime, photo_paths: list[Path]) -> None:
    """``{"label", "index", "probability"}`` as ``/v1/predict`` answers; -k above the class count gives every class
    (operations.top_k, no clamping in the CLI)."""
    result = invoke("predict", model_dir, photo_paths[0], "--json", "--device", "cpu", "-k", 50)
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    predictions = record["predictions"]
    assert len(predictions) == len(runtime.labels) == 10
    assert all(list(p) == ["label", "index", "probability"] for p in predictions)
    assert all(runtime.labels[p["index"]] == p["label"] for p in predictions)
    assert [(p["label"], p["probability"]) for p in predictions] == runtime.predict(photo_paths[0], top_k=10)[0]
