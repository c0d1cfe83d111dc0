"""``run_job``: a whole bulk job (plan, lock, resume, chunks, final output) on any ``JobEngine``.

The CLI only parses options and prints; Python callers get the same behaviour::

    from pvt_deploy import Runtime
    from pvt_deploy.jobs import JobPlan, JobSpec, RayEngine, collect_inputs, run_job

    plan = JobPlan(JobSpec("embed"), collect_inputs(["photos/"]), Path("emb.parquet"))
    run_job(Runtime("exported/birds", batch_size=8), plan)                  # this process
    run_job(Runtime("exported/birds", batch_size=8), plan, RayEngine())     # a Ray Data pipeline
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pvt_deploy import __version__
from pvt_deploy.errors import JobInterrupted, OutputError
from pvt_deploy.files import OutputLock
from pvt_deploy.jobs.engine import JobEngine, JobEvents, JobPlan, JobResult, LocalEngine
from pvt_deploy.jobs.ray_engine import RayEngine
from pvt_deploy.jobs.store import (
    JobStore,
    Part,
    check_work_folder,
    inputs_digest,
    output_format,
    read_run_info,
)
from pvt_deploy.jobs.tasks import JobSpec, model_identity
from pvt_deploy.runtime import Runtime
from pvt_deploy.staging import clean_stale_staging, describe_removed

ENGINES = ("local", "ray")
_RESUME_KEYS = ("task", "options", "model", "format", "exif_transpose", "inputs", "inputs_sha256")


def engine_named(name: str, address: str | None = None, actors: int | None = None) -> JobEngine:
    """``local`` or ``ray`` (on ``address``, with ``actors`` Runtime actors)."""
    if name == "local":
        return LocalEngine()
    if name == "ray":
        return RayEngine(address, actors)
    raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")


def run_job(
    runtime: Runtime, plan: JobPlan, engine: JobEngine | None = None, events: JobEvents | None = None
) -> JobResult:
    """Run ``plan`` on ``runtime`` (the local engine unless another is given); every input becomes one row (failed
    ones with their error)."""
    engine = engine or LocalEngine()
    events = events or JobEvents()
    out, spec, inputs = plan.out, plan.spec, list(plan.inputs)
    fmt = output_format(out, spec.task)
    if fmt == "parquet":  # the [bulk] extra: missing, it is one line before any work, not after all of it
        import pyarrow.parquet  # noqa: F401
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder")
    identity = {
        "task": spec.task,
        "options": spec.to_json(),
        "model": model_identity(runtime, spec),
        "random_weights": runtime.manifest.random_weights,
        "exif_transpose": runtime.exif_transpose,
        "format": fmt,
        "inputs": len(inputs),
        "inputs_sha256": inputs_digest(inputs),
        "chunk_size": plan.chunk_size,
        "runtime": engine.worker_config(runtime.config).to_json(),
    }
    with OutputLock(out):
        removed = clean_stale_staging(out.parent, out.name)
        if removed:
            events.note(describe_removed(removed))
        if out.exists() or out.is_symlink():
            finished = read_run_info(out)
            if plan.resume and finished is not None and _same_job(finished, identity):
                return JobResult(out, int(finished.get("rows", 0)), [], already_complete=True)
            if not plan.overwrite:
                raise OutputError(f"{out} already exists; pass --overwrite to replace it")
        store = JobStore(out)
        parts = _resume_or_start(store, identity, plan, events)
        plan = dataclasses.replace(plan, chunk_size=int(store.plan()["chunk_size"]))  # a resume keeps its parts' size
        identity["chunk_size"] = plan.chunk_size
        done = parts[-1].stop if parts else 0
        events.start(len(inputs), done)
        try:
            for part, embeddings in engine.compute(runtime, plan, done, len(parts), events):
                store.write_part(part, embeddings)
                parts.append(part)
                events.part(part)
        except KeyboardInterrupt:
            saved = parts[-1].stop if parts else 0
            raise JobInterrupted(
                f"interrupted after {saved} of {len(inputs)} inputs; the finished rows are kept in {store.work}. "
                "Run the same command with --resume to continue"
            ) from None
        except OSError as exc:  # a full disk while saving a part: what is saved stays, --resume continues
            raise OutputError(
                f"cannot save the rows of {out} ({exc.strerror or exc}); the finished rows are kept in "
                f"{store.work}: make room and run the same command with --resume"
            ) from None
        embedding_dim = _embedding_dim(runtime, spec, store, parts) if spec.task == "embed" else None
        failed = [row for part in parts for row in part.failed]
        run_info = {
            **identity,
            "engine": engine.name,
            "pvt_deploy_version": __version__,
            "rows": len(inputs),
            "failed": len(failed),
            "embedding_dim": embedding_dim,
            "complete": True,
        }
        store.finalize(parts, fmt, run_info, embedding_dim)
    return JobResult(out, len(inputs), failed)


def _same_job(finished: dict[str, Any], identity: dict[str, Any]) -> bool:
    return finished.get("complete") is True and all(finished.get(key) == identity[key] for key in _RESUME_KEYS)


_OPTION_NAMES = {
    "options.top_k": "--top-k",
    "options.normalize": "--normalize",
    "model.precision": "--precision",
    "model.model_dir": "MODEL_DIR",
    "exif_transpose": "--exif-transpose",
    "format": "--out's format",
}
"""Differences a user fixes with an option, named as the option."""


def _differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name: X then, Y now`` for each resume key that differs (nested dicts compared key by key)."""
    found: list[str] = []
    if previous.get("inputs") != current["inputs"] or previous.get("inputs_sha256") != current["inputs_sha256"]:
        found.append(f"inputs: {previous.get('inputs')} paths then, {current['inputs']} now (or other paths)")
    for key in _RESUME_KEYS:
        if key in ("inputs", "inputs_sha256"):
            continue
        then, now = previous.get(key), current[key]
        if then == now:
            continue
        if isinstance(then, dict) and isinstance(now, dict):
            for sub in sorted(set(then) | set(now)):
                if sub == "graph_sha256" and then.get("graph") != now.get("graph"):
                    continue  # another graph has another digest: the graph says it
                if then.get(sub) != now.get(sub):
                    name = _OPTION_NAMES.get(f"{key}.{sub}", f"{key}.{sub}")
                    found.append(f"{name}: {then.get(sub)!r} then, {now.get(sub)!r} now")
        else:
            found.append(f"{_OPTION_NAMES.get(key, key)}: {then!r} then, {now!r} now")
    return found


