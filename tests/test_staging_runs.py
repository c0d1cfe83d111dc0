"""Interrupted and concurrent `export` / `embed` runs: Ctrl-C always stops export with 130, killed runs leave
staging the next run removes (and reports), and a second run on one output fails with one line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.errors import OutputError
from pvt_deploy.files import OutputLock
from pvt_deploy.staging import process_start_time


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _export_command(checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pvt_deploy", "export", str(checkpoint), "--out", str(out)]


def test_interrupt_swallowed_by_a_library_still_stops_export(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxsim's C++ catches every exception its Python callbacks raise, KeyboardInterrupt included; exporting
    then used to finish and exit 0. Here the simplifier receives SIGINT and swallows it the same way."""
    from pvt_deploy.export import exporter, onnx_io
    from pvt_deploy.model.checkpoint import load_checkpoint

    real_simplify = onnx_io.simplify_graph

    def swallowing_simplify(path: Path, tool: str = "onnxsim"):
        with contextlib.suppress(KeyboardInterrupt):  # what a C++ catch (...) around a Python callback does
            signal.raise_signal(signal.SIGINT)
        return real_simplify(path, tool)

    monkeypatch.setattr(onnx_io, "simplify_graph", swallowing_simplify)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        exporter.export_model(load_checkpoint(tiny_checkpoint), out)
    assert _names(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigint_at_several_points_exits_130_and_leaves_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A real `pvt-deploy export` subprocess, interrupted while loading, right after staging starts, and after
    the first graph is done."""
    triggers = ("start", "staging", "classify.onnx:")
    for trigger in triggers:
        out = tmp_path / trigger.strip(".:") / "model"
        out.parent.mkdir()
        process = subprocess.Popen(
            _export_command(tiny_checkpoint, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if trigger == "start":
            time.sleep(2.0)  # importing torch
        elif trigger == "staging":
            deadline = time.monotonic() + 60
            while not any(".partial-" in n for n in _names(out.parent)) and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            for line in process.stdout:
                if trigger in line:
                    break
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 130, f"{trigger}: {output}"
        assert "Traceback" not in output, output
        assert _names(out.parent) == [], trigger


def test_killed_export_leaves_staging_the_next_run_removes(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvt_deploy.errors import ExportError
    from pvt_deploy.export import onnx_io
    from tests.fixtures.exported import export_tiny

    out = tmp_path / "model"
    process = subprocess.Popen(
        _export_command(tiny_checkpoint, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    left: list[str] = []
    while not left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [n for n in _names(tmp_path) if n.startswith(".model.partial-")]
    time.sleep(0.5)  # let it write something into the staging folder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert left == [f".model.partial-{process.pid}-{left[0].rsplit('-', 1)[1]}"]
    # SIGKILL: nothing could clean up. The lock file stays too, but the kernel dropped its flock with the process.
    assert _names(tmp_path) == sorted([*left, ".model.lock"])

    def stop_here(*args, **kwargs):  # the cleanup is done by now; the rest of an export proves nothing more
        raise ExportError("stopped by the test")

    monkeypatch.setattr(onnx_io, "export_graph", stop_here)
    messages: list[str] = []
    with pytest.raises(ExportError, match="stopped by the test"):
        export_tiny(tiny_checkpoint, out, progress=messages.append)
    assert _names(tmp_path) == []
    assert f"{tmp_path}: removed 1 leftover of interrupted runs: {left[0]}" in messages


def test_export_refuses_an_output_another_run_is_using(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "model"
    with OutputLock(out):
        result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out)])
    assert result.exit_code == OutputError.exit_code, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: another run (pid {os.getpid()}) is using {out}"
    assert "Traceback" not in result.output
    assert _names(tmp_path) == []


def test_embed_refuses_an_output_another_run_is_using(tmp_path: Path, tiny_export_dir: Path, photo_paths) -> None:
    out = tmp_path / "emb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; from pvt_deploy.files import OutputLock; l = OutputLock({str(out)!r}); l.acquire(); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(cli, ["embed", str(tiny_export_dir), str(photo_paths[0]), "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == OutputError.exit_code, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: another run (pid {holder.pid}) is using {out}"
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "emb.partial").exists()


def test_embed_removes_and_reports_the_final_step_of_a_killed_run(
    tmp_path: Path, tiny_export_dir: Path, photo_paths
) -> None:
    out = tmp_path / "emb"
    killed_final = tmp_path / f".emb.tmp-{_dead_pid()}-{process_start_time(os.getpid())}"
    (killed_final / "embeddings.npy").parent.mkdir()
    (killed_final / "embeddings.npy").write_bytes(b"\x93NUMPY half-written")
    killed_before = tmp_path / f"emb.tmp-{_dead_pid()}"  # the name earlier versions used
    killed_before.mkdir()
    result = CliRunner().invoke(cli, ["embed", str(tiny_export_dir), *map(str, photo_paths[:2]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _names(tmp_path) == ["emb"]
    names = sorted([killed_final.name, killed_before.name])
    assert f"removed 2 leftovers of interrupted runs: {', '.join(names)}" in result.output


def test_any_command_exits_130_after_a_swallowed_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pvt_deploy import hub

    def swallowing_download(*args, **kwargs) -> Path:
        with contextlib.suppress(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        return tmp_path / "weights.pt"

    monkeypatch.setattr(hub, "download", swallowing_download)
    result = CliRunner().invoke(cli, ["download", "pvt_v2_b2_mmcr-il-all", "-q"])
    assert result.exit_code == 130, result.output
    assert result.output.strip() == f"{tmp_path / 'weights.pt'}\nInterrupted."
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
