"""``manifest.json``: the typed description of an exported folder that export writes and every reader reads.

The dataclasses below ARE the format: ``Manifest.to_json()`` is what export writes, ``load_manifest(folder)`` /
``Manifest.from_json`` what the runtime, ``info``, ``verify``, bench and the services read (``format/codec.py``
maps fields to JSON keys by their type hints). A new field is one dataclass field (with a default, so folders
written before it still load) plus the code that uses it.

A model folder is untrusted input: every value is type-checked (``true`` is not an integer), every file name must
stay inside the folder after symlinks (``confined_path``) and be checksummed in ``files``; one ``ModelDirError``
line otherwise.

manifest.json layout (format_version 1)::

    {
      "format_version": 1,
      "model_name": "pvt_v2_b2_mmcr-il-all", "network": "pvt_v2_b2", "random_weights": false,
      "source": {"path": ..., "sha256": ..., "birder_version": ..., "task": ..., "config": ..., "random_weights": ...},
      "input": {"name": "input", "size": [384, 384], "dynamic_size": false, "dtype": "float32", "layout": "NCHW",
                "rgb_stats": {"mean": [...], "std": [...]}, "resize": {...}, "preprocess": {the contract}},
      "layer_norm_eps": 1e-06, "num_classes": 550, "labels": [...], "labels_file": "labels.txt",
      "files": {"classify.onnx": {"sha256": ..., "size": ...}, ...},   # every file in the folder but the manifest
      "graphs": {"classify": {"fp32": {"file": "classify.onnx", "inputs": [...], "outputs": [...]}, "int8": ...}},
      "image_graphs": {"classify": {"file": "classify.image.onnx", "inputs": [...], "outputs": [...]}, ...},
      "export": {"exporter": ..., "opset": ..., "simplifier": ..., "shared_weights": ..., "versions": ...},
      "parity": {...}                                                  # written by export and by verify
    }
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pvt_deploy.errors import ModelDirError
from pvt_deploy.files import atomic_write_json, sha256_file
from pvt_deploy.format.codec import FormatError, dataclass_to_json, read_dataclass
from pvt_deploy.format.contract import PreprocessContract, check_center_crop

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

INPUT_NAME = "input"
IMAGE_INPUT_NAME = "image"
GRAPH_OUTPUTS: dict[str, tuple[str, ...]] = {
    "classify": ("probabilities", "logits", "embedding"),
    "embed": ("embedding",),
    "features": ("stage1", "stage2", "stage3", "stage4"),
}
GRAPH_NAMES = tuple(GRAPH_OUTPUTS)
PRECISIONS = ("fp32", "int8", "fp16")
DATA_SUFFIXES = (".bin", ".data", ".onnx_data")
"""External-weight files: an ONNX graph may read any of these that the manifest lists."""


def graph_filename(graph: str, precision: str = "fp32") -> str:
    """``classify.onnx`` for fp32, ``classify.int8.onnx`` for a variant."""
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def image_graph_filename(graph: str) -> str:
    """``classify.image.onnx``: the image-input variant of a tensor graph (uint8 pixels in, preprocessing inside)."""
    return f"{graph}.image.onnx"


class MetadataKey:
    """Keys of each graph's ``metadata_props`` (onnxruntime: ``get_modelmeta().custom_metadata_map``).

    Values are strings; structured values are JSON."""

    LABELS = "labels"  # JSON list, class-index order
    RGB_STATS = "rgb_stats"  # JSON {"mean": [r, g, b], "std": [r, g, b]}
    INPUT_SIZE = "input_size"  # JSON [height, width]
    DYNAMIC_SIZE = "dynamic_size"  # "true" / "false"
    RESIZE = "resize"  # JSON {"interpolation": "bicubic", "center_crop": 1.0, "rule": "...", "apply_exif": false}
    LAYER_NORM_EPS = "layer_norm_eps"
    NETWORK = "network"
    GRAPH = "graph"  # classify / embed / features (classify.image / embed.image for the image-input graphs)
    PRECISION = "precision"  # fp32 / int8 / fp16
    SOURCE_SHA256 = "source_sha256"
    BIRDER_VERSION = "birder_version"
    PVT_DEPLOY_VERSION = "pvt_deploy_version"
    RANDOM_WEIGHTS = "random_weights"  # "true" when exported with --random-weights
    BATCH_INVARIANT = "batch_invariant"  # "false" when a row's answer depends on its batch (run rows one by one)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ----- the sections -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """What the manifest promises about one file of the folder."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256):
            raise FormatError("sha256 must be 64 lower-case hex digits")
        if self.size < 0:
            raise FormatError("size must be >= 0")

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileRecord:
        """The record of a file on disk (export)."""
        return cls(sha256=sha256_file(path), size=os.stat(path).st_size)


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One graph input or output. Dims are ints or symbolic names (``"batch"``); ``()`` promises no shape."""

    name: str
    shape: tuple[int | str, ...] = ()
    dtype: str = "float32"


@dataclass(frozen=True, kw_only=True)
class GraphEntry:
    """One exported graph file: what it reads and returns. ``variant`` describes a non-fp32 precision (method,
    quantized ops...), as the precision module reports it."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variant: dict[str, Any] | None = None
    batch_invariant: bool | None = None
    """False when a row's answer depends on the other rows of its batch: the runtime then runs the graph row by
    row. When the entry does not say, the variant does (dynamic int8 is not: one activation scale per batch);
    always a bool once read."""

    def __post_init__(self) -> None:
        if self.batch_invariant is None:
            variant = self.variant or {}
            stated = variant.get("batch_invariant")
            resolved = stated if isinstance(stated, bool) else variant.get("method") != "dynamic"
            object.__setattr__(self, "batch_invariant", resolved)
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            if not names:
                raise FormatError(f"{kind} must list at least one tensor")
            if len(set(names)) != len(names):
                raise FormatError(f"{kind} repeat a name")

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.outputs)


