"""``Runtime``: an exported folder -> probabilities, top-k labels, embeddings and feature maps, without torch."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from pvt_deploy.errors import DeviceError, ModelDirError
from pvt_deploy.format.codec import to_json
from pvt_deploy.format.manifest import (
    MANIFEST_NAME,
    GraphEntry,
    Manifest,
    MetadataKey,
    TensorSpec,
    load_manifest,
    verify_files,
)
from pvt_deploy.preprocess import Prepared, Preprocessor
from pvt_deploy.runtime.config import RuntimeConfig
from pvt_deploy.runtime.graph_files import external_data_locations
from pvt_deploy.runtime.graph_preprocess import ImagePixels
from pvt_deploy.runtime.operations import top_k as rank
from pvt_deploy.runtime.results import BatchResult, ItemLog
from pvt_deploy.runtime.sessions import (
    GPU_PROVIDERS,
    GraphSession,
    create_session,
    normalize_providers,
    provider_name,
    requested_providers,
    session_options,
    warn_cpu_fallback,
)

DEFAULT_BATCH_SIZE = 1
"""Micro-batch size on the CPU, from benchmarks/runtime_microbatch.py (docs/runtime.md): for b2 at 384 on the 2-core
dev machine, batch 1 was the cheapest per image (batch 8: +13..19% with 1 thread, within noise or worse with 2),
and it has the lowest latency and memory."""

DEFAULT_CUDA_BATCH_SIZE = 16
"""On a GPU larger batches amortise launch overhead; not measured on a GPU yet, a conservative choice."""

OnError = Literal["raise", "collect"]
Raise = Literal["raise"]
Collect = Literal["collect"]
Images = Any  # one image or an iterable of them; see preprocess.iter_items


class Runtime:
    """Run an exported PVT v2 folder with onnxruntime (CPU or CUDA). Safe to share between threads.

    ``images`` everywhere may be a path, bytes, a binary file object, a PIL image, an HxWx3 uint8 array or a
    preprocessed float32 NCHW array, alone or as a list / iterable. Outputs always have one row per input.

    ``on_error="raise"`` (default) raises ``ImageError`` naming the first bad input. ``on_error="collect"`` returns
    a ``BatchResult`` whose ``value`` has every good input's answer in its row (bad rows NaN / None) and whose
    ``errors`` say why each bad one failed."""

    def __repr__(self) -> str:
        return (
            f"Runtime({str(self.model_dir)!r}, device={self.device!r} ({self.active_device}), "
            f"precision={self.precision!r}, batch_size={self.batch_size})"
        )

    def __init__(self, model_dir: str | os.PathLike[str], config: RuntimeConfig | None = None, **options: Any) -> None:
        """``config``: every run option in one value (``RuntimeConfig``); keyword ``options`` are its fields, as a
        shorthand (``Runtime(folder, device="cpu", precision="int8")``) or as changes to ``config``.
        ``providers``: onnxruntime execution providers to use as given (names or (name, options) pairs), e.g.
        ``["OpenVINOExecutionProvider", "CPUExecutionProvider"]``; overrides ``device``. ``exif_transpose``: rotate
        images per their EXIF Orientation first (birder does not). ``max_image_bytes``: the largest image file
        read (``None``: no limit). ``preprocess="graph"``: classify/predict/embed run the image-input graphs
        (resize and normalisation in ONNX, docs/portability.md)."""
        config = config if config is not None else RuntimeConfig()
        self.config: RuntimeConfig = config.replace(**options) if options else config
        self.model_dir = Path(model_dir)
        self.manifest: Manifest = load_manifest(self.model_dir)
        precision = self.config.precision
        if precision not in self.manifest.precisions:
            raise ModelDirError(
                f"{self.model_dir}: no graph exported at precision {precision!r}; available: "
                f"{', '.join(self.precisions)}"
            )
        providers = self.config.providers
        self._providers = normalize_providers(providers) if providers is not None else requested_providers(self.device)
        self.spec = Preprocessor.from_input_spec(
            self.manifest.input,
            apply_exif=self.manifest.input.resize.apply_exif or self.config.exif_transpose,
            max_file_bytes=self.config.max_image_bytes,
            max_pixels=self.config.max_pixels,
        )
        self._image_pixels = ImagePixels(self.spec) if self.preprocess_mode == "graph" else None
        if self._image_pixels is not None:
            if precision != "fp32":
                raise ModelDirError(f"{self.model_dir}: the image-input graphs are fp32 only; use preprocess='python'")
            self.manifest.image_entry("classify" if "classify" in self.manifest.image_graphs else "embed")
        self._sessions: dict[str, GraphSession] = {}
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    # ----- description -------------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """The device asked for (``auto``, ``cpu`` or ``cuda``); ``active_device`` says where sessions run."""
        return self.config.device

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def threads(self) -> int | None:
        return self.config.threads

    @property
    def exif_transpose(self) -> bool:
        """Whether images are turned per their EXIF Orientation: asked for, or required by the manifest."""
        return self.spec.apply_exif

    @property
    def preprocess_mode(self) -> str:
        """``python`` (tensor graphs) or ``graph`` (image-input graphs)."""
        return self.config.preprocess

    @property
    def precisions(self) -> list[str]:
        """Precisions exported for some graph of this folder."""
        return self.manifest.precisions

    @property
    def graphs(self) -> list[str]:
        """Graphs available at this Runtime's precision."""
        return [g for g, variants in self.manifest.graphs.items() if self.precision in variants]

    @property
    def providers(self) -> list[str]:
        """The execution providers asked for, in order (loaded sessions may have fallen back; see ``active_device``)."""
        return [provider_name(p) for p in self._providers]

    @property
    def batch_size(self) -> int:
        if self.config.batch_size is not None:
            return self.config.batch_size
        return DEFAULT_CUDA_BATCH_SIZE if provider_name(self._providers[0]) in GPU_PROVIDERS else DEFAULT_BATCH_SIZE

    @property
    def labels(self) -> list[str]:
        """Class names in index order (the manifest's, which each graph's own metadata must agree with)."""
        if self.manifest.labels is not None:
            return list(self.manifest.labels)
        graph = "classify" if "classify" in self.graphs else self.graphs[0]
        raw = self._session(graph).metadata.get(MetadataKey.LABELS)
        if raw is None:
            raise ModelDirError(f"{self.model_dir}: no labels in the manifest or the {graph} graph's metadata")
        try:
            return [str(label) for label in json.loads(raw)]
        except (ValueError, TypeError):
            raise ModelDirError(f"{self.model_dir}: the {graph} graph's labels metadata is not a JSON list") from None

    def graph_entry(self, graph: str) -> GraphEntry:
        """The manifest's entry (file, inputs, outputs) of ``graph`` at this Runtime's precision."""
        return self.manifest.entry(graph, self.precision)

    def output_shape(self, graph: str, name: str) -> tuple[int | str, ...]:
        """An output's shape as the manifest records it (ints, or names for dynamic dims such as ``"batch"``)."""
        for output in self.graph_entry(graph).outputs:
            if output.name == name:
                return output.shape
        raise ModelDirError(f"{self.model_dir}: the manifest's {graph} graph has no {name!r} output")

    def describe(self) -> dict[str, Any]:
        """The one JSON description of a loaded folder that ``info`` and services publish (no onnxruntime objects):
        what it is (name, network, untrained or not, labels, input, the preprocessing contract exactly as
        manifest.json holds it, graphs and image graphs) and how it runs (precision, device, providers, batch
        size, the whole ``RuntimeConfig``)."""
        manifest = self.manifest
        contract = manifest.input.preprocess
        return {
            "model_dir": str(self.model_dir),
            "model_name": manifest.model_name,
            "network": manifest.network,
            "random_weights": manifest.random_weights,
            "labels": self.labels,
            "input": {
                "name": manifest.input.name,
                "size": list(manifest.input.size),
                "dynamic_size": manifest.input.dynamic_size,
            },
            "preprocess": to_json(contract) if contract is not None else None,
            "precision": self.precision,
            "device": self.active_device,
            "providers": self.providers,
            "batch_size": self.batch_size,
            "graphs": {
                graph: {"file": entry.file, "outputs": list(entry.output_names)}
                for graph in self.graphs
                for entry in [self.graph_entry(graph)]
            },
            "image_graphs": {
                graph: {"file": entry.file, "outputs": list(entry.output_names)}
                for graph, entry in manifest.image_graphs.items()
            },
            "config": self.config.to_json(),
        }

    @property
    def metadata(self) -> dict[str, Any]:
        """The manifest plus the parsed metadata of each graph loaded so far (JSON values decoded)."""
        with self._lock:
            loaded = dict(self._sessions)
        return {
            "manifest": self.manifest.to_json(),
            "preprocess": {
                "size": list(self.spec.size),
                "rgb_stats": self.spec.rgb_stats,
                "center_crop": self.spec.center_crop,
                "apply_exif": self.spec.apply_exif,
                "exif_transpose": self.spec.apply_exif,
                "dynamic_size": self.spec.dynamic_size,
            },
            "graphs": {name: _parse_metadata(session.metadata) for name, session in loaded.items()},
            "device": self.active_device,
            "precision": self.precision,
            "batch_size": self.batch_size,
        }

    @property
    def active_device(self) -> str:
        """``cuda`` or ``cpu``: where loaded sessions run (before any load, where they are going to run)."""
        with self._lock:
            sessions = list(self._sessions.values())
        if sessions:
            return "cuda" if sessions[0].on_cuda else "cpu"
        return "cuda" if provider_name(self._providers[0]) in GPU_PROVIDERS else "cpu"

    def load(self, graphs: Iterable[str] | None = None) -> Runtime:
        """Create (and check) now, instead of on first use, the sessions that classify/embed/features run: the
        tensor graphs, or with ``preprocess="graph"`` the image-input graphs (service warm-up, ``info``)."""
        by_image = self._image_pixels is not None
        default = list(self.manifest.image_graphs) if by_image else self.graphs
        for graph in graphs if graphs is not None else default:
            self._session(graph, image=by_image)
        return self

    def session(self, graph: str) -> GraphSession:
        """The loaded session of one graph (created and verified on first use)."""
        return self._session(graph)

    # ----- inference ----------------------------------------------------------------------------------------------

    def preprocess(self, images: Images) -> np.ndarray:
        """The model input tensor (N, 3, H, W) float32 for ``images``; raises ``ImageError`` on a bad one."""
        return self.spec.batch(images)

    def prepare(self, images: Images) -> Prepared:
        """``preprocess`` as ``Prepared`` rows, which classify/predict/embed/features run without checking them again
        (a service decodes, batches, then runs: each row is checked once)."""
        return self.spec.prepare(images)

    @overload
    def classify(
        self, images: Images, return_embedding: Literal[False] = ..., *, on_error: Raise = ...
    ) -> np.ndarray: ...
    @overload
    def classify(
        self, images: Images, return_embedding: Literal[True], *, on_error: Raise = ...
    ) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def classify(self, images: Images, return_embedding: bool = ..., *, on_error: Collect) -> BatchResult[Any]: ...

    def classify(
        self, images: Images, return_embedding: bool = False, *, on_error: OnError = "raise"
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray] | BatchResult[Any]:
        """Softmax probabilities (N, classes) float32; with ``return_embedding`` also the (N, D) embedding."""
        names = ("probabilities", "embedding") if return_embedding else ("probabilities",)
        result = self._run("classify", names, images, on_error)
        probabilities = result.value["probabilities"]
        value = (probabilities, result.value["embedding"]) if return_embedding else probabilities
        return self._finish(result, value, on_error)

    @overload
    def predict(self, images: Images, top_k: int = ..., *, on_error: Raise = ...) -> list[list[tuple[str, float]]]: ...
    @overload
    def predict(self, images: Images, top_k: int = ..., *, on_error: Collect) -> BatchResult[Any]: ...

    def predict(
        self, images: Images, top_k: int = 5, *, on_error: OnError = "raise"
    ) -> list[list[tuple[str, float]]] | BatchResult[Any]:
        """Per image, the ``top_k`` (label, probability) pairs, most likely first (ties: lower class index first)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        result = self._run("classify", ("probabilities",), images, on_error)
        ranked = rank(result.value["probabilities"], self.labels, top_k)
        answers = [answer if ok else None for answer, ok in zip(ranked, result.ok, strict=True)]
        return self._finish(result, answers, on_error)

    @overload
    def embed(self, images: Images, *, on_error: Raise = ...) -> np.ndarray: ...
    @overload
    def embed(self, images: Images, *, on_error: Collect) -> BatchResult[Any]: ...

    def embed(self, images: Images, *, on_error: OnError = "raise") -> np.ndarray | BatchResult[Any]:
        """(N, D) float32 embeddings (D = 512 for b2): the ``embed`` graph, else the classify graph's output."""
        result = self._run(self.embedding_graph, ("embedding",), images, on_error)
        return self._finish(result, result.value["embedding"], on_error)

    @overload
    def features(self, images: Images, *, on_error: Raise = ...) -> dict[str, np.ndarray]: ...
    @overload
    def features(self, images: Images, *, on_error: Collect) -> BatchResult[Any]: ...

    def features(self, images: Images, *, on_error: OnError = "raise") -> dict[str, np.ndarray] | BatchResult[Any]:
        """``{"stage1": ..., "stage4": ...}`` float32 NCHW feature maps: every output the manifest lists for the
        features graph, in its order."""
        result = self._run("features", self.graph_entry("features").output_names, images, on_error)
        return self._finish(result, dict(result.value), on_error)

    @property
    def embedding_graph(self) -> str:
        """The graph ``embed`` runs: ``embed`` when exported, else ``classify`` (its ``embedding`` output)."""
        return "embed" if "embed" in self.graphs else "classify"

    # ----- internals ----------------------------------------------------------------------------------------------

    @staticmethod
    def _finish(result: BatchResult[Any], value: Any, on_error: OnError) -> Any:
        if on_error == "raise":
            return value
        result.value = value
        return result

    def _session(self, graph: str, image: bool = False) -> GraphSession:
        """The session of ``graph`` (its image-input variant with ``image``), created and checked on first use."""
        key = f"{graph}.image" if image else graph
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._create_session(graph, image)
                self._sessions[key] = session
        return session

    def _graph_files(self, entry: GraphEntry) -> list[str]:
        """The graph file plus every external-data file it names, each confined to the folder and listed (so
        checksummed) in the manifest; read from the graph's own bytes, not trusted from the manifest."""
        path = self.manifest.path(entry.file)
        self._verify([entry.file])
        locations = external_data_locations(path.read_bytes(), str(path))
        names = [entry.file]
        for location in sorted(locations):
            name = _folder_relative(self.model_dir, path.parent, location)
            if name not in self.manifest.files:
                raise ModelDirError(
                    f"{path}: reads external data {location!r}, which {MANIFEST_NAME} does not list with a checksum"
                )
            names.append(name)
        return names

    def _verify(self, names: list[str]) -> None:
        todo = [name for name in names if name not in self._verified]
        verify_files(self.manifest, todo)
        self._verified.update(todo)

    def _create_session(self, graph: str, image: bool) -> GraphSession:
        entry = self.manifest.image_entry(graph) if image else self.graph_entry(graph)
        self._verify(self._graph_files(entry))
        path = self.manifest.path(entry.file)
        options = session_options(self.threads, allow_spinning=self.config.spin_wait)
        raw = create_session(path, self._providers, options=options)
        session = GraphSession(raw, entry.output_names, path.name)
        gpu_asked = provider_name(self._providers[0]) in GPU_PROVIDERS
        if gpu_asked and not session.on_cuda:
            if self.config.providers is not None:
                raise DeviceError(f"onnxruntime could not start {provider_name(self._providers[0])}")
            if self.device == "cuda":
                raise DeviceError("device 'cuda' requested but onnxruntime could not start its CUDA provider")
            warn_cpu_fallback("the CUDA provider failed to load")
        if image:
            _check_graph(path, f"{graph}.image", "fp32", entry, session, self.manifest)
        else:
            _check_graph(path, graph, self.precision, entry, session, self.manifest)
            found, expected = session.inputs[0]["name"], self.manifest.input.name
            if found != expected:
                raise ModelDirError(f"{path}: its input is {found!r}, the manifest says {expected!r}")
        return session

    def _run(self, graph: str, names: tuple[str, ...], images: Images, on_error: OnError) -> BatchResult[Any]:
        """Prepare inputs one by one, run them in micro-batches, and keep every answer in its input's row.

        The input adapter is the only difference between the two preprocessing modes: ``python`` prepares (3, H, W)
        float32 rows for the tensor graph and stacks them; ``graph`` prepares uint8 [H, W, C] pixels for the image
        graph, which takes one image at a time. Both get the same session checks, limits and per-item errors."""
        by_image = self._image_pixels is not None
        session = self._session(graph, image=by_image)
        missing = [name for name in names if name not in session.output_names]
        if missing:
            raise ModelDirError(f"{self.model_dir}: the manifest's {graph} graph has no {', '.join(missing)} output")
        prepare: Any = self._image_pixels if by_image else self.spec
        if isinstance(images, Prepared):  # rows this runtime's pipeline made: nothing to check again
            images, prepare = images.rows, (prepare if by_image else _as_is)
        # an image graph takes one image of any size; a graph that is not batch-invariant runs row by row, so no
        # answer depends on its batch neighbours
        batched = not by_image and bool(self.graph_entry(graph).batch_invariant)
        batch_size = self.batch_size if batched else 1
        log = ItemLog()
        pending: list[np.ndarray] = []
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}

        def flush() -> None:
            if pending:
                produced = session.run(pending[0] if by_image else np.stack(pending), names)
                for name in names:
                    outputs[name].append(produced[name])
                pending.clear()

        for row in log.prepared(images, prepare, on_error):
            if row is None:
                continue
            if pending and row.shape != pending[0].shape:  # dynamic-size models: one size per micro-batch
                flush()
            pending.append(row)
            if len(pending) >= batch_size:
                flush()
        flush()

        mask = np.asarray(log.ok, dtype=bool)
        return log.result({name: _scatter(outputs[name], mask, session, name) for name in names})


