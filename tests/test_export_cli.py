"""`pvt-deploy export`: refusal of an existing folder, nothing half-written on failure, random weights, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.errors import ExportError, OutputError
from pvt_deploy.format.manifest import GRAPH_OUTPUTS, INPUT_NAME, MetadataKey, load_manifest


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_existing_folder_is_refused_without_force(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out)])
    assert result.exit_code == OutputError.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {out} already exists; pass --force to replace it"]
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_mid_export_leaves_no_folder(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    """The classify and embed graphs are written; the int8 step then fails: no DIR, no staging folder."""
    from pvt_deploy.export import precision

    def broken(*args, **kwargs):
        raise RuntimeError("quantizer broke")

    monkeypatch.setattr(precision, "make_variant", broken)
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32,int8"])
    assert result.exit_code == ExportError.exit_code, result.output
    assert "making the int8 variant failed: RuntimeError: quantizer broke" in result.output
    assert "Traceback" not in result.output
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_leaves_no_folder(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    from pvt_deploy.export import exporter, onnx_io
    from pvt_deploy.model.checkpoint import load_checkpoint

    real_simplify = onnx_io.simplify_graph
    calls = []

    def interrupted(path: Path, tool: str = "onnxsim"):
        calls.append(path)
        assert path.is_file()  # a graph has been written into the staging folder
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_simplify(path, tool)

    monkeypatch.setattr(onnx_io, "simplify_graph", interrupted)
    out = tmp_path / "nested" / "model"
    with pytest.raises(KeyboardInterrupt):
        exporter.export_model(load_checkpoint(tiny_checkpoint), out)
    assert len(calls) == 2
    assert _leftovers(tmp_path / "nested") == []


@pytest.mark.slow
def test_force_replaces_and_random_weights_are_labelled(tmp_path: Path) -> None:
    """A published-style try-out without any checkpoint: metadata, manifest and output say random weights,
    and verify rebuilds the same weights from the recorded seed."""
    out = tmp_path / "tiny-random"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "pvt_v2_tiny", "--random-weights", "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output
    assert result.output.strip().splitlines()[-1] == f"Next: pvt-deploy predict {out} IMAGE"
    assert not (out / "stale.txt").exists()
    assert _leftovers(tmp_path) == ["tiny-random"]
    manifest = load_manifest(out).to_json()
    assert manifest["random_weights"] is True
    assert manifest["source"]["random_weights"]["seed"] == 0
    assert manifest["num_classes"] == 550 and manifest["input"]["size"] == [384, 384]
    session = ort.InferenceSession(str(out / "classify.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[MetadataKey.RANDOM_WEIGHTS] == "true"
    assert json.loads(meta[MetadataKey.LABELS])[:2] == ["class_000", "class_001"]

    verified = runner.invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert "random weights regenerated from seed 0" in verified.output
    assert load_manifest(out).to_json()["parity"]["verify"]["passed"] is True


def test_offline_published_export_suggests_random_weights(tmp_path: Path, monkeypatch) -> None:
    """Without the hub, exporting the published name says what works offline instead of just 'cannot connect'."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("PVT_DEPLOY_BASE_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("PVT_DEPLOY_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["export", "pvt_v2_b2_mmcr-il-all", "--out", str(tmp_path / "x")])
    assert result.exit_code == 3
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "cannot connect" in line
    assert line.endswith(
        "Offline? Try `pvt-deploy export pvt_v2_b2_mmcr-il-all --random-weights` (untrained, same network) "
        "or pass a local checkpoint path"
    )


def test_unknown_random_weights_name_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "resnet50", "--random-weights", "--out", str(tmp_path / "x")])
    assert result.exit_code == ExportError.exit_code
    assert result.output.startswith("Error: --random-weights needs a network or published name")
    assert len(result.output.strip().splitlines()) == 1
    assert _leftovers(tmp_path) == []


def test_checkpoint_exports_at_its_signature_size(tmp_path: Path) -> None:
    """A 256 px checkpoint exports at 256: the size comes from the signature, not a default."""
    from pvt_deploy.export.source import resolve_export_source
    from pvt_deploy.model.checkpoint import save_checkpoint
    from pvt_deploy.model.pvt_v2 import create_model

    model = create_model("pvt_v2_tiny", 3, size=(256, 256))
    path = save_checkpoint(
        tmp_path / "tiny256.pt",
        model,
        class_to_idx={"a": 0, "b": 1, "c": 2},
        rgb_stats={"mean": [0.5] * 3, "std": [0.25] * 3},
    )
    source = resolve_export_source(path)
    assert source.size == (256, 256)
    assert source.labels == ["a", "b", "c"]
    assert source.model_name == "tiny256"


