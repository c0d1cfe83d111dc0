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


def _alone_and_in_a_batch(runtime: Runtime, photos: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's (probabilities | embedding) when it is the only input, and when it shares a batch of 7."""
    batch = [*photos, photos[0]][:7]
    alone = np.stack([np.concatenate([*runtime.classify(p, return_embedding=True)], axis=1)[0] for p in batch])
    together = np.concatenate([*runtime.classify(batch, return_embedding=True)], axis=1)
    return alone, together


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_every_shipped_precision_is_batch_invariant(
    variants_dir: Path, photo_paths: list[Path], precision: str
) -> None:
    """An image's answer never depends on the other images of its batch, at batch_size 8 (one call for all 7).
    Dynamic int8 takes one activation scale per batch, so the runtime runs it row by row: exactly equal."""
    runtime = Runtime(variants_dir, device="cpu", precision=precision, batch_size=8)
    alone, together = _alone_and_in_a_batch(runtime, photo_paths)
    if precision == "int8":
        np.testing.assert_array_equal(together, alone)
    else:
        tolerance = {"fp32": 1e-5, "fp16": 1e-3}[precision]
        np.testing.assert_allclose(together, alone, rtol=0, atol=tolerance)


def test_dynamic_int8_graph_is_marked_and_really_depends_on_its_batch(
    variants_dir: Path, photo_paths: list[Path]
) -> None:
    """The row-by-row rule is needed: the same graph fed a whole batch at once moves an image's answer."""
    import onnxruntime as ort

    manifest = json.loads((variants_dir / "manifest.json").read_text())
    assert manifest["graphs"]["classify"]["int8"]["variant"]["batch_invariant"] is False
    assert manifest["graphs"]["classify"]["fp16"]["variant"]["batch_invariant"] is True
    runtime = Runtime(variants_dir, device="cpu", precision="int8")
    assert runtime.manifest.entry("classify", "int8").batch_invariant is False
    session = ort.InferenceSession(str(variants_dir / "classify.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["batch_invariant"] == "false"
    batch = runtime.preprocess([*photo_paths, photo_paths[0]][:7])
    together = session.run(["logits"], {"input": batch})[0]
    alone = np.concatenate([session.run(["logits"], {"input": row[None]})[0] for row in batch])
    assert np.abs(together - alone).max() > 0


def test_sessions_do_not_spin_wait_unless_asked() -> None:
    """Spinning pool threads measured 1.5x slower on 2 shared cores (docs/speed.md); it stays available."""
    from pvt_deploy.runtime.sessions import session_options

    keys = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
    assert [session_options(2).get_session_config_entry(k) for k in keys] == ["0", "0"]
    assert [session_options(2, allow_spinning=True).get_session_config_entry(k) for k in keys] == ["1", "1"]
