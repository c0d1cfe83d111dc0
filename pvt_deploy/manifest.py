"""The contract between ``export`` (writes) and ``runtime`` (reads): file names, graph I/O names, metadata keys,
and the manifest with per-file sha256. Torch-free: the runtime checks checksums with this module alone.

``load_manifest(folder)`` reads and validates the manifest in one place and returns a typed ``Manifest``
(``.raw`` keeps the JSON, so sections this version does not model survive). A model folder is untrusted input:
every file name it gives must stay inside the folder after symlinks (``confined_path``).

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
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
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
DATA_SUFFIXES = (".bin", ".data", ".onnx_data")
"""External-weight files: an ONNX graph may read any of these that the manifest lists."""


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
    BATCH_INVARIANT = "batch_invariant"  # "false" when a row's answer depends on its batch (run rows one by one)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (the one sha256 helper of the package)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


# ----- the typed manifest -------------------------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileRecord:
    """What the manifest promises about one file of the folder."""

    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest describes it. Dims are ints or symbolic names (``"batch"``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class ResizeRule:
    """How an image becomes the model's input size (birder's ``inference_preset``): the one resize-rule type,
    written by export (``to_json``) and read here."""

    interpolation: str = "bicubic"
    center_crop: float = 1.0
    rule: str = ""
    apply_exif: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"interpolation": self.interpolation, "center_crop": self.center_crop, "rule": self.rule}
        if self.apply_exif:
            data["apply_exif"] = True
        return data


@dataclass(frozen=True)
class InputSpec:
    """The model input: name, (height, width), whether H and W are dynamic, and the preprocessing to reach it."""

    name: str
    size: tuple[int, int]
    rgb_stats: dict[str, list[float]]
    resize: ResizeRule = field(default_factory=ResizeRule)
    dynamic_size: bool = False


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph at one precision."""

    graph: str
    precision: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_invariant: bool = True
    """False when a row's answer depends on the other rows of its batch (dynamic int8: one activation scale per
    batch); the runtime then runs such a graph one row at a time."""

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(output.name for output in self.outputs)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` read and validated once (``load_manifest``). ``raw`` keeps the whole JSON document, so
    sections this version does not model (``parity``, ``export``, ``input.preprocess``...) survive; ``manifest[key]``
    and ``manifest.get(key)`` read it."""

    model_dir: Path
    raw: dict[str, Any]
    model_name: str | None
    network: str | None
    random_weights: bool
    input: InputSpec
    num_classes: int | None
    labels: tuple[str, ...] | None
    files: dict[str, FileRecord]
    graphs: dict[str, dict[str, GraphEntry]]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

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

    def data_files(self) -> list[str]:
        """Listed external-weight files (any graph may read them)."""
        return [name for name in self.files if name.endswith(DATA_SUFFIXES)]

    def path(self, name: str) -> Path:
        """The file ``name`` of the folder; validation has already confined every listed name to the folder."""
        return self.model_dir / name


def confined_path(model_dir: Path, name: str, what: str = "file") -> Path:
    """``model_dir / name`` when it stays inside ``model_dir`` after resolving symlinks, else ``ModelDirError``.

    Nothing is opened: only the name and the symlinks on its way are looked at."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelDirError(f"{model_dir}: the manifest names an invalid {what} {name!r}")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ModelDirError(f"{model_dir}: the manifest names {what} {name!r} outside the model folder")
    root = model_dir.resolve()
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelDirError(f"{model_dir}: {what} {name!r} resolves to {resolved}, outside the model folder")
    return model_dir / candidate


def _fail(model_dir: Path, message: str) -> ModelDirError:
    return ModelDirError(f"{model_dir / MANIFEST_NAME}: {message}")


def _parse_files(model_dir: Path, raw: Any) -> dict[str, FileRecord]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(model_dir, "'files' must map each file name to its sha256 and size")
    files: dict[str, FileRecord] = {}
    for name, record in raw.items():
        confined_path(model_dir, name)
        if name == MANIFEST_NAME:
            raise _fail(model_dir, "'files' must not list the manifest itself")
        if not isinstance(record, dict):
            raise _fail(model_dir, f"files[{name!r}] must be {{'sha256': ..., 'size': ...}}, got {record!r}"[:300])
        sha, size = record.get("sha256"), record.get("size")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise _fail(model_dir, f"files[{name!r}] has no valid sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _fail(model_dir, f"files[{name!r}] has no valid size")
        files[name] = FileRecord(sha, size)
    return files


def _parse_tensors(model_dir: Path, where: str, raw: Any) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(model_dir, f"{where} must be a non-empty list of {{name, shape, dtype}}")
    specs = []
    for item in raw:
        if isinstance(item, str):  # a bare name: nothing more is promised
            specs.append(TensorSpec(item, ()))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail(model_dir, f"{where} entries need a name")
        shape = item.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise _fail(model_dir, f"{where} {item['name']!r} has an invalid shape")
        specs.append(TensorSpec(item["name"], tuple(shape), str(item.get("dtype", "float32"))))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise _fail(model_dir, f"{where} repeats a name")
    return tuple(specs)


def _parse_graphs(model_dir: Path, raw: Any, files: dict[str, FileRecord]) -> dict[str, dict[str, GraphEntry]]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(model_dir, "lists no graphs")
    graphs: dict[str, dict[str, GraphEntry]] = {}
    for graph, variants in raw.items():
        if not isinstance(variants, dict) or not variants:
            raise _fail(model_dir, f"graphs[{graph!r}] must map precisions to graph files")
        graphs[graph] = {}
        for precision, entry in variants.items():
            where = f"graphs.{graph}.{precision}"
            entry = {"file": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise _fail(model_dir, f"{where} needs a 'file'")
            name = entry["file"]
            confined_path(model_dir, name, "graph file")
            if name not in files:
                raise _fail(model_dir, f"{where}.file {name!r} is not listed (with its sha256) in 'files'")
            default_outputs = [{"name": n, "shape": []} for n in GRAPH_OUTPUTS.get(graph, ())]
            outputs = entry.get("outputs", default_outputs or None)
            inputs = entry.get("inputs", [{"name": INPUT_NAME, "shape": []}])
            graphs[graph][precision] = GraphEntry(
                graph,
                precision,
                name,
                _parse_tensors(model_dir, f"{where}.inputs", inputs),
                _parse_tensors(model_dir, f"{where}.outputs", outputs),
                _batch_invariant(entry),
            )
    return graphs


def _batch_invariant(entry: dict[str, Any]) -> bool:
    """The variant's own statement, else what its method implies (exports before the flag: dynamic int8 is not)."""
    variant = entry.get("variant") if isinstance(entry.get("variant"), dict) else {}
    stated = variant.get("batch_invariant", entry.get("batch_invariant"))
    if isinstance(stated, bool):
        return stated
    return variant.get("method") != "dynamic"


def _parse_input(model_dir: Path, raw: Any) -> InputSpec:
    if not isinstance(raw, dict):
        raise _fail(model_dir, "has no 'input' section (size, rgb_stats)")
    try:
        size = [int(v) for v in raw["size"]]
        stats = raw["rgb_stats"]
        rgb_stats = {key: [float(v) for v in stats[key]] for key in ("mean", "std")}
    except (KeyError, TypeError, ValueError):
        raise _fail(model_dir, "the input section lacks size or rgb_stats") from None
    if len(size) != 2 or min(size) < 1:
        raise _fail(model_dir, f"input size must be [height, width], got {size}")
    if any(len(v) != 3 or not all(math.isfinite(x) for x in v) for v in rgb_stats.values()):
        raise _fail(model_dir, "rgb_stats mean and std must be 3 finite numbers each")
    if any(v == 0 for v in rgb_stats["std"]):
        raise _fail(model_dir, "rgb_stats std must not be 0")
    resize = raw.get("resize") or {}
    if isinstance(resize, str):
        try:
            resize = json.loads(resize)
        except ValueError:
            raise _fail(model_dir, "input.resize is not valid JSON") from None
    if not isinstance(resize, dict):
        raise _fail(model_dir, "input.resize must be an object")
    try:
        rule = ResizeRule(
            interpolation=str(resize.get("interpolation", "bicubic")),
            center_crop=float(resize.get("center_crop", 1.0)),
            rule=str(resize.get("rule", "")),
            apply_exif=bool(resize.get("apply_exif", False)),
        )
    except (TypeError, ValueError):
        raise _fail(model_dir, "input.resize has an invalid center_crop") from None
    if rule.interpolation != "bicubic":
        raise _fail(model_dir, f"unsupported resize interpolation {rule.interpolation!r} (expected bicubic)")
    if not (math.isfinite(rule.center_crop) and rule.center_crop > 0):
        raise _fail(model_dir, f"center_crop must be > 0, got {rule.center_crop}")
    name = raw.get("name", INPUT_NAME)
    if not isinstance(name, str):
        raise _fail(model_dir, "input.name must be a string")
    return InputSpec(name, (size[0], size[1]), rgb_stats, rule, bool(raw.get("dynamic_size", False)))


def parse_manifest(model_dir: Path, raw: dict[str, Any]) -> Manifest:
    """Validate a manifest document: every file it names is confined to the folder and checksummed, every graph
    is listed in ``files``, the input section is usable. One ``ModelDirError`` line otherwise."""
    files = _parse_files(model_dir, raw.get("files"))
    graphs = _parse_graphs(model_dir, raw.get("graphs"), files)
    input_spec = _parse_input(model_dir, raw.get("input"))
    labels = raw.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(v, str) for v in labels)):
        raise _fail(model_dir, "labels must be a list of strings")
    num_classes = raw.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)):
        raise _fail(model_dir, "num_classes must be an integer")
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise _fail(model_dir, f"{len(labels)} labels for {num_classes} classes")
    shared = (raw.get("export") or {}).get("shared_weights") if isinstance(raw.get("export"), dict) else None
    if isinstance(shared, dict) and shared.get("file") is not None:
        confined_path(model_dir, shared["file"], "shared weights file")
    return Manifest(
        model_dir=model_dir,
        raw=raw,
        model_name=raw.get("model_name") if isinstance(raw.get("model_name"), str) else None,
        network=raw.get("network") if isinstance(raw.get("network"), str) else None,
        random_weights=bool(raw.get("random_weights", False)),
        input=input_spec,
        num_classes=num_classes,
        labels=tuple(labels) if labels is not None else None,
        files=files,
        graphs=graphs,
    )


def load_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``model_dir/manifest.json``: the one place a model folder's manifest is checked."""
    model_dir = Path(model_dir)
    return parse_manifest(model_dir, read_manifest(model_dir))


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` as a dict (format version checked; ``load_manifest`` validates the rest)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelDirError(f"{model_dir}: no such folder")
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: expected an exported model folder, got a file")
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: no {MANIFEST_NAME}; is this a pvt-deploy export folder?")
    confined_path(model_dir, MANIFEST_NAME)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelDirError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path}: unsupported manifest format (expected format_version {FORMAT_VERSION})")
    return manifest


def write_manifest(model_dir: str | Path, manifest: dict[str, Any] | Manifest) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    if isinstance(manifest, Manifest):
        manifest = manifest.raw
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


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


def verify_files(model_dir: str | Path, manifest: dict[str, Any] | Manifest, names: list[str] | None = None) -> None:
    """Check size and sha256 of the named files (default: all) against the manifest.

    A corrupted or truncated graph raises ``ModelDirError`` instead of loading and giving wrong answers."""
    model_dir = Path(model_dir)
    typed = manifest if isinstance(manifest, Manifest) else parse_manifest(model_dir, manifest)
    for name, problem in file_problems(typed, names).items():
        if problem == "missing":
            raise ModelDirError(f"{model_dir}: {name} is listed in {MANIFEST_NAME} but missing")
        if problem == "checksum mismatch":
            raise ModelDirError(
                f"{model_dir / name}: checksum mismatch with {MANIFEST_NAME}; the file is corrupted or was changed"
            )
        raise ModelDirError(f"{model_dir}: {name} is {problem}")
