"""The machine-readable preprocessing contract: in the manifest, in every graph's metadata, torch-free; and graph
hygiene (used opset domains only, one producer)."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import onnxruntime as ort

from pvt_deploy.export.onnx_io import PRODUCER_NAME, used_domains
from pvt_deploy.format.contract import METADATA_KEY, PILLOW_MODE_RULES, preprocess_contract
from pvt_deploy.preprocess import BIRDER_RGB_STATS


def test_contract_says_every_rule() -> None:
    contract = preprocess_contract((384, 384), BIRDER_RGB_STATS)
    resize = contract["resize"]
    assert (resize["kernel"], resize["a"], resize["antialias"], resize["fixed_point_bits"]) == ("cubic", -0.5, True, 22)
    assert resize["pass_order"]["default"] == ["horizontal", "vertical"] and resize["to"] == [384, 384]
    assert contract["normalize"]["mean"] == BIRDER_RGB_STATS["mean"]
    assert contract["exif"]["apply_orientation"] is False
    modes = " ".join(PILLOW_MODE_RULES)
    for mode in ("RGBA", "P", "L", "I;16", "CMYK", "F"):
        assert mode in modes
    json.dumps(contract)  # plain JSON


def test_contract_in_manifest_and_every_graph(tiny_export_dir) -> None:
    manifest = json.loads((tiny_export_dir / "manifest.json").read_text())
    contract = manifest["input"]["preprocess"]
    assert contract["resize"]["to"] == manifest["input"]["size"]
    graphs = sorted(tiny_export_dir.glob("*.onnx"))
    assert len(graphs) == 5
    for path in graphs:
        metadata = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
        assert json.loads(metadata[METADATA_KEY]) == contract, path.name


def test_graphs_import_only_used_domains_and_share_a_producer(tiny_export_dir) -> None:
    producers = set()
    for path in sorted(tiny_export_dir.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        declared = [opset.domain or "" for opset in model.opset_import]
        assert len(declared) == len(set(declared)), path.name
        assert set(declared) <= used_domains(model) | {""}, path.name
        producers.add((model.producer_name, model.producer_version))
    assert len(producers) == 1 and next(iter(producers))[0] == PRODUCER_NAME


def test_contract_module_is_torch_free() -> None:
    code = "import sys, pvt_deploy.format.contract; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