def _as_is(row: np.ndarray) -> np.ndarray:
    return row


def _scatter(chunks: list[np.ndarray], mask: np.ndarray, session: GraphSession, name: str) -> np.ndarray:
    """Good rows back into input order; rows of failed inputs are NaN."""
    if chunks and mask.all() and len(chunks) == 1:
        return chunks[0]
    if chunks:
        good = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        row_shape = good.shape[1:]
    else:
        good = None
        row_shape = session.output_row_shape(name)
    if mask.all() and good is not None:
        return good
    full = np.full((mask.size, *row_shape), np.nan, dtype=np.float32)
    if good is not None:
        full[mask] = good
    return full


def _folder_relative(model_dir: Path, graph_dir: Path, location: str) -> str:
    """An external-data location (relative to the graph file) as a manifest name, if it stays in the folder."""
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise ModelDirError(f"{model_dir}: a graph reads external data at {location!r}, outside the model folder")
    relative = (graph_dir / location).relative_to(model_dir)
    return relative.as_posix()


def _parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def _dims_agree(graph_shape: list[Any], expected: tuple[int | str, ...]) -> bool:
    if not expected:  # the manifest promised no shape
        return True
    if len(graph_shape) != len(expected):
        return False
    for got, want in zip(graph_shape, expected, strict=True):
        if isinstance(want, int) != isinstance(got, int) or (isinstance(want, int) and got != want):
            return False
    return True


