"""One chunk of a bulk job: inputs -> rows (and embeddings), through the public ``Runtime`` API only.

Both engines call ``compute_part``: the local one with paths, the Ray one with rows its decode tasks already
preprocessed (``Decoded``), so both produce the same rows, the same embeddings and the same error messages.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pvt_deploy.decode_budget import DecodeBudget, estimate_decoded_bytes, process_decode_budget
from pvt_deploy.errors import ImageError
from pvt_deploy.files import atomic_write_bytes
from pvt_deploy.jobs.store import Part
from pvt_deploy.runtime import BatchResult, ItemError, Runtime
from pvt_deploy.runtime.operations import l2_normalize, top_k

TASKS = ("predict", "embed", "features")

T = TypeVar("T")


@dataclass(frozen=True)
class JobSpec:
    """What each row holds. ``top_k`` > 0 adds labels and probabilities (always for predict); ``normalize`` gives
    L2-normalised embeddings (the default is birder's raw embedding)."""

    task: str
    top_k: int = 0
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "predict" and self.top_k < 1:
            raise ValueError("predict needs top_k >= 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decoded:
    """An input a decode task already turned into the model's (3, H, W) row, or the reason it could not."""

    path: str
    row: np.ndarray | None = None
    error: str | None = None


def model_identity(runtime: Runtime, spec: JobSpec) -> dict[str, Any]:
    """What must not change between a run and its resume: the folder, the graph file and its digest, precision."""
    graph = "features" if spec.task == "features" else ("classify" if spec.top_k else runtime.embedding_graph)
    entry = runtime.graph_entry(graph)
    return {
        "model_dir": str(runtime.model_dir.resolve()),
        "model_name": runtime.manifest.model_name,
        "graph": entry.file,
        "graph_sha256": runtime.manifest.files[entry.file].sha256,
        "precision": runtime.precision,
    }


def decode_within_budget(path: str, decode: Callable[[str], T], max_pixels: int | None) -> T:
    """``decode(path)`` holding the image's estimated decoded bytes of the process's ``DecodeBudget``: it waits
    while other decodes hold the budget, and an image that alone needs more than the whole budget is an
    ``ImageError`` (that input's error row). The Ray engine's decode tasks decode through this."""
    with process_decode_budget().decoding(path, max_pixels=max_pixels, timeout=None):
        return decode(path)


def _within_budget(
    items: Sequence[Any], needs: Sequence[int], budget: DecodeBudget, advance: Callable[[int], None] | None
) -> Iterator[Any]:
    """Yield the items as the runtime pulls them, each holding its decoded bytes of ``budget`` until the next pull:
    the runtime decodes an input right after pulling it and before pulling the next (it consumes lazily, micro-batch
    by micro-batch), so the reservation spans that input's decode. Reports each input as pulled, so a progress bar
    moves per image rather than per chunk."""
    for item, need in zip(items, needs, strict=True):
        with budget.reserve(need, timeout=None):
            yield item
        if advance is not None:
            advance(1)


def compute_part(
    runtime: Runtime,
    spec: JobSpec,
    items: Sequence[str | Decoded],
    start: int,
    part_index: int,
    features_dir: Path | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[Part, np.ndarray | None]:
    """Rows for inputs ``start .. start + len(items)``: every input is a row, failed ones with their error."""
    paths = [item.path if isinstance(item, Decoded) else item for item in items]
    budget = process_decode_budget()
    # decoded rows need no budget; a path needs its header's estimate, held while the runtime decodes it
    needs = [
        0 if isinstance(item, Decoded) else estimate_decoded_bytes(item, max_pixels=runtime.spec.max_pixels) or 0
        for item in items
    ]
    refused: dict[int, str] = {}  # inputs that never reach the runtime: decode failures, images over the budget
    for i, item in enumerate(items):
        if isinstance(item, Decoded):
            if item.row is None:
                refused[i] = str(item.error)
            continue
        try:
            budget.check_fits(needs[i])
        except ImageError as exc:
            refused[i] = str(exc)
    runnable = [i for i in range(len(items)) if i not in refused]
    inputs = [items[i].row if isinstance(items[i], Decoded) else items[i] for i in runnable]
    if advance is not None and refused:
        advance(len(refused))
    labels: list[list[tuple[str, float]]] | None = None
    embeddings: np.ndarray | None = None
    maps: dict[str, np.ndarray] | None = None
    # closing: the last input's reservation is given back even when the runtime stops pulling early
    with contextlib.closing(_within_budget(inputs, [needs[i] for i in runnable], budget, advance)) as feed:
        if spec.task == "predict" or (spec.task == "embed" and spec.top_k):
            result: BatchResult[Any] = runtime.classify(feed, return_embedding=spec.task == "embed", on_error="collect")
            probabilities = result.value[0] if spec.task == "embed" else result.value
            labels = top_k(probabilities, runtime.labels, spec.top_k)
            if spec.task == "embed":
                embeddings = result.value[1]
        elif spec.task == "embed":
            result = runtime.embed(feed, on_error="collect")
            embeddings = result.value
        else:
            result = runtime.features(feed, on_error="collect")
            maps = result.value
    if embeddings is not None and spec.normalize:
        embeddings = l2_normalize(embeddings)

    errors = {runnable[error.index]: str(error) for error in result.errors}
    for i, reason in refused.items():
        errors[i] = str(ItemError(i, paths[i], reason))
    rows: list[dict[str, Any]] = []
    full = np.full((len(items), embeddings.shape[1]), np.nan, np.float32) if embeddings is not None else None
    slots = {position: slot for slot, position in enumerate(runnable)}
    for position, path in enumerate(paths):
        row: dict[str, Any] = {"index": start + position, "path": path, "status": "ok", "error": None}
        if position in errors:
            row.update(status="error", error=errors[position])
        slot = slots.get(position)
        if labels is not None:
            ranked = labels[slot] if slot is not None and position not in errors else []
            row["labels"] = [label for label, _ in ranked]
            row["probabilities"] = [probability for _, probability in ranked]
        if full is not None and slot is not None and position not in errors:
            full[position] = embeddings[slot]  # type: ignore[index]
        if maps is not None:
            row["file"] = None
            if slot is not None and position not in errors and features_dir is not None:
                row["file"] = _save_maps(
                    features_dir, start + position, {k: v[slot : slot + 1] for k, v in maps.items()}
                )
        rows.append(row)
    return Part(part_index, start, start + len(items), rows), full


def _save_maps(folder: Path, index: int, maps: dict[str, np.ndarray]) -> str:
    name = f"{index:08d}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **maps)
    atomic_write_bytes(folder / name, buffer.getvalue())
    return name
