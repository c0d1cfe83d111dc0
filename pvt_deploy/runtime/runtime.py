"""``Runtime``: an exported folder -> probabilities, top-k labels, embeddings and feature maps, without torch."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from pvt_deploy.errors import DeviceError, ImageError, ModelDirError
from pvt_deploy.manifest import GRAPH_OUTPUTS, MetadataKey, read_manifest, verify_files
from pvt_deploy.runtime.inputs import PreprocessSpec, describe, iter_items, prepare
from pvt_deploy.runtime.results import ON_ERROR_CHOICES, BatchResult, ItemError
from pvt_deploy.runtime.sessions import (
    CUDA_PROVIDER,
    DEVICES,
    GraphSession,
    SessionConfig,
    create_session,
    requested_providers,
    warn_cpu_fallback,
)

DEFAULT_BATCH_SIZE = 1
"""Micro-batch size on the CPU, from benchmarks/runtime_microbatch.py (docs/runtime.md): for b2 at 384 on the 2-core
dev machine, batch 1 was the cheapest per image (batch 8: +13..19% with 1 thread, within noise or worse with 2),
and it has the lowest latency and memory."""

DEFAULT_CUDA_BATCH_SIZE = 16
"""On a GPU larger batches amortise launch overhead; unmeasured this session (no GPU), a conservative choice."""

OnError = Literal["raise", "collect"]
Raise = Literal["raise"]
Collect = Literal["collect"]
Images = Any  # one image or an iterable of them; see inputs.iter_items


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

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        device: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        batch_size: int | None = None,
        *,
        cache_optimized: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.precision = precision
        self.threads = threads
        graphs = self.manifest.get("graphs") or {}
        if not graphs:
            raise ModelDirError(f"{self.model_dir}: the manifest lists no graphs")
        if not any(precision in variants for variants in graphs.values()):
            raise ModelDirError(
                f"{self.model_dir}: no graph exported at precision {precision!r}; available: "
                f"{', '.join(self.precisions)}"
            )
        self._providers = requested_providers(device)
        self._requested_batch_size = int(batch_size) if batch_size is not None else None
        self._cache_optimized = cache_optimized
        self.spec = _spec_from_manifest(self.model_dir, self.manifest)
        self._sessions: dict[str, GraphSession] = {}
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._labels: list[str] | None = None

    # ----- description -------------------------------------------------------------------------------------------

    @property
    def precisions(self) -> list[str]:
        """Precisions exported for every graph of this folder."""
        graphs = self.manifest.get("graphs") or {}
        found: list[str] = []
        for variants in graphs.values():
            for name in variants:
                if name not in found:
                    found.append(name)
        return found

    @property
    def graphs(self) -> list[str]:
        """Graphs available at this Runtime's precision."""
        return [g for g, variants in (self.manifest.get("graphs") or {}).items() if self.precision in variants]

    @property
    def batch_size(self) -> int:
        if self._requested_batch_size is not None:
            return self._requested_batch_size
        return DEFAULT_CUDA_BATCH_SIZE if self._providers[0] == CUDA_PROVIDER else DEFAULT_BATCH_SIZE

    @property
    def labels(self) -> list[str]:
        """Class names in index order (the manifest's copy, else the classify graph's own metadata)."""
        if self._labels is not None:
            return list(self._labels)
        labels = self.manifest.get("labels")
        if isinstance(labels, list):
            self._labels = [str(label) for label in labels]
            return self._labels
        graph = "classify" if "classify" in self.graphs else self.graphs[0]
        raw = self._session(graph).metadata.get(MetadataKey.LABELS)
        if raw is None:
            raise ModelDirError(f"{self.model_dir}: no labels in the manifest or the {graph} graph's metadata")
        self._labels = [str(label) for label in json.loads(raw)]
        return self._labels

    @property
    def metadata(self) -> dict[str, Any]:
        """The manifest plus the parsed metadata of each graph loaded so far (JSON values decoded)."""
        with self._lock:
            loaded = dict(self._sessions)
        return {
            "manifest": self.manifest,
            "preprocess": {
                "size": list(self.spec.size),
                "rgb_stats": self.spec.rgb_stats,
                "center_crop": self.spec.center_crop,
                "apply_exif": self.spec.apply_exif,
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
        return "cuda" if self._providers[0] == CUDA_PROVIDER else "cpu"

    def load(self, graphs: Iterable[str] | None = None) -> Runtime:
        """Create sessions now (service warm-up) instead of on first use."""
        for graph in graphs if graphs is not None else self.graphs:
            self._session(graph)
        return self

    def session(self, graph: str) -> GraphSession:
        """The loaded session of one graph (created and verified on first use)."""
        return self._session(graph)

    # ----- inference ----------------------------------------------------------------------------------------------

    def preprocess(self, images: Images) -> np.ndarray:
        """The model input tensor (N, 3, H, W) float32 for ``images``; raises ``ImageError`` on a bad one."""
        rows = []
        for index, item in enumerate(iter_items(images)):
            rows.append(_prepare_or_raise(index, item, self.spec))
        if not rows:
            return np.empty((0, 3, *self.spec.size), dtype=np.float32)
        return np.stack(rows)

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
        labels = self.labels
        answers: list[list[tuple[str, float]] | None] = []
        for row, ok in zip(result.value["probabilities"], result.ok, strict=True):
            if not ok:
                answers.append(None)
                continue
            order = np.argsort(-row, kind="stable")[:top_k]
            answers.append([(labels[i], float(row[i])) for i in order])
        return self._finish(result, answers, on_error)

    @overload
    def embed(self, images: Images, *, on_error: Raise = ...) -> np.ndarray: ...
    @overload
    def embed(self, images: Images, *, on_error: Collect) -> BatchResult[Any]: ...

    def embed(self, images: Images, *, on_error: OnError = "raise") -> np.ndarray | BatchResult[Any]:
        """(N, D) float32 embeddings (D = 512 for b2): the ``embed`` graph, else the classify graph's output."""
        graph = "embed" if "embed" in self.graphs else "classify"
        result = self._run(graph, ("embedding",), images, on_error)
        return self._finish(result, result.value["embedding"], on_error)

    @overload
    def features(self, images: Images, *, on_error: Raise = ...) -> dict[str, np.ndarray]: ...
    @overload
    def features(self, images: Images, *, on_error: Collect) -> BatchResult[Any]: ...

    def features(self, images: Images, *, on_error: OnError = "raise") -> dict[str, np.ndarray] | BatchResult[Any]:
        """``{"stage1": ..., "stage4": ...}`` float32 NCHW feature maps."""
        result = self._run("features", GRAPH_OUTPUTS["features"], images, on_error)
        return self._finish(result, dict(result.value), on_error)

    # ----- internals ----------------------------------------------------------------------------------------------

    @staticmethod
    def _finish(result: BatchResult[Any], value: Any, on_error: OnError) -> Any:
        if on_error == "raise":
            return value
        result.value = value
        return result

    def _session(self, graph: str) -> GraphSession:
        session = self._sessions.get(graph)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(graph)
            if session is None:
                session = self._create_session(graph)
                self._sessions[graph] = session
        return session

    def _graph_files(self, graph_file: str) -> list[str]:
        """The graph plus the external-weight files it reads, all of which the manifest checksums."""
        names = [graph_file]
        shared = (self.manifest.get("export") or {}).get("shared_weights")
        if isinstance(shared, dict) and shared.get("file") and graph_file in shared.get("graphs", [graph_file]):
            names.append(shared["file"])
        for name in self.manifest.get("files", {}):
            if name.endswith((".bin", ".data", ".onnx_data")) and name not in names:
                names.append(name)
        return names

    def _create_session(self, graph: str) -> GraphSession:
        variants = (self.manifest.get("graphs") or {}).get(graph)
        if not variants:
            raise ModelDirError(f"{self.model_dir}: this export has no {graph!r} graph")
        entry = variants.get(self.precision)
        if entry is None:
            raise ModelDirError(
                f"{self.model_dir}: the {graph!r} graph has no {self.precision!r} variant; "
                f"available: {', '.join(variants)}"
            )
        graph_file = entry["file"] if isinstance(entry, dict) else str(entry)
        to_check = [name for name in self._graph_files(graph_file) if name not in self._verified]
        verify_files(self.model_dir, self.manifest, to_check)
        self._verified.update(to_check)
        record = self.manifest["files"][graph_file]
        config = SessionConfig(self._providers, self.threads, self._cache_optimized)
        raw, from_cache = create_session(self.model_dir / graph_file, record["sha256"], config)
        session = GraphSession(raw, GRAPH_OUTPUTS.get(graph, tuple(o.name for o in raw.get_outputs())), from_cache)
        if self._providers[0] == CUDA_PROVIDER and not session.on_cuda:
            if self.device == "cuda":
                raise DeviceError("device 'cuda' requested but onnxruntime could not start its CUDA provider")
            warn_cpu_fallback("the CUDA provider failed to load")
        _check_metadata(self.model_dir / graph_file, session.metadata, self.spec)
        return session

    def _run(self, graph: str, names: tuple[str, ...], images: Images, on_error: OnError) -> BatchResult[Any]:
        """Prepare inputs one by one, run them in micro-batches, and keep every answer in its input's row."""
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        session = self._session(graph)
        batch_size = self.batch_size
        sources: list[str] = []
        ok: list[bool] = []
        errors: list[ItemError] = []
        pending: list[np.ndarray] = []
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}

        def flush() -> None:
            if pending:
                produced = session.run(np.stack(pending), names)
                for name in names:
                    outputs[name].append(produced[name])
                pending.clear()

        for index, item in enumerate(iter_items(images)):
            source = describe(item)
            sources.append(source)
            try:
                row = prepare(item, self.spec)
            except ImageError as exc:
                error = ItemError(index, source, str(exc))
                if on_error == "raise":
                    raise error.to_exception() from None
                errors.append(error)
                ok.append(False)
                continue
            if pending and row.shape != pending[0].shape:  # dynamic-size models: one size per micro-batch
                flush()
            pending.append(row)
            ok.append(True)
            if len(pending) >= batch_size:
                flush()
        flush()

        mask = np.asarray(ok, dtype=bool)
        values = {name: _scatter(outputs[name], mask, session, name) for name in names}
        return BatchResult(value=values, ok=mask, sources=sources, errors=errors)


def _prepare_or_raise(index: int, item: Any, spec: PreprocessSpec) -> np.ndarray:
    try:
        return prepare(item, spec)
    except ImageError as exc:
        raise ItemError(index, describe(item), str(exc)).to_exception() from None


def _scatter(chunks: list[np.ndarray], mask: np.ndarray, session: GraphSession, name: str) -> np.ndarray:
    """Good rows back into input order; rows of failed inputs are NaN."""
    if chunks and mask.all() and len(chunks) == 1:
        return chunks[0]
    if chunks:
        good = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        row_shape = good.shape[1:]
    else:
        good = None
        row_shape = _static_row_shape(session, name)
    if mask.all() and good is not None:
        return good
    full = np.full((mask.size, *row_shape), np.nan, dtype=np.float32)
    if good is not None:
        full[mask] = good
    return full


def _static_row_shape(session: GraphSession, name: str) -> tuple[int, ...]:
    for output in session.session.get_outputs():
        if output.name == name:
            return tuple(dim if isinstance(dim, int) else 0 for dim in output.shape[1:])
    return ()


def _spec_from_manifest(model_dir: Path, manifest: dict[str, Any]) -> PreprocessSpec:
    section = manifest.get("input") or {}
    try:
        size = tuple(int(v) for v in section["size"])
        stats = section["rgb_stats"]
        rgb_stats = {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}
    except (KeyError, TypeError, ValueError):
        raise ModelDirError(f"{model_dir}: the manifest's input section lacks size or rgb_stats") from None
    if len(size) != 2:
        raise ModelDirError(f"{model_dir}: the manifest's input size must be [height, width], got {list(size)}")
    resize = section.get("resize") or {}
    if isinstance(resize, str):
        resize = json.loads(resize)
    interpolation = resize.get("interpolation", "bicubic")
    if interpolation != "bicubic":
        raise ModelDirError(f"{model_dir}: unsupported resize interpolation {interpolation!r} (expected bicubic)")
    return PreprocessSpec(
        size=(size[0], size[1]),
        rgb_stats=rgb_stats,
        center_crop=float(resize.get("center_crop", 1.0)),
        apply_exif=bool(resize.get("apply_exif", False)),
        dynamic_size=bool(section.get("dynamic_size", False)),
    )


def _parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def _check_metadata(path: Path, metadata: dict[str, str], spec: PreprocessSpec) -> None:
    """The graph's own metadata must describe the same preprocessing the manifest does."""
    try:
        if MetadataKey.INPUT_SIZE in metadata and tuple(json.loads(metadata[MetadataKey.INPUT_SIZE])) != spec.size:
            raise ModelDirError(f"{path}: its input_size metadata disagrees with the manifest ({spec.size})")
        if MetadataKey.RGB_STATS in metadata:
            stats = json.loads(metadata[MetadataKey.RGB_STATS])
            for key in ("mean", "std"):
                if not np.allclose(stats[key], spec.rgb_stats[key], rtol=0, atol=1e-7):
                    raise ModelDirError(f"{path}: its rgb_stats metadata disagrees with the manifest")
    except (ValueError, KeyError, TypeError):
        raise ModelDirError(f"{path}: unreadable preprocessing metadata") from None
