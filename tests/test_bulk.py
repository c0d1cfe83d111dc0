"""Bulk jobs: every input form, every output format, failed rows kept, the lock, resume (also after SIGKILL,
bit-equal to an uninterrupted run), --normalize, and the Ray Data engine equal to the local one."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from pvt_deploy import Runtime
from pvt_deploy.cli import cli
from pvt_deploy.errors import ImageError, JobInterrupted, OutputError
from pvt_deploy.files import OutputLock
from pvt_deploy.jobs import (
    JobEvents,
    JobSpec,
    collect_inputs,
    prediction_record,
    read_run_info,
    run_job,
)
from pvt_deploy.jobs.store import partial_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(tiny_export_dir, tmp_path_factory.mktemp("bulk") / "model"))


@pytest.fixture(scope="module")
def runtime(model_dir: Path) -> Runtime:
    return Runtime(model_dir, device="cpu")


@pytest.fixture(scope="module")
def corpus(photo_paths: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos in nested folders, plus one undecodable file."""
    root = tmp_path_factory.mktemp("corpus")
    for index, photo in enumerate(photo_paths):
        folder = root / ("a" if index % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not listed: no image extension")
    return root


def invoke(*args: object, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, input=input)


def _walked(root: Path) -> list[str]:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".png")]
    return [str(p) for p in sorted(files, key=lambda p: p.as_posix())]


# --- inputs ---------------------------------------------------------------------------------------------------------


