"""The Ray Data engine of a bulk job: read the list, decode and preprocess in tasks, run the Runtime in an actor pool.

The pipeline yields rows back in input order (``preserve_order``) and the driver writes them through the same
``JobStore`` as the local engine, so resume, the lock and every output format work unchanged, and the rows equal
the local engine's: the decode tasks use the model's own ``Preprocessor``, the actors build their ``Runtime`` from
the job's whole ``RuntimeConfig`` (batch size, providers, limits: nothing is rebuilt option by option) and call the
same ``compute_part`` on the preprocessed rows, and the rows come back as Arrow columns. On a cluster, workers must
see the input paths (and, for features, the output folder) at the same paths as the driver: a shared or
object-store-mounted file system.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.decode_budget import process_decode_budget
from pvt_deploy.errors import ImageError
from pvt_deploy.jobs.engine import ComputedPart, JobEvents, JobPlan
from pvt_deploy.jobs.store import Part
from pvt_deploy.jobs.tasks import Decoded, JobSpec, compute_part, decode_within_budget
from pvt_deploy.preprocess import Preprocessor
from pvt_deploy.runtime import Runtime
from pvt_deploy.runtime.config import RuntimeConfig

DECODE_CPUS = 0.25
ACTOR_CPUS = 0.75
"""Per decode task and per Runtime actor: an actor per CPU still leaves room for decode tasks beside it."""


def _decode_batch(batch: dict[str, np.ndarray], preprocessor: Preprocessor, decode_limit_bytes: int) -> dict[str, Any]:
    """A Ray task: paths -> model rows (zeros where decoding failed) plus the failure messages. Each decode holds
    its bytes of the worker process's decoded-memory budget (the driver's limit), like the local engine's."""
    process_decode_budget().set_limit(decode_limit_bytes)
    rows, errors = [], []
    for path in batch["path"]:
        try:
            rows.append(decode_within_budget(str(path), preprocessor, preprocessor.max_pixels))
            errors.append("")
        except ImageError as exc:
            rows.append(np.zeros((3, *preprocessor.size), np.float32))
            errors.append(str(exc))
    return {"index": batch["index"], "path": batch["path"], "row": np.stack(rows), "error": np.array(errors)}


def rows_schema(spec: JobSpec, embedding_dim: int | None) -> Any:
    """The Arrow schema of finished rows between actor and driver: the row dict's keys in its own order, then the
    embedding (NaN rows for failed inputs)."""
    import pyarrow as pa

    fields = [
        pa.field("index", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
    if spec.top_k:
        fields += [pa.field("labels", pa.list_(pa.string())), pa.field("probabilities", pa.list_(pa.float64()))]
    if spec.task == "features":
        fields.append(pa.field("file", pa.string()))
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    return pa.schema(fields)


def part_to_arrow(spec: JobSpec, part: Part, embeddings: np.ndarray | None) -> Any:
    """A finished part as one Arrow table (what an actor returns)."""
    import pyarrow as pa

    dim = None if embeddings is None else int(embeddings.shape[1])
    schema = rows_schema(spec, dim)
    columns: dict[str, Any] = {name: [row[name] for row in part.rows] for name in schema.names if name != "embedding"}
    if embeddings is not None:
        values = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1), pa.float32())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.table(columns, schema=schema)


def rows_from_arrow(table: Any) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """``part_to_arrow``'s table -> the row dicts and the (N, D) float32 embeddings (or None)."""
    if "embedding" not in table.column_names:
        return table.to_pylist(), None
    column = table.column("embedding").combine_chunks()
    embeddings = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)
    return table.drop_columns(["embedding"]).to_pylist(), embeddings.astype(np.float32, copy=False)


