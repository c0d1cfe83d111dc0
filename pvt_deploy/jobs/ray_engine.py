"""The Ray Data engine of a bulk job: read the list, decode and preprocess in tasks, run the Runtime in an actor pool.

The pipeline yields rows back in input order (``preserve_order``) and the driver writes them through the same
``JobStore`` as the local engine, so resume, the lock and every output format work unchanged, and the rows equal
the local engine's: the decode tasks use the model's own ``Preprocessor`` and the actors call the same
``compute_part`` on the preprocessed rows. On a cluster, workers must see the input paths (and, for features, the
output folder) at the same paths as the driver: a shared or object-store-mounted file system.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.errors import ImageError
from pvt_deploy.jobs.run import JobEvents
from pvt_deploy.jobs.store import Part
from pvt_deploy.jobs.tasks import Decoded, JobSpec, compute_part
from pvt_deploy.preprocess import Preprocessor
from pvt_deploy.runtime import Runtime

DECODE_CPUS = 0.25
ACTOR_CPUS = 0.75
"""Per decode task and per Runtime actor: an actor per CPU still leaves room for decode tasks beside it."""


def _decode_batch(batch: dict[str, np.ndarray], preprocessor: Preprocessor) -> dict[str, Any]:
    """A Ray task: paths -> model rows (zeros where decoding failed) plus the failure messages."""
    rows, errors = [], []
    for path in batch["path"]:
        try:
            rows.append(preprocessor(str(path)))
            errors.append("")
        except ImageError as exc:
            rows.append(np.zeros((3, *preprocessor.size), np.float32))
            errors.append(str(exc))
    return {"index": batch["index"], "path": batch["path"], "row": np.stack(rows), "error": np.array(errors)}


class _InferActor:
    """One Runtime per actor, created once; each call turns a batch of decoded rows into finished rows."""

    def __init__(self, runtime_options: dict[str, Any], spec: JobSpec, features_dir: str) -> None:
        self.runtime = Runtime(**runtime_options)
        self.spec = spec
        self.features_dir = Path(features_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        indexes = [int(i) for i in batch["index"]]
        if indexes != list(range(indexes[0], indexes[0] + len(indexes))):
            raise RuntimeError("the Ray pipeline delivered a batch out of order")
        items = [
            Decoded(str(path), None if error else row, str(error) or None)
            for path, row, error in zip(batch["path"], batch["row"], batch["error"], strict=True)
        ]
        part, embeddings = compute_part(self.runtime, self.spec, items, indexes[0], 0, self.features_dir)
        result: dict[str, Any] = {"index": np.array(indexes), "row": np.array([json.dumps(r) for r in part.rows])}
        if embeddings is not None:
            result["embedding"] = embeddings
        return result


def _ensure_ray(address: str | None) -> Any:
    import ray

    for name in ("ray", "ray.data"):  # the job prints its own progress; Ray's INFO lines would interleave with it
        logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    return ray


def compute_on_ray(
    runtime: Runtime,
    spec: JobSpec,
    inputs: list[str],
    done: int,
    first_part: int,
    chunk_size: int,
    features_dir: Path,
    address: str | None,
    actors: int | None,
    events: JobEvents,
) -> Iterator[tuple[Part, np.ndarray | None]]:
    """Parts of ``chunk_size`` rows for ``inputs[done:]``, in order, computed by a Ray Data pipeline."""
    if done >= len(inputs):
        return
    ray = _ensure_ray(address)
    runtime_options = {
        "model_dir": str(runtime.model_dir.resolve()),
        "device": runtime.device,
        "precision": runtime.precision,
        "threads": runtime.threads or 1,  # one intra-op thread per actor: the pool is the parallelism
        "exif_transpose": runtime.exif_transpose,
    }
    size = int(actors or max(1, int(ray.available_resources().get("CPU", 1))))
    dataset = ray.data.from_items([{"index": i, "path": inputs[i]} for i in range(done, len(inputs))])
    # Different CPU shares keep Ray from fusing the decode tasks into the actors: decoding stays in tasks that any
    # free CPU can run, while each actor holds its Runtime (and a session) for the whole job.
    dataset = dataset.map_batches(
        _decode_batch, fn_kwargs={"preprocessor": runtime.spec}, batch_size=chunk_size, num_cpus=DECODE_CPUS
    )
    dataset = dataset.map_batches(
        _InferActor,
        fn_constructor_kwargs={"runtime_options": runtime_options, "spec": spec, "features_dir": str(features_dir)},
        batch_size=chunk_size,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=ACTOR_CPUS,
    )
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    start, part_index = done, first_part
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows.extend(json.loads(text) for text in batch["row"])
        if "embedding" in batch:
            vectors.extend(batch["embedding"])
        events.advance(len(batch["row"]))
        while len(rows) >= chunk_size or (rows and start + len(rows) == len(inputs)):
            take = min(chunk_size, len(rows))
            embeddings = np.stack(vectors[:take]).astype(np.float32) if vectors else None
            yield Part(part_index, start, start + take, rows[:take]), embeddings
            rows, vectors = rows[take:], vectors[take:]
            start, part_index = start + take, part_index + 1
