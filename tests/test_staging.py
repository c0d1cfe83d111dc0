"""Staging names, stale-staging cleanup and OutputLock (pvt_deploy.staging)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pvt_deploy.errors import OutputError
from pvt_deploy.files import OutputLock
from pvt_deploy.staging import (
    clean_stale_staging,
    describe_removed,
    process_start_time,
    staging_path,
)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_path_names_this_process(tmp_path: Path):
    path = staging_path(tmp_path / "out", "partial")
    start = process_start_time(os.getpid())
    assert path == tmp_path / f".out.partial-{os.getpid()}-{start}"
    assert start is not None and start > 0
    with pytest.raises(ValueError):
        staging_path(tmp_path / "out", "bad-tag")


def test_start_time_of_a_missing_process_is_none():
    assert process_start_time(_dead_pid()) is None


def test_clean_removes_only_staging_of_dead_or_reused_pids(tmp_path: Path):
    live = staging_path(tmp_path / "out", "partial")
    live.mkdir()
    dead = tmp_path / f".out.partial-{_dead_pid()}-12345"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "graph.onnx").write_bytes(b"x" * 100)
    reused = tmp_path / f".out.tmp-{os.getpid()}-1"  # our pid, but another start time: a dead run's pid reused
    reused.write_bytes(b"x")
    legacy = tmp_path / f".out.partial-{_dead_pid()}-a1b2c3"
    legacy.mkdir()
    legacy_embed = tmp_path / f"out.tmp-{_dead_pid()}"
    legacy_embed.mkdir()
    other_output = tmp_path / f".other.partial-{_dead_pid()}-1"
    other_output.mkdir()
    lock_file = tmp_path / ".out.lock"
    lock_file.write_text("1\n")
    final = tmp_path / "out"
    final.mkdir()

    removed = clean_stale_staging(tmp_path, "out")

    assert sorted(removed) == sorted([dead, reused, legacy, legacy_embed])
    assert live.exists() and other_output.exists() and lock_file.exists() and final.exists()
    assert not dead.exists() and not reused.exists() and not legacy.exists() and not legacy_embed.exists()
    assert describe_removed(removed).startswith("removed 4 leftovers of interrupted runs: .out.")
    assert clean_stale_staging(tmp_path, "out") == []
    assert clean_stale_staging(tmp_path / "missing", "out") == []


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path):
    out = tmp_path / "out"
    with OutputLock(out) as lock:
        assert lock.lock_file.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=rf"another run \(pid {os.getpid()}\) is using {out}"):
            OutputLock(out).acquire()
    assert not (tmp_path / ".out.lock").exists()
    with OutputLock(out):  # released: free again
        pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path: Path):
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pvt_deploy.files import OutputLock
        lock = OutputLock({str(out)!r}); lock.acquire()
        print("locked", flush=True); time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=rf"another run \(pid {holder.pid}\)"):
            OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".out.lock").exists()  # SIGKILL leaves the file, but the kernel dropped the lock
    with OutputLock(out):
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_lock_in_a_read_only_folder_is_one_line(tmp_path: Path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=f"cannot lock {tmp_path / 'out'}: Permission denied"):
            OutputLock(tmp_path / "out").acquire()
    finally:
        tmp_path.chmod(0o700)


def test_lock_where_the_parent_is_a_file_is_one_line(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot lock .*: (File exists|Not a directory)"):
        OutputLock(tmp_path / "file" / "out").acquire()
