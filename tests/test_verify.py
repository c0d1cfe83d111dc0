"""`pvt-deploy verify`: the parity table, results in the manifest, and refusals (corruption, wrong checkpoint,
failed thresholds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.errors import CheckpointError, ModelDirError, VerificationError
from pvt_deploy.format.manifest import load_manifest, verify_files


@pytest.fixture
def export_copy(tiny_export_dir: Path, tmp_path: Path) -> Path:
    """verify writes into the manifest, so work on a copy of the shared fixture."""
    return Path(shutil.copytree(tiny_export_dir, tmp_path / "copy"))


def test_verify_prints_table_and_records_results(export_copy: Path, photo_paths: list[Path]) -> None:
    result = CliRunner().invoke(cli, ["verify", str(export_copy), "--images", str(photo_paths[0].parent)])
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and "top-5" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.startswith(("classify", "embed", "features"))]
    assert {(row[0], row[2]) for row in rows} >= {
        ("classify", "probabilities"),
        ("embed", "embedding"),
        ("features", "stage4"),
    }
    assert all(row[-1] == "ok" for row in rows)  # fp32 only: every output has a threshold
    recorded = load_manifest(export_copy).to_json()["parity"]["verify"]
    assert recorded["passed"] is True
    assert recorded["inputs"]["photos"] == sorted(p.name for p in photo_paths)
    assert recorded["results"]["classify/fp32"]["outputs"]["probabilities"]["max_abs"] <= 1e-5
    verify_files(load_manifest(export_copy))  # rewriting the manifest changed no checksummed file


@pytest.mark.parametrize("name", ["classify.onnx", "weights.bin"])
def test_corrupted_file_is_refused(export_copy: Path, name: str) -> None:
    path = export_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="checksum mismatch"):
        verify_files(load_manifest(export_copy))
    result = CliRunner().invoke(cli, ["verify", str(export_copy)])
    assert result.exit_code == ModelDirError.exit_code
    assert (
        result.output.strip()
        == f"Error: {path}: checksum mismatch with manifest.json; the file is corrupted or was changed"
    )


def test_wrong_checkpoint_is_refused(export_copy: Path, tmp_path: Path) -> None:
    from tests.fixtures.checkpoints import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other.pt", seed=5)
    result = CliRunner().invoke(cli, ["verify", str(export_copy), "--checkpoint", str(other)])
    assert result.exit_code == CheckpointError.exit_code
    assert "is not the checkpoint" in result.output and "sha256 differs" in result.output


def test_failed_threshold_exits_non_zero_and_is_recorded(export_copy: Path, monkeypatch) -> None:
    from pvt_deploy.export.parity import PARITY_THRESHOLDS

    monkeypatch.setitem(PARITY_THRESHOLDS["fp32"], "logits_max_abs", 0.0)  # nothing is that exact
    result = CliRunner().invoke(cli, ["verify", str(export_copy)])
    assert result.exit_code == VerificationError.exit_code
    assert "FAIL" in result.output
    assert "classify/fp32 logits_max_abs" in result.output.splitlines()[-1]
    recorded = load_manifest(export_copy).to_json()["parity"]["verify"]
    assert recorded["passed"] is False
    assert recorded["results"]["classify/fp32"]["checks"]["logits_max_abs"]["passed"] is False
