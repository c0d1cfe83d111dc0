"""The contract between ``export`` (writes) and ``runtime`` (reads): file names, graph I/O names, metadata keys,
and the manifest with per-file sha256. Torch-free: the runtime checks checksums with this module alone.

manifest.json layout (format_version 1)::

    {
      "format_version": 1,
      "model_name": "pvt_v2_b2_mmcr-il-all",      # folder name by default
      "network": "pvt_v2_b2",
      "random_weights": false,
      "source": {"path": ..., "sha256": ..., "birder_version": ..., "task": ...},
      "input": {"name": "input", "size": [384, 384], "dynamic_size": false,
                "rgb_stats": {"mean": [...], "std": [...]}, "resize": {...}},
      "layer_norm_eps": 1e-06,
      "num_classes": 550,
      "files": {"classify.onnx": {"sha256": ..., "size": ...}, ...},   # every file in the folder but the manifest
      "graphs": {"classify": {"fp32": {"file": "classify.onnx", "inputs": [...], "outputs": [...]}, "int8": ...}},
      "export": {"exporter": ..., "opset": ..., "simplifier": ..., "versions": {"torch": ..., "onnx": ...}},
      "parity": {...}                                                  # written by export and by verify
    }
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pvt_deploy.errors import ModelDirError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

INPUT_NAME = "input"
GRAPH_OUTPUTS: dict[str, tuple[str, ...]] = {
    "classify": ("probabilities", "logits", "embedding"),
    "embed": ("embedding",),
    "features": ("stage1", "stage2", "stage3", "stage4"),
}
GRAPH_NAMES = tuple(GRAPH_OUTPUTS)
PRECISIONS = ("fp32", "int8", "fp16")


def graph_filename(graph: str, precision: str = "fp32") -> str:
    """``classify.onnx`` for fp32, ``classify.int8.onnx`` for a variant."""
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


class MetadataKey:
    """Keys of each graph's ``metadata_props`` (onnxruntime: ``get_modelmeta().custom_metadata_map``).

    Values are strings; structured values are JSON."""

    LABELS = "labels"  # JSON list, class-index order
    RGB_STATS = "rgb_stats"  # JSON {"mean": [r, g, b], "std": [r, g, b]}
    INPUT_SIZE = "input_size"  # JSON [height, width]
    DYNAMIC_SIZE = "dynamic_size"  # "true" / "false"
    RESIZE = "resize"  # JSON {"interpolation": "bicubic", "center_crop": 1.0, "rule": "..."}
    LAYER_NORM_EPS = "layer_norm_eps"
    NETWORK = "network"
    GRAPH = "graph"  # classify / embed / features
    PRECISION = "precision"  # fp32 / int8 / fp16
    SOURCE_SHA256 = "source_sha256"
    BIRDER_VERSION = "birder_version"
    PVT_DEPLOY_VERSION = "pvt_deploy_version"
    RANDOM_WEIGHTS = "random_weights"  # "true" when exported with --random-weights


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json``; raises ``ModelDirError`` with one clear line."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelDirError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: expected an exported model folder, got a file")
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {MANIFEST_NAME}; is this a pvt-deploy export folder?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path}: unsupported manifest format (expected format_version {FORMAT_VERSION})")
    return manifest


def write_manifest(model_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def verify_files(model_dir: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check size and sha256 of the named files (default: all) against the manifest.

    A corrupted or truncated graph raises ``ModelDirError`` instead of loading and giving wrong answers."""
    model_dir = Path(model_dir)
    records: dict[str, dict[str, Any]] = manifest.get("files", {})
    for name in names if names is not None else list(records):
        record = records.get(name)
        if record is None:
            raise ModelDirError(f"{model_dir}: {name} is not listed in {MANIFEST_NAME}")
        path = model_dir / name
        if not path.is_file():
            raise ModelDirError(f"{model_dir}: {name} is listed in {MANIFEST_NAME} but missing")
        if path.stat().st_size != record["size"] or sha256_file(path) != record["sha256"]:
            raise ModelDirError(f"{path}: checksum mismatch with {MANIFEST_NAME}; the file is corrupted or was changed")
