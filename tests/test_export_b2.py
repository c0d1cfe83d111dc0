"""End to end at full size: pvt_v2_b2 at 384 with random weights (550 classes), one export and one verify."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.format.manifest import load_manifest


@pytest.mark.slow
def test_b2_384_exports_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "b2"
    runner = CliRunner()
    exported = runner.invoke(cli, ["export", "pvt_v2_b2", "--random-weights", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    manifest = load_manifest(out).to_json()
    assert manifest["network"] == "pvt_v2_b2" and manifest["num_classes"] == 550
    outputs = {o["name"]: o["shape"] for o in manifest["graphs"]["classify"]["fp32"]["outputs"]}
    assert outputs == {"probabilities": ["batch", 550], "logits": ["batch", 550], "embedding": ["batch", 512]}
    stages = {o["name"]: o["shape"] for o in manifest["graphs"]["features"]["fp32"]["outputs"]}
    assert stages["stage1"] == ["batch", 64, 96, 96] and stages["stage4"] == ["batch", 512, 12, 12]
    runs = manifest["parity"]["export"]["classify/fp32"]["runs"]
    assert [run[0] for run in runs] == [1, 2, 3, 7]
    shared = manifest["export"]["shared_weights"]
    assert shared["bytes_after"] < 0.5 * shared["bytes_before"]  # one weights file instead of three copies

    verified = runner.invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    results = load_manifest(out).to_json()["parity"]["verify"]["results"]
    assert results["classify/fp32"]["outputs"]["probabilities"]["max_abs"] <= 1e-5
    assert results["embed/fp32"]["outputs"]["embedding"]["cosine_min"] >= 0.99999
    print(verified.output)  # the table docs/export.md quotes (pytest -s)
