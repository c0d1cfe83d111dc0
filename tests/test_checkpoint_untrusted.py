"""Hostile checkpoints: signatures that would make export allocate terabytes, pickles that ask to run code,
and raw pickles: each is one CheckpointError line, with nothing executed, allocated or printed first."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.errors import CheckpointError
from pvt_deploy.model.checkpoint import MAX_INPUT_SIDE, load_checkpoint, make_signature, save_safetensors
from tests.fixtures.checkpoints import BIRDER_RGB_STATS, TINY_NUM_CLASSES, make_tiny_model, tiny_class_to_idx

REFUSED = "refused: not a weights-only checkpoint; nothing was executed"


def _tiny_safetensors(path: Path, signature: dict) -> Path:
    return save_safetensors(
        path, make_tiny_model(), class_to_idx=tiny_class_to_idx(), rgb_stats=BIRDER_RGB_STATS, signature=signature
    )


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (make_signature((320000, 320000), TINY_NUM_CLASSES), f"320000x320000 is outside 32..{MAX_INPUT_SIDE} px"),
        (make_signature((64, 4096), TINY_NUM_CLASSES), "64x4096 is outside"),
        (make_signature((0, 64), TINY_NUM_CLASSES), "0x64 is outside"),
        (make_signature((64, 64), 10**9), "signature says 1000000000 classes, the weights have 10"),
        (make_signature((64, 64), TINY_NUM_CLASSES, input_channels=100000), "says 100000 input channels"),
    ],
)
def test_signature_claims_are_bounded_before_allocating(tmp_path: Path, signature: dict, message: str) -> None:
    path = _tiny_safetensors(tmp_path / "claims.safetensors", signature)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_export_of_a_320000_px_signature_is_one_error_line(tmp_path: Path) -> None:
    path = _tiny_safetensors(tmp_path / "huge.safetensors", make_signature((320000, 320000), TINY_NUM_CLASSES))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(path), "--out", str(out)])
    assert result.exit_code == CheckpointError.exit_code, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {path}: signature input size 320000x320000 is outside 32..{MAX_INPUT_SIDE} px per side"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.safetensors"]


class _System:
    """Unpickling this runs ``os.system``; the command only touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _os_system_pickles(tiny_checkpoint: Path, tmp_path: Path, marker: Path) -> dict[str, Path]:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["class_to_idx"] = _System(marker)
    files = {}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    files["zip"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"state": _System(marker)}, buffer, _use_new_zipfile_serialization=False)
    files["legacy"] = buffer.getvalue()
    for protocol in (2, 4, 5):
        files[f"raw-protocol-{protocol}"] = pickle.dumps({"state": _System(marker)}, protocol=protocol)
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(data)
    return paths


def test_os_system_pickles_are_refused_without_torchs_advice(tiny_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, path in _os_system_pickles(tiny_checkpoint, tmp_path, marker).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path}: {REFUSED} ("), (name, message)
        assert "\n" not in message
        assert "weights_only" not in message and "False" not in message and "safe_globals" not in message
        if name in ("zip", "legacy", "raw-protocol-2"):
            assert "posix.system" in message, message
        assert [str(w.message) for w in caught] == [], name  # torch's 2-line pickle-protocol UserWarning
    assert not marker.exists()


def test_cli_refusal_is_exactly_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _os_system_pickles(tiny_checkpoint, tmp_path, marker)["raw-protocol-4"]
    result = CliRunner().invoke(cli, ["export", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == CheckpointError.exit_code
    assert result.output.strip().splitlines() == [
        f"Error: {path}: {REFUSED} (it uses pickle opcode 149, which torch.save never writes)"
    ]
    assert not marker.exists()