@dataclass(frozen=True, kw_only=True)
class RgbStats:
    """Per-channel (R, G, B) mean and std of the normalisation ``(x - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if any(value == 0 for value in self.std):
            raise FormatError("rgb_stats std must not be 0")

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True, kw_only=True)
class ResizeRule:
    """How an image becomes the model's input size (birder's ``inference_preset``)."""

    interpolation: str = "bicubic"
    center_crop: float = 1.0
    rule: str = ""
    apply_exif: bool = False

    def __post_init__(self) -> None:
        if self.interpolation != "bicubic":
            raise FormatError(f"unsupported resize interpolation {self.interpolation!r} (expected bicubic)")
        check_center_crop(self.center_crop)


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """The model input: name, (height, width), whether H and W are dynamic, and the preprocessing to reach it."""

    name: str = INPUT_NAME
    size: tuple[int, int]
    dynamic_size: bool = False
    dtype: str = "float32"
    layout: str = "NCHW"
    rgb_stats: RgbStats
    resize: ResizeRule = field(default_factory=ResizeRule)
    preprocess: PreprocessContract | None = None
    """The machine-readable contract (``pvt_deploy.format.contract``); it must agree with the fields above."""

    def __post_init__(self) -> None:
        if min(self.size) < 1:
            raise FormatError(f"input size must be [height, width] >= 1, got {list(self.size)}")
        contract = self.preprocess
        if contract is not None:
            resize = self.resize
            expected = (self.size, self.rgb_stats.mean, self.rgb_stats.std, resize.center_crop, resize.apply_exif)
            found = (contract.size, contract.mean, contract.std, contract.center_crop, contract.apply_exif)
            if expected != found or contract.input_name != self.name:
                raise FormatError(
                    "input.preprocess disagrees with the input section (size, rgb_stats, crop, EXIF rule or name)"
                )


@dataclass(frozen=True, kw_only=True)
class RandomWeightsSource:
    """A random-weights export: the network is rebuilt from these values alone."""

    seed: int
    network: str
    num_classes: int
    size: tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class SourceRecord:
    """Where the weights came from: a checkpoint (path, sha256, birder version, task, non-stock config) or a seed."""

    random_weights: RandomWeightsSource | None = None
    path: str | None = None
    sha256: str | None = None
    birder_version: str | None = None
    task: str | None = None
    config: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class SharedWeights:
    """One external-data file shared by several graphs (export's weight sharing)."""

    file: str
    graphs: tuple[str, ...]
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True, kw_only=True)
class ExportRecord:
    """How the export ran: exporter, opset, simplifier, weight sharing, library versions, steps and time."""

    exporter: str
    opset: int
    simplifier: str
    steps: dict[str, Any] = field(default_factory=dict)
    shared_weights: SharedWeights | None = None
    choice: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """``manifest.json``, validated. ``model_dir`` (not part of the document) is the folder it was read from."""

    format_version: int = FORMAT_VERSION
    model_name: str | None = None
    network: str | None = None
    random_weights: bool = False
    source: SourceRecord = field(default_factory=SourceRecord)
    input: InputSpec
    layer_norm_eps: float | None = None
    num_classes: int | None = None
    labels: tuple[str, ...] | None = None
    labels_file: str | None = None
    files: dict[str, FileRecord]
    graphs: dict[str, dict[str, GraphEntry]]
    image_graphs: dict[str, GraphEntry] = field(default_factory=dict)
    export: ExportRecord | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    model_dir: Path = field(default=Path("."), metadata={"json": False}, compare=False)

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise FormatError(f"unsupported manifest format (expected format_version {FORMAT_VERSION})")
        if not self.files:
            raise FormatError("'files' must map each file name to its sha256 and size")
        if MANIFEST_NAME in self.files:
            raise FormatError("'files' must not list the manifest itself")
        if not self.graphs or not all(self.graphs.values()):
            raise FormatError("lists no graphs (each graph maps precisions to graph files)")
        for where, entry in self.entries():
            if entry.file not in self.files:
                raise FormatError(f"{where}.file {entry.file!r} is not listed (with its sha256) in 'files'")
        if self.num_classes is not None and self.num_classes < 1:
            raise FormatError("num_classes must be >= 1")
        if self.labels is not None and self.num_classes is not None and len(self.labels) != self.num_classes:
            raise FormatError(f"{len(self.labels)} labels for {self.num_classes} classes")

    # ----- JSON ------------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The document ``write_manifest`` writes."""
        return dataclass_to_json(self)

    @classmethod
    def from_json(cls, document: Any, model_dir: str | os.PathLike[str] = ".") -> Manifest:
        """A parsed ``manifest.json`` document; ``ModelDirError`` naming the file and the bad value otherwise.

        Only what the document says is checked here; ``load_manifest`` also checks the names against the folder."""
        folder = Path(model_dir)
        if not isinstance(document, dict) or type(document.get("format_version")) is not int:
            raise _fail(folder, f"unsupported manifest format (expected format_version {FORMAT_VERSION})")
        try:
            manifest = read_dataclass(cls, document)
        except FormatError as exc:
            raise _fail(folder, str(exc)) from None
        return replace(manifest, model_dir=folder)

    # ----- reading ---------------------------------------------------------------------------------------------

    def entries(self) -> list[tuple[str, GraphEntry]]:
        """Every graph file entry with its place in the document (``graphs.classify.fp32``, ``image_graphs.embed``)."""
        found = [
            (f"graphs.{graph}.{precision}", entry)
            for graph, variants in self.graphs.items()
            for precision, entry in variants.items()
        ]
        return found + [(f"image_graphs.{graph}", entry) for graph, entry in self.image_graphs.items()]

    @property
    def precisions(self) -> list[str]:
        """Every precision exported for some graph, in manifest order."""
        found: list[str] = []
        for variants in self.graphs.values():
            found += [name for name in variants if name not in found]
        return found

    def entry(self, graph: str, precision: str = "fp32") -> GraphEntry:
        variants = self.graphs.get(graph)
        if not variants:
            raise ModelDirError(f"{self.model_dir}: this export has no {graph!r} graph")
        entry = variants.get(precision)
        if entry is None:
            raise ModelDirError(
                f"{self.model_dir}: the {graph!r} graph has no {precision!r} variant; available: {', '.join(variants)}"
            )
        return entry

    def image_entry(self, graph: str) -> GraphEntry:
        """The image-input variant of ``graph`` (``classify.image.onnx``)."""
        entry = self.image_graphs.get(graph)
        if entry is None:
            if not self.image_graphs:
                raise ModelDirError(
                    f"{self.model_dir}: no image-input graphs in this export (re-export it, or use preprocess='python')"
                )
            raise ModelDirError(
                f"{self.model_dir}: no image-input variant of the {graph!r} graph; use preprocess='python'"
            )
        return entry

    def data_files(self) -> list[str]:
        """Listed external-weight files (any graph may read them)."""
        return [name for name in self.files if name.endswith(DATA_SUFFIXES)]

    def path(self, name: str) -> Path:
        """The file ``name`` of the folder; ``load_manifest`` has already confined every listed name to it."""
        return self.model_dir / name

    def named_files(self) -> list[tuple[str, str]]:
        """(what, name) of every file name the document gives, for the confinement check."""
        names = [("file", name) for name in self.files]
        names += [("graph file", entry.file) for _, entry in self.entries()]
        if self.labels_file is not None:
            names.append(("labels file", self.labels_file))
        if self.export is not None and self.export.shared_weights is not None:
            names.append(("shared weights file", self.export.shared_weights.file))
        return names


