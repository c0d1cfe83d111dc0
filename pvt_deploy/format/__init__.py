"""The model folder's format, torch-free and below export and runtime: ``manifest.json`` as typed dataclasses
(``manifest.py``), the preprocessing contract (``contract.py``), and the JSON mapping both use (``codec.py``).

Export fills these dataclasses and writes them (``write_manifest``); the runtime, ``info``, ``verify``, bench and
services read them (``load_manifest``). Nothing here imports torch, onnx or onnxruntime."""

from pvt_deploy.format.codec import FormatError
from pvt_deploy.format.contract import CONTRACT_VERSION, PreprocessContract, preprocess_contract
from pvt_deploy.format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ExportRecord,
    FileRecord,
    GraphEntry,
    InputSpec,
    Manifest,
    MetadataKey,
    RandomWeightsSource,
    ResizeRule,
    RgbStats,
    SharedWeights,
    SourceRecord,
    TensorSpec,
    graph_filename,
    image_graph_filename,
    load_manifest,
    write_manifest,
)

__all__ = [
    "CONTRACT_VERSION",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ExportRecord",
    "FileRecord",
    "FormatError",
    "GraphEntry",
    "InputSpec",
    "Manifest",
    "MetadataKey",
    "PreprocessContract",
    "RandomWeightsSource",
    "ResizeRule",
    "RgbStats",
    "SharedWeights",
    "SourceRecord",
    "TensorSpec",
    "graph_filename",
    "image_graph_filename",
    "load_manifest",
    "preprocess_contract",
    "write_manifest",
]
