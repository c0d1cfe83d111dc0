"""Bad checkpoints through the command line: one ``Error:`` line, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.errors import CheckpointError


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _bad_files(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "absent.pt", "folder": tmp_path}
    (tmp_path / "notes.pt").write_text("not weights")
    files["not a checkpoint"] = tmp_path / "notes.pt"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["state"] = {"conv1.weight": torch.zeros(4, 3, 3, 3)}
    torch.save(payload, tmp_path / "resnet.pt")
    files["other architecture"] = tmp_path / "resnet.pt"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["rgb_stats"] = _Payload(tmp_path / "marker")
    torch.save(payload, tmp_path / "evil.pt")
    files["malicious"] = tmp_path / "evil.pt"
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"state": _Payload(tmp_path / "marker")}, protocol=2))
    files["malicious legacy"] = legacy
    return files


@pytest.mark.parametrize(
    "kind", ["missing", "folder", "not a checkpoint", "other architecture", "malicious", "malicious legacy"]
)
def test_export_refuses_bad_checkpoints_with_one_line(kind: str, tmp_path: Path, tiny_checkpoint: Path) -> None:
    source = _bad_files(tmp_path, tiny_checkpoint)[kind]
    out = tmp_path / "exported"
    result = CliRunner().invoke(cli, ["export", str(source), "--out", str(out)])
    assert result.exit_code == CheckpointError.exit_code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not (tmp_path / "marker").exists()  # the malicious payload never ran
