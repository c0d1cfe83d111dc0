"""``run_job``: a whole bulk job (plan, lock, resume, chunks, final output) on the local or the Ray engine.

The CLI only parses options and prints; Python callers get the same behaviour::

    from pvt_deploy import Runtime
    from pvt_deploy.jobs import JobSpec, collect_inputs, run_job

    run_job(Runtime("exported/birds"), JobSpec("embed"), collect_inputs(["photos/"]), Path("emb.parquet"))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy import __version__
from pvt_deploy.errors import JobInterrupted, OutputError
from pvt_deploy.files import OutputLock
from pvt_deploy.jobs.store import JobStore, Part, inputs_digest, output_format, read_run_info
from pvt_deploy.jobs.tasks import JobSpec, compute_part, model_identity
from pvt_deploy.runtime import Runtime
from pvt_deploy.staging import clean_stale_staging, describe_removed

DEFAULT_CHUNK_SIZE = 64
ENGINES = ("local", "ray")
_RESUME_KEYS = ("task", "options", "model", "format", "exif_transpose", "inputs", "inputs_sha256")


@dataclass
class JobEvents:
    """Hooks for whoever shows progress: ``start(total, done)`` once, ``advance(n)`` per image, ``part(part)`` per
    finished chunk (its failed rows are in ``part.failed``), ``note(text)`` for one-line notices."""

    start: Callable[[int, int], None] = lambda total, done: None
    advance: Callable[[int], None] = lambda n: None
    part: Callable[[Part], None] = lambda part: None
    note: Callable[[str], None] = lambda text: None


@dataclass
class JobResult:
    out: Path
    rows: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    already_complete: bool = False


def run_job(
    runtime: Runtime,
    spec: JobSpec,
    inputs: Sequence[str],
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    engine: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
    events: JobEvents | None = None,
) -> JobResult:
    """Run ``spec`` over ``inputs`` into ``out``; every input becomes one row (failed ones with their error)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    events = events or JobEvents()
    out = Path(out)
    inputs = list(inputs)
    fmt = output_format(out, spec.task)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder")
    plan = {
        "task": spec.task,
        "options": spec.to_json(),
        "model": model_identity(runtime, spec),
        "random_weights": runtime.manifest.random_weights,
        "exif_transpose": runtime.exif_transpose,
        "format": fmt,
        "inputs": len(inputs),
        "inputs_sha256": inputs_digest(inputs),
        "chunk_size": int(chunk_size),
    }
    with OutputLock(out):
        removed = clean_stale_staging(out.parent, out.name)
        if removed:
            events.note(describe_removed(removed))
        if out.exists() or out.is_symlink():
            finished = read_run_info(out)
            if resume and finished is not None and _same_job(finished, plan):
                return JobResult(out, int(finished.get("rows", 0)), [], already_complete=True)
            if not overwrite:
                raise OutputError(f"{out} already exists; pass --overwrite to replace it")
        store = JobStore(out)
        parts = _resume_or_start(store, plan, inputs, resume, overwrite, events)
        chunk_size = int(store.plan()["chunk_size"])
        done = parts[-1].stop if parts else 0
        events.start(len(inputs), done)
        embedding_dim: int | None = None
        try:
            for part, embeddings in _compute(
                runtime, spec, inputs, done, len(parts), chunk_size, store, engine, ray_address, ray_actors, events
            ):
                store.write_part(part, embeddings)
                parts.append(part)
                events.part(part)
        except KeyboardInterrupt:
            saved = parts[-1].stop if parts else 0
            raise JobInterrupted(
                f"interrupted after {saved} of {len(inputs)} inputs; the finished rows are kept in {store.work}. "
                "Run the same command with --resume to continue"
            ) from None
        if spec.task == "embed":
            embedding_dim = _embedding_dim(runtime, spec, store, parts)
        failed = [row for part in parts for row in part.failed]
        run_info = {
            **plan,
            "engine": engine,
            "pvt_deploy_version": __version__,
            "rows": len(inputs),
            "failed": len(failed),
            "embedding_dim": embedding_dim,
            "complete": True,
        }
        store.finalize(parts, fmt, run_info, embedding_dim)
    return JobResult(out, len(inputs), failed)


def _same_job(finished: dict[str, Any], plan: dict[str, Any]) -> bool:
    return finished.get("complete") is True and all(finished.get(key) == plan[key] for key in _RESUME_KEYS)


def _resume_or_start(
    store: JobStore, plan: dict[str, Any], inputs: list[str], resume: bool, overwrite: bool, events: JobEvents
) -> list[Part]:
    if store.work.exists() and not (resume or overwrite):
        raise OutputError(f"an interrupted run is in {store.work}; pass --resume to continue it, or --overwrite")
    if resume and store.has_plan():
        previous = store.plan()
        changed = [key for key in _RESUME_KEYS if previous.get(key) != plan[key]]
        if changed:
            raise OutputError(
                f"{store.work} holds a run with other {', '.join(changed)}; run it as it was, or pass --overwrite"
            )
        parts = store.completed_parts()
        events.note(f"Resuming: {parts[-1].stop if parts else 0} of {len(inputs)} inputs already done")
        for part in parts:  # the final report stays complete: earlier failures are reported again
            events.part(part)
        return parts
    if resume:
        events.note(f"Nothing to resume in {store.work}; starting a new run")
    store.start(plan, inputs)
    return []


def _compute(
    runtime: Runtime,
    spec: JobSpec,
    inputs: list[str],
    done: int,
    first_part: int,
    chunk_size: int,
    store: JobStore,
    engine: str,
    ray_address: str | None,
    ray_actors: int | None,
    events: JobEvents,
) -> Iterator[tuple[Part, np.ndarray | None]]:
    if engine == "ray":
        from pvt_deploy.jobs.ray_engine import compute_on_ray

        yield from compute_on_ray(
            runtime, spec, inputs, done, first_part, chunk_size, store.features_dir, ray_address, ray_actors, events
        )
        return
    for offset, start in enumerate(range(done, len(inputs), chunk_size)):
        chunk = inputs[start : start + chunk_size]
        yield compute_part(runtime, spec, chunk, start, first_part + offset, store.features_dir, events.advance)


def _embedding_dim(runtime: Runtime, spec: JobSpec, store: JobStore, parts: list[Part]) -> int:
    """The embedding width, known even when every input failed (the manifest's output shape)."""
    graph = "classify" if spec.top_k else runtime.embedding_graph
    width = runtime.output_shape(graph, "embedding")[-1]
    if isinstance(width, int):
        return width
    for part in parts:
        embeddings = store.embeddings(part)
        if embeddings is not None:
            return int(embeddings.shape[1])
    return 0