def test_inputs_from_folders_globs_lists_and_stdin(corpus: Path, tmp_path: Path) -> None:
    walked = _walked(corpus)
    assert collect_inputs([str(corpus)]) == walked
    assert collect_inputs([str(corpus / "**" / "*.png")]) == sorted(p for p in walked if p.endswith(".png"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{walked[0]}\n\n{tmp_path / 'missing.jpg'}\n")
    assert collect_inputs([], [str(listing)]) == [walked[0], str(tmp_path / "missing.jpg")]  # missing kept
    assert collect_inputs([walked[1]], ["-"], stdin=io.StringIO(walked[2] + "\n")) == [walked[1], walked[2]]
    with pytest.raises(ImageError, match="no files match this pattern"):
        collect_inputs([str(corpus / "*.jpeg")])


def test_predict_every_table_format_keeps_failed_rows(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    walked = _walked(corpus)
    for suffix in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"predict.{suffix}"
        result = invoke("predict", model_dir, corpus, "--out", out, "--device", "cpu", "-k", 3, "--chunk-size", 2)
        assert result.exit_code == 4, result.stderr  # one undecodable image, listed, the rest answered
        assert "broken.jpg: not an image" in result.stderr
        if suffix == "jsonl":
            rows = [json.loads(line) for line in out.read_text().splitlines()]
        elif suffix == "csv":
            rows = list(csv.DictReader(out.open()))
            for row in rows:
                row["labels"] = json.loads(row["labels"])
        else:
            rows = pq.read_table(out).to_pylist()
        assert [row["path"] for row in rows] == walked
        failed = [row for row in rows if row["status"] != "ok"]
        assert [row["path"] for row in failed] == [str(corpus / "b" / "broken.jpg")]
        assert all(len(row["labels"]) == 3 for row in rows if row["status"] == "ok")
        assert read_run_info(out)["complete"] is True and not partial_dir(out).exists()


def test_embed_parquet_jsonl_and_folder_agree(model_dir: Path, runtime: Runtime, corpus: Path, tmp_path: Path) -> None:
    walked = _walked(corpus)
    for out in (tmp_path / "e.parquet", tmp_path / "e.jsonl", tmp_path / "e"):
        assert invoke("embed", model_dir, corpus, "--out", out, "--device", "cpu", "--chunk-size", 3).exit_code == 4
    table = pq.read_table(tmp_path / "e.parquet")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[128]"
    rows = table.to_pylist()
    good = [row["path"] for row in rows if row["status"] == "ok"]
    expected = runtime.embed(good)
    from_parquet = np.array([row["embedding"] for row in rows if row["embedding"] is not None], np.float32)
    np.testing.assert_array_equal(from_parquet, expected)
    lines = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == walked
    np.testing.assert_array_equal(np.array([x["embedding"] for x in lines if x["embedding"]], np.float32), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "e" / "embeddings.npy"), expected)
    assert (tmp_path / "e" / "paths.txt").read_text().splitlines() == good


def test_embed_with_labels_normalized_and_recorded(model_dir: Path, runtime: Runtime, photo_paths: list[Path],
                                                   tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "e.parquet"
    result = invoke("embed", model_dir, *photo_paths, "--out", out, "--device", "cpu", "--normalize", "-k", 2)
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    vectors = np.array(table["embedding"].to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    raw = runtime.embed(photo_paths)
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert table["labels"].to_pylist()[0] == [label for label, _ in runtime.predict(photo_paths[0], top_k=2)[0]]
    info = read_run_info(out)
    assert info["options"]["normalize"] is True and info["exif_transpose"] is False


def test_features_folder(model_dir: Path, runtime: Runtime, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    result = invoke("features", model_dir, corpus, "--out", out, "--device", "cpu", "--chunk-size", 4)
    assert result.exit_code == 4
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["path"] for row in index] == _walked(corpus)
    first = next(row for row in index if row["status"] == "ok")
    stored = np.load(out / first["file"])
    np.testing.assert_array_equal(stored["stage4"], runtime.features(first["path"])["stage4"])
    assert next(row for row in index if row["status"] != "ok")["file"] is None


def test_features_npz_refuses_to_overwrite(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "maps.npz"
    out.write_bytes(b"mine")
    result = invoke("features", model_dir, photo_paths[0], "--out", out, "--device", "cpu")
    assert result.exit_code == 1 and "--overwrite" in result.stderr and out.read_bytes() == b"mine"
    missing = tmp_path / "nope.png"
    result = invoke("features", model_dir, missing, "--out", tmp_path / "m2.npz", "--device", "cpu")
    assert result.exit_code == 4
    assert [line for line in result.stderr.splitlines() if line.startswith("Error")] == [
        f"Error: {missing}: no such file"  # the path once, not twice
    ]


# --- resume, lock, interruption ---------------------------------------------------------------------------------------


def test_resume_of_a_finished_job_says_complete(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    assert invoke("predict", model_dir, *photo_paths, "--out", out, "--device", "cpu").exit_code == 0
    before = out.read_bytes()
    result = invoke("predict", model_dir, *photo_paths, "--out", out, "--device", "cpu", "--resume")
    assert result.exit_code == 0 and "already complete" in result.stderr and out.read_bytes() == before
    result = invoke("predict", model_dir, *photo_paths[:2], "--out", out, "--device", "cpu", "--resume")
    assert result.exit_code == 1 and "already exists" in result.stderr  # another job's output is not "complete"


def test_a_locked_output_is_refused(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "e.parquet"
    with OutputLock(out):
        result = invoke("embed", model_dir, *photo_paths, "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    assert f"another run (pid {os.getpid()}) is using {out}" in result.stderr
    assert not out.exists() and not partial_dir(out).exists()


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_equal(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    """A real process killed with SIGKILL mid-job leaves whole parts; --resume finishes to the same bytes."""
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in photo_paths * 4))  # 24 rows
    reference = tmp_path / "reference.parquet"
    command = [sys.executable, "-m", "pvt_deploy", "embed", str(model_dir), "--from-list", str(listing),
               "--device", "cpu", "--threads", "1", "--chunk-size", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([*command, "--out", str(reference)], env=env, capture_output=True).returncode == 0
    out = tmp_path / "killed.parquet"
    process = subprocess.Popen([*command, "--out", str(out)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (partial_dir(out) / "part-000002.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts = sorted(p.name for p in partial_dir(out).glob("part-*.json"))
    assert 3 <= len(parts) < 12 and not out.exists()
    resumed = subprocess.run([*command, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming:" in resumed.stderr
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert not partial_dir(out).exists()


def test_random_weights_are_marked_in_what_users_keep(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path
) -> None:
    untrained = dataclasses.replace(runtime.manifest, random_weights=True)
    runtime_copy = Runtime(runtime.model_dir, device="cpu")
    object.__setattr__(runtime_copy, "manifest", untrained)
    out = tmp_path / "p.parquet"
    run_job(runtime_copy, JobSpec("predict", top_k=1), [str(p) for p in photo_paths[:2]], out)
    assert pq.read_table(out)["random_weights"].to_pylist() == [True, True]
    assert read_run_info(out)["random_weights"] is True
    row = {"path": "a.png", "status": "ok", "error": None, "labels": ["x"], "probabilities": [0.5]}
    assert prediction_record(row, random_weights=True)["random_weights"] is True


def test_changed_inputs_are_not_resumed(runtime: Runtime, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "e.parquet"

    def interrupt(part: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(JobInterrupted, match="interrupted after 2 of 6 inputs"):
        run_job(runtime, JobSpec("embed"), [str(p) for p in photo_paths], out, chunk_size=2,
                events=JobEvents(part=interrupt))  # fmt: skip
    with pytest.raises(OutputError, match="holds a run with other inputs"):
        run_job(runtime, JobSpec("embed"), [str(p) for p in photo_paths[:3]], out, resume=True)


# --- Ray Data -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_engine_rows_equal_the_local_engine(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    runtime = Runtime(model_dir, device="cpu", threads=1)
    inputs = collect_inputs([str(corpus)])
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    run_job(runtime, JobSpec("embed", top_k=2), inputs, local, chunk_size=3)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        run_job(runtime, JobSpec("embed", top_k=2), inputs, on_ray, chunk_size=3, engine="ray", ray_actors=2)
    finally:
        ray.shutdown()
    a, b = pq.read_table(local).to_pylist(), pq.read_table(on_ray).to_pylist()
    assert [(r["path"], r["status"], r["error"], r["labels"]) for r in a] == [
        (r["path"], r["status"], r["error"], r["labels"]) for r in b
    ]
    for x, y in zip(a, b, strict=True):
        if x["embedding"] is not None:
            assert np.abs(np.array(x["embedding"]) - np.array(y["embedding"])).max() <= 1e-6
    assert read_run_info(on_ray)["engine"] == "ray"
