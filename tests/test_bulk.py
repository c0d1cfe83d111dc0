"""Bulk jobs: every input form, every output format, failed rows kept, the lock, resume (also after SIGKILL,
bit-equal to an uninterrupted run), --normalize, and the Ray Data engine equal to the local one."""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from pvt_deploy import Runtime
from pvt_deploy.cli import cli
from pvt_deploy.errors import JobInterrupted, OutputError, UsageError
from pvt_deploy.files import OutputLock
from pvt_deploy.jobs import (
    JobEvents,
    JobPlan,
    JobSpec,
    Part,
    RayEngine,
    collect_inputs,
    prediction_record,
    read_run_info,
    run_job,
)
from pvt_deploy.jobs.store import partial_dir
from pvt_deploy.runtime.config import RuntimeConfig, cpu_count, max_threads

REPO = Path(__file__).resolve().parent.parent


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
    with pytest.raises(UsageError, match="no files match this pattern"):
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
    run_job(runtime_copy, JobPlan(JobSpec("predict", top_k=1), [str(p) for p in photo_paths[:2]], out))
    assert pq.read_table(out)["random_weights"].to_pylist() == [True, True]
    assert read_run_info(out)["random_weights"] is True
    row = {"path": "a.png", "status": "ok", "error": None, "labels": ["x"], "probabilities": [0.5]}
    assert prediction_record(row, random_weights=True)["random_weights"] is True