# ----- the folder ---------------------------------------------------------------------------------------------------


def confined_path(model_dir: Path, name: str, what: str = "file") -> Path:
    """``model_dir / name`` when it stays inside ``model_dir`` after resolving symlinks, else ``ModelDirError``.

    Nothing is opened: only the name and the symlinks on its way are looked at (a symlink loop is refused too)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelDirError(f"{model_dir}: the manifest names an invalid {what} {name!r}")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ModelDirError(f"{model_dir}: the manifest names {what} {name!r} outside the model folder")
    try:
        root = model_dir.resolve()
        resolved = (root / candidate).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: "Symlink loop" (Python < 3.13)
        raise ModelDirError(f"{model_dir}: {what} {name!r} cannot be resolved ({exc})") from None
    if resolved != root and root not in resolved.parents:
        raise ModelDirError(f"{model_dir}: {what} {name!r} resolves to {resolved}, outside the model folder")
    return model_dir / candidate


def _fail(model_dir: Path, message: str) -> ModelDirError:
    return ModelDirError(f"{model_dir / MANIFEST_NAME}: {message}")


def load_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``model_dir/manifest.json``: the one place a model folder's manifest is checked."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelDirError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: expected an exported model folder, got a file")
    path = model_dir / MANIFEST_NAME
    confined_path(model_dir, MANIFEST_NAME)
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {MANIFEST_NAME}; is this a pvt-deploy export folder?")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelDirError(f"{path}: unreadable manifest ({exc})") from None
    manifest = Manifest.from_json(document, model_dir)
    for what, name in manifest.named_files():
        confined_path(model_dir, name, what)
    return manifest


def write_manifest(model_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically, so a reader never sees half a manifest."""
    return atomic_write_json(Path(model_dir) / MANIFEST_NAME, manifest.to_json(), durable=False)