def _resume_or_start(store: JobStore, identity: dict[str, Any], plan: JobPlan, events: JobEvents) -> list[Part]:
    """The parts an earlier run finished that this one keeps (``--resume``), or none on a fresh start.

    ``--resume --overwrite``: continue the earlier run when it is the same job, else start over."""
    if not plan.overwrite:
        check_work_folder(store.work)
    if store.work.exists() and not (plan.resume or plan.overwrite):
        raise OutputError(f"an interrupted run is in {store.work}; pass --resume to continue it, or --overwrite")
    usable = store.work.is_dir() and not store.work.is_symlink()
    if plan.resume and usable and store.has_plan():
        previous = store.plan()
        changed = [key for key in _RESUME_KEYS if previous.get(key) != identity[key]]
        if changed and not plan.overwrite:
            details = "; ".join(_differences(previous, identity))
            raise OutputError(
                f"{store.work} holds a run with other {', '.join(changed)} ({details}); "
                "run it as it was, or pass --overwrite"
            )
        if not changed:
            return _kept_parts(store, len(plan.inputs), events)
        events.note(f"{store.work} holds another job's run ({', '.join(changed)}); --overwrite: starting over")
    elif plan.resume:
        events.note(f"Nothing to resume in {store.work}; starting a new run")
    store.start(identity, list(plan.inputs))
    return []


def _kept_parts(store: JobStore, total: int, events: JobEvents) -> list[Part]:
    """The finished parts, up to the first whose input files changed (size or mtime) since they were computed."""
    parts, changed = store.completed_parts()
    done = parts[-1].stop if parts else 0
    if changed is not None:
        events.note(f"Resuming: {changed} changed since its row was computed; recomputing from input {done}")
    events.note(f"Resuming: {done} of {total} inputs already done")
    for part in parts:  # the final report stays complete: earlier failures are reported again
        events.part(part)
    return parts


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


__all__ = ["ENGINES", "RayEngine", "engine_named", "run_job"]
