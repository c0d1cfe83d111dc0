"""Export of the tiny checkpoint: files, manifest, metadata read back through onnxruntime, batch sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pvt_deploy.format.manifest import GRAPH_OUTPUTS, INPUT_NAME, MetadataKey, load_manifest, verify_files


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_three_graphs_and_a_consistent_manifest(tiny_export_dir: Path, tiny_checkpoint: Path) -> None:
    manifest = load_manifest(tiny_export_dir).to_json()
    assert set(manifest["graphs"]) == {"classify", "embed", "features"}
    for name in ("classify.onnx", "embed.onnx", "features.onnx"):
        assert name in manifest["files"]
    verify_files(load_manifest(tiny_export_dir))  # every listed file matches its sha256 and size
    listed = set(manifest["files"]) | {"manifest.json"}
    assert {p.name for p in tiny_export_dir.iterdir()} == listed
    assert manifest["source"]["path"] == str(tiny_checkpoint.resolve())
    assert manifest["random_weights"] is False
    assert manifest["num_classes"] == 10
    for key in ("torch", "onnx", "onnxruntime"):
        assert manifest["export"]["versions"][key]
    assert manifest["export"]["opset"] >= 17
    classify_io = manifest["graphs"]["classify"]["fp32"]
    assert classify_io["inputs"] == [{"name": "input", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert [o["name"] for o in classify_io["outputs"]] == ["probabilities", "logits", "embedding"]
    assert classify_io["outputs"][0]["shape"] == ["batch", 10]
    assert classify_io["outputs"][2]["shape"] == ["batch", 128]
    assert all(entry["passed"] for entry in manifest["parity"]["export"].values())


def test_metadata_reads_back_through_onnxruntime(tiny_export_dir: Path, tiny_checkpoint: Path) -> None:
    from pvt_deploy.files import sha256_file

    for graph in GRAPH_OUTPUTS:
        meta = _session(tiny_export_dir / f"{graph}.onnx").get_modelmeta().custom_metadata_map
        assert json.loads(meta[MetadataKey.LABELS]) == [f"class_{i}" for i in range(10)]
        stats = json.loads(meta[MetadataKey.RGB_STATS])
        assert stats["mean"] == pytest.approx([0.5191, 0.5306, 0.4877])
        assert json.loads(meta[MetadataKey.INPUT_SIZE]) == [64, 64]
        assert json.loads(meta[MetadataKey.RESIZE])["interpolation"] == "bicubic"
        assert float(meta[MetadataKey.LAYER_NORM_EPS]) == 1e-6
        assert meta[MetadataKey.SOURCE_SHA256] == sha256_file(tiny_checkpoint)
        assert meta[MetadataKey.BIRDER_VERSION]
        assert meta[MetadataKey.PVT_DEPLOY_VERSION]
        assert meta[MetadataKey.GRAPH] == graph
        assert meta[MetadataKey.PRECISION] == "fp32"
        assert meta[MetadataKey.NETWORK] == "pvt_v2_tiny"
        assert meta[MetadataKey.RANDOM_WEIGHTS] == "false"
        assert meta[MetadataKey.DYNAMIC_SIZE] == "false"


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_every_graph_runs_at_batch(tiny_export_dir: Path, tiny_checkpoint: Path, batch: int) -> None:
    import torch

    from pvt_deploy.export.graphs import reference_all
    from pvt_deploy.model.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint).model
    x = np.random.default_rng(batch).standard_normal((batch, 3, 64, 64), dtype=np.float32)
    reference = {k: v.numpy() for k, v in reference_all(model, torch.from_numpy(x)).items()}
    for graph, names in GRAPH_OUTPUTS.items():
        got = _session(tiny_export_dir / f"{graph}.onnx").run(list(names), {INPUT_NAME: x})
        for name, value in zip(names, got, strict=True):
            assert value.shape[0] == batch
            assert np.abs(value - reference[name]).max() <= 1e-4, (graph, name)
