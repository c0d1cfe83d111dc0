"""The runtime on the int8 and fp16 variants of an export (CPU), against the fp32 graphs of the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pvt_deploy import Runtime
from pvt_deploy.cli import cli
from pvt_deploy.errors import ModelDirError
from pvt_deploy.export.precision import PARITY_THRESHOLDS
from tests.fixtures.exported import export_tiny


@pytest.fixture(scope="module")
def variants_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("variants") / "model"
    return export_tiny(tiny_checkpoint, folder, precisions=("fp32", "int8", "fp16"))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_variant_embeddings_close_to_fp32(variants_dir: Path, photo_paths: list[Path], precision: str) -> None:
    reference = Runtime(variants_dir, device="cpu").embed(photo_paths)
    runtime = Runtime(variants_dir, device="cpu", precision=precision)
    embedding = runtime.embed(photo_paths)
    assert embedding.dtype == np.float32 and embedding.shape == reference.shape
    assert _cosine(embedding, reference).min() >= PARITY_THRESHOLDS[precision]["embedding_cosine_min"]
    probabilities = runtime.classify(photo_paths)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-3)
    assert {k: v.dtype for k, v in runtime.features(photo_paths[0]).items()} == dict.fromkeys(
        ("stage1", "stage2", "stage3", "stage4"), np.float32
    )
    assert runtime.metadata["graphs"]["embed"]["precision"] == precision  # the variant file really was loaded


def test_precisions_listed_and_unknown_rejected(variants_dir: Path) -> None:
    runtime = Runtime(variants_dir, device="cpu")
    assert sorted(runtime.precisions) == ["fp16", "fp32", "int8"]
    with pytest.raises(ModelDirError, match="available: fp32, int8, fp16"):
        Runtime(variants_dir, device="cpu", precision="bf16")
    summary = json.loads(CliRunner().invoke(cli, ["info", str(variants_dir), "--json"]).stdout)
    assert summary["precisions"] == ["fp16", "fp32", "int8"] and summary["checksums_ok"]


def test_cli_predict_with_precision(variants_dir: Path, photo_paths: list[Path]) -> None:
    args = ["predict", str(variants_dir), str(photo_paths[0]), "--json", "--device", "cpu", "--precision", "int8"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    expected = Runtime(variants_dir, device="cpu", precision="int8").predict(photo_paths[0])[0]
    got = json.loads(result.stdout)[0]["predictions"]
    assert [(p["label"], p["probability"]) for p in got] == expected