def test_dynamic_size_graphs_run_at_other_sizes(tiny_dynamic_export_dir: Path, tiny_checkpoint: Path) -> None:
    import torch

    from pvt_deploy.export.graphs import reference_all
    from pvt_deploy.model.checkpoint import load_checkpoint

    manifest = load_manifest(tiny_dynamic_export_dir).to_json()
    assert manifest["input"]["dynamic_size"] is True
    assert manifest["graphs"]["embed"]["fp32"]["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    checked = {tuple(run[1:]) for run in manifest["parity"]["export"]["features/fp32"]["runs"]}
    assert {(32, 32), (64, 64), (128, 128)} <= checked
    model = load_checkpoint(tiny_checkpoint).model
    for height, width in [(96, 96), (64, 128), (160, 96)]:
        x = np.random.default_rng(height + width).standard_normal((2, 3, height, width), dtype=np.float32)
        reference = {k: v.numpy() for k, v in reference_all(model, torch.from_numpy(x)).items()}
        for graph, names in GRAPH_OUTPUTS.items():
            session = ort.InferenceSession(
                str(tiny_dynamic_export_dir / f"{graph}.onnx"), providers=["CPUExecutionProvider"]
            )
            for name, value in zip(names, session.run(list(names), {INPUT_NAME: x}), strict=True):
                assert value.shape == reference[name].shape
                assert np.abs(value - reference[name]).max() <= 1e-4, (graph, name, height, width)


def test_published_name_with_random_weights_takes_its_network_and_resolution() -> None:
    from pvt_deploy.export.exporter import default_out_dir
    from pvt_deploy.export.source import resolve_export_source

    source = resolve_export_source("pvt_v2_b2_mmcr-il-all256px", random_weights=True)
    assert (source.network, source.size, len(source.labels)) == ("pvt_v2_b2", (256, 256), 550)
    assert source.labels[0] == "class_000" and source.labels[-1] == "class_549"
    assert default_out_dir(source) == Path("exported/pvt_v2_b2_mmcr-il-all256px-random-weights")


@pytest.mark.slow
def test_int8_variant_is_exported_labelled_and_verified(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "tiny-int8"
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32,int8"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out).to_json()
    for graph in GRAPH_OUTPUTS:
        assert manifest["graphs"][graph]["int8"]["file"] == f"{graph}.int8.onnx"
        assert manifest["parity"]["export"][f"{graph}/int8"]["passed"] is True
    meta = ort.InferenceSession(str(out / "embed.int8.onnx"), providers=["CPUExecutionProvider"])
    assert meta.get_modelmeta().custom_metadata_map[MetadataKey.PRECISION] == "int8"
    verified = runner.invoke(cli, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert set(load_manifest(out).to_json()["parity"]["verify"]["results"]) == {
        f"{g}/{p}" for g in GRAPH_OUTPUTS for p in ("fp32", "int8")
    }


def test_optimized_graph_failing_parity_is_replaced_by_the_simplified_one(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch
) -> None:
    """If the speed work's fp32 rewrite ever changes the answers, export ships the simplified graph instead."""
    import onnx
    from onnx import numpy_helper

    from pvt_deploy.export import exporter, precision
    from pvt_deploy.model.checkpoint import load_checkpoint

    def wrong_rewrite(model_path: Path, out_path: Path) -> dict:
        model = onnx.load(str(model_path))
        # an MLP's depthwise conv (group > 1): the other convs feed a LayerNorm, which removes exactly the
        # per-token constant shift that adding 0.5 to every weight causes
        depthwise = next(
            node.input[1]
            for node in model.graph.node
            if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
        )
        tensor = next(t for t in model.graph.initializer if t.name == depthwise)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + 0.5, tensor.name))
        onnx.save(model, str(out_path))
        return {"rewrite": "deliberately wrong"}

    monkeypatch.setattr(precision, "optimize_fp32", wrong_rewrite)
    manifest = exporter.export_model(load_checkpoint(tiny_checkpoint), tmp_path / "out")
    for graph in GRAPH_OUTPUTS:
        step = manifest.export.steps[graph]["optimize_fp32"]
        assert step["applied"] is False and step["reason"].startswith("rejected: parity"), (graph, step)
        assert manifest.parity["export"][f"{graph}/fp32"]["passed"] is True
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*manifest.files, "manifest.json"])


def test_parity_failure_aborts_the_export(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    from pvt_deploy.export.precision import PARITY_THRESHOLDS

    monkeypatch.setitem(PARITY_THRESHOLDS["fp32"], "logits_max_abs", 0.0)  # nothing is that exact
    result = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--out", str(tmp_path / "out")])
    assert result.exit_code == ExportError.exit_code
    assert result.output.splitlines()[-1].startswith("Error: classify.onnx failed parity with PyTorch: classify/fp32")
    assert _leftovers(tmp_path) == []