def test_changed_inputs_are_not_resumed(runtime: Runtime, photo_paths: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "e.parquet"

    def interrupt(part: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(JobInterrupted, match="interrupted after 2 of 6 inputs"):
        run_job(runtime, JobPlan(JobSpec("embed"), [str(p) for p in photo_paths], out, chunk_size=2),
                events=JobEvents(part=interrupt))  # fmt: skip
    with pytest.raises(OutputError, match="holds a run with other inputs"):
        run_job(runtime, JobPlan(JobSpec("embed"), [str(p) for p in photo_paths[:3]], out, resume=True))


# --- Ray Data -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_engine_rows_equal_the_local_engine(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    runtime = Runtime(model_dir, device="cpu", threads=1)
    inputs = collect_inputs([str(corpus)])
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    run_job(runtime, JobPlan(JobSpec("embed", top_k=2), inputs, local, chunk_size=3))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        run_job(runtime, JobPlan(JobSpec("embed", top_k=2), inputs, on_ray, chunk_size=3), RayEngine(actors=2))
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


# --- one runtime configuration reaches every worker -------------------------------------------------------------


def _session_recorder(record: Path, patch: Callable[[Any, str, Any], None]) -> Callable[[], None]:
    """Wrap ``GraphSession.run`` and ``Runtime.__init__`` in whatever process calls the result, appending what the
    sessions really ran (batch sizes, providers) and the configuration each Runtime was built with to ``record``.
    Nested, so Ray pickles it by value into its workers (``worker_process_setup_hook``)."""

    def install() -> None:
        from pvt_deploy.runtime import runtime as runtime_module
        from pvt_deploy.runtime import sessions

        run, init = sessions.GraphSession.run, runtime_module.Runtime.__init__

        def write(entry: dict[str, Any]) -> None:
            with open(record, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

        def recording_run(self: Any, batch: Any, output_names: Any = None) -> Any:
            write({"batch": len(batch), "providers": list(self.session.get_providers())})
            return run(self, batch, output_names)

        def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            write({"config": self.config.to_json()})

        patch(sessions.GraphSession, "run", recording_run)
        patch(runtime_module.Runtime, "__init__", recording_init)

    return install


def _recorded(record: Path) -> tuple[list[int], set[tuple[str, ...]], list[dict[str, Any]]]:
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    batches = [e["batch"] for e in entries if "batch" in e]
    providers = {tuple(e["providers"]) for e in entries if "providers" in e}
    return batches, providers, [e["config"] for e in entries if "config" in e]


_WORKER_CONFIG = RuntimeConfig(device="cpu", threads=1, batch_size=3, providers=("CPUExecutionProvider",),
                               max_pixels=50_000_000)  # fmt: skip
"""Options the Ray actors used to lose: the batch size, the providers, the image limits."""


def test_local_engine_sessions_run_the_configured_batch_size(
    model_dir: Path, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "sessions.jsonl"
    _session_recorder(record, monkeypatch.setattr)()
    runtime = Runtime(model_dir, _WORKER_CONFIG)
    out = tmp_path / "e.parquet"
    run_job(runtime, JobPlan(JobSpec("embed"), [str(p) for p in photo_paths], out, chunk_size=6))
    batches, providers, _ = _recorded(record)
    assert batches == [3, 3] and providers == {tuple(runtime.providers)}
    assert read_run_info(out)["runtime"] == _WORKER_CONFIG.to_json()  # the batch size is in the run metadata


@pytest.mark.slow
def test_ray_actors_run_the_jobs_whole_runtime_config(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    """The bug: actors rebuilt their Runtime from five options, so ``--batch-size 3`` ran 6 batches of 1 on Ray."""
    ray = pytest.importorskip("ray")
    record = tmp_path / "sessions.jsonl"
    runtime = Runtime(model_dir, _WORKER_CONFIG)
    out = tmp_path / "e.parquet"
    hook = _session_recorder(record, setattr)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": hook})
    try:
        run_job(runtime, JobPlan(JobSpec("embed"), [str(p) for p in photo_paths], out, chunk_size=6),
                RayEngine(actors=1))  # fmt: skip
    finally:
        ray.shutdown()
    batches, providers, configs = _recorded(record)
    assert batches == [3, 3] and providers == {tuple(runtime.providers)}
    assert configs == [_WORKER_CONFIG.to_json()]  # the actor's Runtime: the job's configuration, whole
    info = read_run_info(out)
    assert info["engine"] == "ray" and info["runtime"] == _WORKER_CONFIG.to_json()


def test_threads_above_the_cpu_bound_is_one_usage_error(model_dir: Path, photo_paths: list[Path]) -> None:
    result = invoke("predict", model_dir, photo_paths[0], "--threads", 100_000, "--device", "cpu")
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"Error: --threads must be <= {max_threads()} (4x the {cpu_count()} CPUs present), got 100000"
    ]


@pytest.mark.slow
def test_quiet_ray_job_prints_only_its_summary(model_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    """Ray's INFO lines, its C++ notices and its Python warnings stay out of a ``-q`` job's stderr."""
    out = tmp_path / "e.parquet"
    command = [sys.executable, "-m", "pvt_deploy", "embed", str(model_dir), *map(str, photo_paths[:3]), "--out",
               str(out), "--device", "cpu", "--engine", "ray", "--actors", "1", "-q"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"Wrote 3 rows to {out}"]


# --- resume: what differs, what changed, what is in the way ---------------------------------------------------------


def _interrupted(runtime: Runtime, plan: JobPlan, after_parts: int = 1) -> None:
    """Run ``plan`` and interrupt it once ``after_parts`` parts are saved (as Ctrl-C would)."""
    seen: list[Part] = []

    def interrupt(part: Part) -> None:
        seen.append(part)
        if len(seen) >= after_parts:
            raise KeyboardInterrupt

    with pytest.raises(JobInterrupted):
        run_job(runtime, plan, events=JobEvents(part=interrupt))


def test_resume_refusal_names_the_option_and_both_values(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path
) -> None:
    out, inputs = tmp_path / "e.parquet", [str(p) for p in photo_paths]
    _interrupted(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2))
    with pytest.raises(OutputError, match=r"other options, model \(--top-k: 0 then, 2 now; model.graph: 'embed"):
        run_job(runtime, JobPlan(JobSpec("embed", top_k=2), inputs, out, resume=True))
    with pytest.raises(OutputError, match=r"--normalize: False then, True now"):
        run_job(runtime, JobPlan(JobSpec("embed", normalize=True), inputs, out, resume=True))


def test_resume_overwrite_continues_the_same_job_and_replaces_another(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path
) -> None:
    """``--resume --overwrite``: resume when the partial run is this job, start over when it is another."""
    out, inputs = tmp_path / "e.parquet", [str(p) for p in photo_paths]
    reference = tmp_path / "reference.parquet"
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, reference, chunk_size=2))
    _interrupted(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2))
    notes: list[str] = []
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, out, resume=True, overwrite=True),
            events=JobEvents(note=notes.append))  # fmt: skip
    assert "Resuming: 2 of 6 inputs already done" in notes
    assert pq.read_table(out).equals(pq.read_table(reference))

    out.unlink()
    _interrupted(runtime, JobPlan(JobSpec("embed"), inputs[:4], out, chunk_size=2))
    notes.clear()
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2, resume=True, overwrite=True),
            events=JobEvents(note=notes.append))  # fmt: skip
    assert any("starting over" in note for note in notes)
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_resume_recomputes_inputs_changed_since_their_rows(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path
) -> None:
    """A file whose size or mtime changed after its row was saved is computed again on --resume."""
    folder = tmp_path / "photos"
    folder.mkdir()
    inputs = []
    for photo in photo_paths:
        shutil.copy(photo, folder / photo.name)
        inputs.append(str(folder / photo.name))
    out = tmp_path / "e.parquet"
    _interrupted(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2), after_parts=2)
    shutil.copy(photo_paths[5], inputs[2])  # input 2 (part 1) now holds another photo
    notes: list[str] = []
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2, resume=True),
            events=JobEvents(note=notes.append))  # fmt: skip
    assert f"Resuming: {inputs[2]} changed since its row was computed; recomputing from input 2" in notes
    assert "Resuming: 2 of 6 inputs already done" in notes
    stored = np.array(pq.read_table(out)["embedding"].to_pylist(), np.float32)
    np.testing.assert_array_equal(stored, runtime.embed(inputs))


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_resume_refuses_a_partial_that_is_not_a_folder(
    model_dir: Path, photo_paths: list[Path], tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "e.parquet"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    if kind == "file":
        partial_dir(out).write_text("a file")
    else:
        partial_dir(out).symlink_to(elsewhere)
    result = invoke("embed", model_dir, *photo_paths[:2], "--out", out, "--device", "cpu", "--resume")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and f"{partial_dir(out)} is a" in errors[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]  # the link was not followed
    assert partial_dir(out).is_symlink() == (kind == "symlink") and not out.exists()
    result = invoke("embed", model_dir, *photo_paths[:2], "--out", out, "--device", "cpu", "--overwrite")
    assert result.exit_code == 0, result.stderr  # --overwrite removes the link itself, never what it points at
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_full_disk_on_the_final_write_keeps_every_row(
    model_dir: Path, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final Parquet write failing (ENOSPC, or EFBIG under ``ulimit -f``) is one error line with the resume
    hint; --resume then writes the same file an uninterrupted run writes."""
    reference, out = tmp_path / "reference.parquet", tmp_path / "e.parquet"
    args = ["embed", model_dir, *photo_paths, "--device", "cpu", "--chunk-size", 2]
    assert invoke(*args, "--out", reference).exit_code == 0

    def full(self: Any, table: Any, *rest: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(pq.ParquetWriter, "write_table", full)
        result = invoke(*args, "--out", out)
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"Error: cannot write {out} (No space left on device); every finished row is kept in {partial_dir(out)}: "
        "make room and run the same command with --resume"
    ]
    assert not out.exists() and not list(tmp_path.glob(".e.parquet*"))  # no half-written file anywhere
    resumed = invoke(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert pq.read_table(out).equals(pq.read_table(reference)) and not partial_dir(out).exists()


# --- --from-list --------------------------------------------------------------------------------------------------


def test_from_list_that_is_not_text_is_one_usage_error(model_dir: Path, tmp_path: Path) -> None:
    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    long_line = tmp_path / "long.txt"
    long_line.write_text("x" * 100_000 + "\n")
    long_multibyte = tmp_path / "long-utf8.txt"  # the first 4097 bytes end on a character: they decode whole
    long_multibyte.write_text("x" + "\u00e9" * 3000 + "\n", encoding="utf-8")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    cases = [
        ("/dev/zero", "line 1 holds a NUL byte"),
        (binary, "line 1 is not UTF-8 text"),
        (long_line, "line 1 is longer than 4096 bytes"),
        (long_multibyte, "line 1 is longer than 4096 bytes"),
        (not_utf8, "line 1 is not UTF-8 text"),
    ]
    for source, reason in cases:
        result = invoke("predict", model_dir, "--from-list", source, "--device", "cpu")
        assert result.exit_code == 2, (source, result.stderr)
        assert [line for line in result.stderr.splitlines() if line.strip()] == [
            f"Error: --from-list {source}: not a list of paths ({reason})"
        ]


def test_from_list_reads_a_fifo(photo_paths: list[Path], tmp_path: Path) -> None:
    fifo = tmp_path / "paths.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w") as handle:
            handle.write("".join(f"{p}\n" for p in photo_paths[:3]))

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert collect_inputs([], [str(fifo)]) == [str(p) for p in photo_paths[:3]]
    finally:
        writer.join(timeout=30)


def test_ray_worker_config_is_the_jobs_own() -> None:
    """Actors get the job's configuration whole; only an unset thread count becomes one thread per actor."""
    assert RayEngine().worker_config(_WORKER_CONFIG) == _WORKER_CONFIG
    assert RayEngine().worker_config(_WORKER_CONFIG.replace(threads=None)) == _WORKER_CONFIG
    with pytest.raises(ValueError, match="preprocess='python'"):
        RayEngine().worker_config(RuntimeConfig(preprocess="graph"))


def test_full_disk_while_saving_a_part_keeps_the_saved_ones(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvt_deploy.jobs.store import JobStore

    inputs, reference, out = [str(p) for p in photo_paths], tmp_path / "reference.parquet", tmp_path / "e.parquet"
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, reference, chunk_size=2))
    write_part = JobStore.write_part

    def fills_up(self: JobStore, part: Part, embeddings: Any) -> None:
        if part.index >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_part(self, part, embeddings)

    with monkeypatch.context() as patch:
        patch.setattr(JobStore, "write_part", fills_up)
        with pytest.raises(OutputError, match=r"No space left on device\); the finished rows are kept in .*--resume"):
            run_job(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2))
    assert not out.exists() and (partial_dir(out) / "part-000000.json").is_file()
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, out, chunk_size=2, resume=True))
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_parquet_without_the_bulk_extra_fails_before_any_work(
    model_dir: Path, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    out = tmp_path / "e.parquet"
    result = invoke("embed", model_dir, *photo_paths, "--out", out, "--device", "cpu")
    assert result.exit_code == 11
    assert "pip install 'pvt-deploy[bulk]' (from a source checkout: pip install -e '.[bulk]')" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT.partial holding work it cannot finish


# --- decoded-memory budget ------------------------------------------------------------------------------------------


def _process_budget(monkeypatch: pytest.MonkeyPatch, limit_bytes: int) -> Any:
    """A fresh process-wide ``DecodeBudget`` of ``limit_bytes`` for this test only (the CLI's ``--max-decode-mb``
    changes the process's one, so it must not outlive the test)."""
    from pvt_deploy import decode_budget

    budget = decode_budget.DecodeBudget(limit_bytes)
    monkeypatch.setattr(decode_budget, "_PROCESS_BUDGET", budget)
    return budget


def _wide_gray_png(path: Path, side: int = 1000) -> Path:
    """A small file that decodes big: a flat 8-bit gray square (its RGB copy is 4 bytes a pixel)."""
    from PIL import Image

    Image.new("L", (side, side), 90).save(path)
    return path


def test_a_job_image_over_the_decode_budget_is_its_error_row(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvt_deploy.decode_budget import estimate_decoded_bytes

    wide = _wide_gray_png(tmp_path / "wide.png")
    needs = [estimate_decoded_bytes(p) or 0 for p in photo_paths]
    budget = _process_budget(monkeypatch, max(needs))  # every photo fits alone, the wide image does not
    assert (estimate_decoded_bytes(wide) or 0) > budget.limit_bytes
    inputs = [str(photo_paths[0]), str(wide), *map(str, photo_paths[1:])]
    for task in ("predict", "embed"):
        out = tmp_path / f"{task}.jsonl"
        spec = JobSpec(task, top_k=2 if task == "predict" else 0)
        result = run_job(runtime, JobPlan(spec, inputs, out, chunk_size=3))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["status"] for row in rows] == ["ok", "error"] + ["ok"] * 5
        assert rows[1]["error"].startswith(f"{wide}: decoding needs about 5 MB, over the decoded-memory limit")
        assert [row["path"] for row in result.failed] == [str(wide)]
        assert budget.in_use == 0
    stored = np.array([row["embedding"] for row in rows if row["embedding"]], np.float32)
    np.testing.assert_array_equal(stored, runtime.embed(photo_paths))


def test_job_decodes_hold_their_estimate_of_the_budget(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the runtime decodes a job's image, that image's header estimate is reserved from the process budget,
    and nothing else is: the reservation spans the decode, whichever decoder the runtime uses."""
    from pvt_deploy import preprocess
    from pvt_deploy.decode_budget import estimate_decoded_bytes

    budget = _process_budget(monkeypatch, 64 * 1024 * 1024)
    held: dict[str, int] = {}
    load_image = preprocess.load_image

    def recording(source: Any, **options: Any) -> Any:
        held[str(source)] = budget.in_use
        return load_image(source, **options)

    monkeypatch.setattr(preprocess, "load_image", recording)
    inputs = [str(p) for p in photo_paths]
    run_job(runtime, JobPlan(JobSpec("embed"), inputs, tmp_path / "e.jsonl", chunk_size=4))
    assert held == {path: estimate_decoded_bytes(path) for path in inputs}
    assert all(held.values()) and budget.in_use == 0


def test_ray_decode_tasks_decode_within_the_drivers_budget(
    runtime: Runtime, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ray engine's decode task (called here in-process, without Ray): the driver's limit, reservations around
    each decode, and an image over the budget as its error while the others decode."""
    from pvt_deploy import preprocess
    from pvt_deploy.decode_budget import estimate_decoded_bytes
    from pvt_deploy.jobs.ray_engine import _decode_batch

    budget = _process_budget(monkeypatch, 64 * 1024 * 1024)
    held: list[int] = []
    load_image = preprocess.load_image

    def recording(source: Any, **options: Any) -> Any:
        held.append(budget.in_use)
        return load_image(source, **options)

    monkeypatch.setattr(preprocess, "load_image", recording)
    wide = _wide_gray_png(tmp_path / "wide.png")
    paths = [str(photo_paths[0]), str(wide), str(photo_paths[1])]
    limit = max(estimate_decoded_bytes(p) or 0 for p in photo_paths[:2])
    batch = {"index": np.arange(3), "path": np.array(paths)}
    decoded = _decode_batch(batch, runtime.spec, decode_limit_bytes=limit)
    assert budget.limit_bytes == limit
    assert decoded["error"][0] == "" and decoded["error"][2] == ""
    assert "over the decoded-memory limit" in decoded["error"][1]
    assert held == [estimate_decoded_bytes(paths[0]), estimate_decoded_bytes(paths[2])] and budget.in_use == 0
    np.testing.assert_array_equal(decoded["row"][[0, 2]], runtime.preprocess(photo_paths[:2]))


def test_max_decode_mb_bounds_a_cli_job(
    model_dir: Path, photo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvt_deploy.decode_budget import DEFAULT_DECODE_BUDGET_BYTES, MB, process_decode_budget

    _process_budget(monkeypatch, DEFAULT_DECODE_BUDGET_BYTES)
    wide = _wide_gray_png(tmp_path / "wide.png")
    result = invoke("predict", model_dir, photo_paths[0], wide, "--device", "cpu", "--json", "--max-decode-mb", 2)
    assert result.exit_code == 4, result.stderr
    assert f"Error: {wide}: decoding needs about 5 MB, over the decoded-memory limit of 2 MB" in result.stderr
    records = json.loads(result.stdout)
    assert ["predictions" in record for record in records] == [True, False] and "error" in records[1]
    assert process_decode_budget().limit_bytes == 2 * MB
    assert invoke("predict", model_dir, photo_paths[0], wide, "--device", "cpu", "--json").exit_code == 0
    assert process_decode_budget().limit_bytes == DEFAULT_DECODE_BUDGET_BYTES


def test_a_lowered_limit_refuses_a_waiting_reservation() -> None:
    """``set_limit`` (each job's ``--max-decode-mb``) below what a decode waits for refuses it, rather than leaving
    it waiting for room that can never come; whether it was waiting already or arrives later."""
    from pvt_deploy.decode_budget import DecodeBudget
    from pvt_deploy.errors import ImageError

    budget = DecodeBudget(100)
    outcome: list[str] = []

    def wait_for_room() -> None:
        try:
            with budget.reserve(60, timeout=None):
                outcome.append("reserved")
        except ImageError as exc:
            outcome.append(str(exc))

    with budget.reserve(50, timeout=0):
        waiter = threading.Thread(target=wait_for_room, daemon=True)
        waiter.start()
        budget.set_limit(50)
    waiter.join(timeout=60)
    assert not waiter.is_alive() and len(outcome) == 1 and "over the decoded-memory limit" in outcome[0]
    assert budget.in_use == 0