def _check_tensors(path: Path, kind: str, found: list[dict[str, Any]], expected: tuple[TensorSpec, ...]) -> None:
    by_name = {value["name"]: value for value in found}
    if set(by_name) != {spec.name for spec in expected}:
        raise ModelDirError(
            f"{path}: its {kind}s {sorted(by_name)} differ from the manifest's {sorted(s.name for s in expected)}"
        )
    for spec in expected:
        value = by_name[spec.name]
        if value["dtype"] != spec.dtype or not _dims_agree(value["shape"], spec.shape):
            shape = "x".join(str(d) for d in value["shape"])
            want = "x".join(str(d) for d in spec.shape)
            raise ModelDirError(
                f"{path}: {kind} {spec.name!r} is {value['dtype']} [{shape}], the manifest says {spec.dtype} [{want}]"
            )


def _check_graph(
    path: Path, graph: str, precision: str, entry: GraphEntry, session: GraphSession, manifest: Manifest
) -> None:
    """The loaded graph must be the one the manifest describes: same inputs and outputs (names, dtypes, static
    dims) and pvt-deploy metadata that agrees with the manifest (graph, precision, preprocessing, labels)."""
    _check_tensors(path, "input", session.inputs, entry.inputs)
    _check_tensors(path, "output", session.outputs, entry.outputs)
    metadata = session.metadata
    missing = [key for key in (MetadataKey.GRAPH, MetadataKey.INPUT_SIZE, MetadataKey.RGB_STATS) if key not in metadata]
    if missing:
        raise ModelDirError(f"{path}: not a pvt-deploy graph (no {', '.join(missing)} metadata)")
    if metadata[MetadataKey.GRAPH] != graph:
        raise ModelDirError(f"{path}: holds the {metadata[MetadataKey.GRAPH]!r} graph, the manifest says {graph!r}")
    recorded_precision = metadata.get(MetadataKey.PRECISION)
    if recorded_precision is not None and recorded_precision != precision:
        raise ModelDirError(f"{path}: is a {recorded_precision} graph, the manifest says {precision}")
    spec = manifest.input
    try:
        if tuple(json.loads(metadata[MetadataKey.INPUT_SIZE])) != spec.size:
            raise ModelDirError(f"{path}: its input_size metadata disagrees with the manifest ({list(spec.size)})")
        stats = json.loads(metadata[MetadataKey.RGB_STATS])
        for key, expected in spec.rgb_stats.as_dict().items():
            if not np.allclose(stats[key], expected, rtol=0, atol=1e-7):
                raise ModelDirError(f"{path}: its rgb_stats metadata disagrees with the manifest")
        if MetadataKey.DYNAMIC_SIZE in metadata and (metadata[MetadataKey.DYNAMIC_SIZE] == "true") != spec.dynamic_size:
            raise ModelDirError(f"{path}: its dynamic_size metadata disagrees with the manifest")
        labels = json.loads(metadata[MetadataKey.LABELS]) if MetadataKey.LABELS in metadata else None
        if labels is not None and manifest.labels is not None and [str(v) for v in labels] != list(manifest.labels):
            raise ModelDirError(f"{path}: its labels disagree with the manifest's")
    except (ValueError, KeyError, TypeError):
        raise ModelDirError(f"{path}: unreadable pvt-deploy metadata") from None
