"""Devices and execution providers: ``providers=`` pass-through, quiet CUDA probing, no needless warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pvt_deploy import Runtime
from pvt_deploy.cli import cli
from pvt_deploy.errors import DeviceError
from pvt_deploy.runtime import sessions


def test_explicit_cpu_provider_list_is_passed_through(tiny_export_dir: Path, photo_paths: list[Path]) -> None:
    expected = Runtime(tiny_export_dir, device="cpu").classify(photo_paths[:2])
    for providers in (
        ["CPUExecutionProvider"],
        [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})],
    ):
        runtime = Runtime(tiny_export_dir, providers=providers)
        np.testing.assert_array_equal(runtime.classify(photo_paths[:2]), expected)
        assert runtime.session("classify").providers == ["CPUExecutionProvider"]
        assert runtime.providers == ["CPUExecutionProvider"] and runtime.active_device == "cpu"


def test_unknown_provider_is_a_device_error(tiny_export_dir: Path) -> None:
    with pytest.raises(DeviceError, match="'NoSuchExecutionProvider' is not in this onnxruntime"):
        Runtime(tiny_export_dir, providers=["NoSuchExecutionProvider"])


def test_predict_on_a_cpu_machine_prints_no_device_warning(
    tiny_export_dir: Path, photo_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "nvidia_device_present", lambda: False)
    result = CliRunner().invoke(cli, ["predict", str(tiny_export_dir), str(photo_paths[0])], catch_exceptions=False)
    assert result.exit_code == 0 and result.stderr == ""


def test_cuda_without_usable_libraries_is_one_error_line(tiny_export_dir: Path, photo_paths: list[Path]) -> None:
    """onnxruntime-gpu without CUDA libraries (CI): no coloured onnxruntime log lines before our Error line."""
    if sessions.nvidia_device_present() or not sessions.cuda_provider_listed():
        pytest.skip("needs onnxruntime-gpu on a machine whose CUDA provider cannot start")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "pvt_deploy", "predict", str(tiny_export_dir), str(photo_paths[0]), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 10
    assert done.stderr.splitlines() == [
        "Error: device 'cuda' requested but onnxruntime could not start its CUDA provider"
    ]