def check_file(model_dir: Path, name: str, record: FileRecord) -> str | None:
    """Why ``name`` fails its record (``"missing"``, ``"not a regular file"``, ``"checksum mismatch"``) or None."""
    path = confined_path(model_dir, name)
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a regular file"
    if path.stat().st_size != record.size or sha256_file(path) != record.sha256:
        return "checksum mismatch"
    return None


def file_problems(manifest: Manifest, names: list[str] | None = None) -> dict[str, str]:
    """Each named file (default: all listed) that is missing or fails its checksum, with the reason."""
    problems: dict[str, str] = {}
    for name in names if names is not None else list(manifest.files):
        record = manifest.files.get(name)
        problem = f"not listed in {MANIFEST_NAME}" if record is None else check_file(manifest.model_dir, name, record)
        if problem:
            problems[name] = problem
    return problems


def verify_files(manifest: Manifest, names: list[str] | None = None) -> None:
    """Check size and sha256 of the named files (default: all) against the manifest.

    A corrupted or truncated graph raises ``ModelDirError`` instead of loading and giving wrong answers."""
    model_dir = manifest.model_dir
    for name, problem in file_problems(manifest, names).items():
        if problem == "missing":
            raise ModelDirError(f"{model_dir}: {name} is listed in {MANIFEST_NAME} but missing")
        if problem == "checksum mismatch":
            raise ModelDirError(
                f"{model_dir / name}: checksum mismatch with {MANIFEST_NAME}; the file is corrupted or was changed"
            )
        raise ModelDirError(f"{model_dir}: {name} is {problem}")