class _InferActor:
    """One Runtime per actor, created once from the job's ``RuntimeConfig``; each call turns a batch of decoded
    rows into an Arrow table of finished rows."""

    def __init__(self, model_dir: str, config: RuntimeConfig, spec: JobSpec, features_dir: str) -> None:
        self.runtime = Runtime(model_dir, config)
        self.spec = spec
        self.features_dir = Path(features_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        indexes = [int(i) for i in batch["index"]]
        if indexes != list(range(indexes[0], indexes[0] + len(indexes))):
            raise RuntimeError("the Ray pipeline delivered a batch out of order")
        items = [
            Decoded(str(path), None if error else row, str(error) or None)
            for path, row, error in zip(batch["path"], batch["row"], batch["error"], strict=True)
        ]
        part, embeddings = compute_part(self.runtime, self.spec, items, indexes[0], 0, self.features_dir)
        return part_to_arrow(self.spec, part, embeddings)


def _ensure_ray(address: str | None) -> Any:
    import ray
    import ray.data  # configures Ray Data's loggers: quieten them after this, not before

    # the job prints its own progress and errors: Ray's INFO lines and notices would interleave with them
    for name in ("ray", "ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray's own warnings (deprecations raised while it copies its DataContext, advice on its concurrency settings)
    # are not the user's to act on
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    return ray


class RayEngine:
    """A Ray Data pipeline on the cluster at ``address`` (None: a local Ray, or the one already initialised), with
    ``actors`` Runtime actors (None: one per CPU Ray has)."""

    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None) -> None:
        self.address = address
        self.actors = actors

    def worker_config(self, config: RuntimeConfig) -> RuntimeConfig:
        """The job's configuration, with one intra-op thread per actor unless threads were given: the pool is the
        parallelism. The decode tasks preprocess in Python, so the image-input graphs (``preprocess="graph"``)
        are for the local engine."""
        if config.preprocess != "python":
            raise ValueError("the Ray engine preprocesses in its decode tasks: use preprocess='python' with it")
        return config if config.threads is not None else config.replace(threads=1)

    def compute(
        self, runtime: Runtime, plan: JobPlan, start: int, first_part: int, events: JobEvents
    ) -> Iterator[ComputedPart]:
        inputs, chunk_size = plan.inputs, plan.chunk_size
        if start >= len(inputs):
            return
        ray = _ensure_ray(self.address)
        size = int(self.actors or max(1, int(ray.available_resources().get("CPU", 1))))
        dataset = ray.data.from_items([{"index": i, "path": inputs[i]} for i in range(start, len(inputs))])
        # Different CPU shares keep Ray from fusing the decode tasks into the actors: decoding stays in tasks that
        # any free CPU can run, while each actor holds its Runtime (and a session) for the whole job.
        dataset = dataset.map_batches(
            _decode_batch,
            fn_kwargs={"preprocessor": runtime.spec, "decode_limit_bytes": process_decode_budget().limit_bytes},
            batch_size=chunk_size,
            num_cpus=DECODE_CPUS,
        )
        constructor = {
            "model_dir": str(runtime.model_dir.resolve()),
            "config": self.worker_config(runtime.config),
            "spec": plan.spec,
            "features_dir": str(plan.features_dir),
        }
        with warnings.catch_warnings():  # max_restarts has no named parameter; Ray's own notes recommend it so
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(
                _InferActor,
                fn_constructor_kwargs=constructor,
                batch_size=chunk_size,
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=ACTOR_CPUS,
                max_restarts=0,  # a failed actor fails the job (resume continues it), never replays a part silently
            )
        rows: list[dict[str, Any]] = []
        vectors: list[np.ndarray] = []
        done, part_index = start, first_part
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch_rows, batch_vectors = rows_from_arrow(table)
            rows.extend(batch_rows)
            if batch_vectors is not None:
                vectors.extend(batch_vectors)
            events.advance(len(batch_rows))
            while len(rows) >= chunk_size or (rows and done + len(rows) == len(inputs)):
                take = min(chunk_size, len(rows))
                embeddings = np.stack(vectors[:take]).astype(np.float32) if vectors else None
                yield Part(part_index, done, done + take, rows[:take]), embeddings
                rows, vectors = rows[take:], vectors[take:]
                done, part_index = done + take, part_index + 1
