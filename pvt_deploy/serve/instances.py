"""Model instances: up to N batches in the model at once (Triton's ``instance_group { count: N }``).

Each instance is one concurrent ``Runtime`` call on its own worker thread, all on the **same** onnxruntime sessions:
an ``InferenceSession`` may be run from several threads at once (each run has its own execution frame), so N
instances hold one copy of the weights, including onnxruntime's pre-packed ones, and add only each run's
activations. N separate sessions would each load, optimise and pre-pack the weights again (measured in
docs/serve-grpc.md). ``--threads`` stays the per-session intra-op pool: with ``--threads 1`` every instance runs on
its own thread, with more threads concurrent runs share the pool.

The batcher is ``DynamicBatcher``'s: requests gather into batches of at most ``--max-batch`` rows; a batch waits for
company only while other admitted images are still on their way (not while they are already in the model)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pvt_deploy.runtime import Runtime
from pvt_deploy.runtime.config import cpu_count
from pvt_deploy.serve.batching import DynamicBatcher, _Pending, answer_batch

SERVE_THREADS_PER_INSTANCE = 1
"""``serve``'s threads per instance when neither ``--threads`` nor ``--instances`` is given, so the default is one
single-threaded instance per CPU. Measured on b2 at 384, 2-core AMD EPYC (AVX2), concurrency 8, servers interleaved
on a quiet machine (benchmarks/results/serve_instances-b2-384-quiet.json): 2 instances x 1 thread answered 3.61
images/s against 2.99 for 1 x 2 (1.20x, every round), with a lower p50 and lower RSS."""


def serve_threads(threads: int | None, instances: int | None) -> int | None:
    """The threads ``serve`` gives each session: ``--threads`` when given; with ``--instances`` alone, onnxruntime's
    choice; with neither, ``SERVE_THREADS_PER_INSTANCE`` (and so ``default_instances`` gives one per CPU)."""
    if threads is None and instances is None:
        return SERVE_THREADS_PER_INSTANCE
    return threads


def default_instances(cpu_count: int | None, threads: int | None) -> int:
    """One instance per ``threads`` CPUs: ``--threads 1`` on 4 CPUs gives 4; no ``--threads`` (onnxruntime sizes
    its pool to the cores) gives 1, as does a pool as wide as the machine."""
    cpus = max(1, cpu_count or 1)
    if threads is None:
        return 1
    return max(1, cpus // max(1, threads))


class PooledBatcher(DynamicBatcher):
    """``DynamicBatcher`` with ``instances`` batches in flight: the next batch is gathered as soon as an instance
    is free, so requests queued while every instance is busy leave together as one fuller batch."""

    def __init__(
        self,
        runtime: Runtime,
        instances: int,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self._running_rows = 0
        outer = in_flight
        # images already in the model are not "on their way": a batch never waits for them
        waiting: Callable[[], int] | None = (lambda: outer() - self._running_rows) if outer is not None else None
        super().__init__(runtime, max_batch, max_wait_ms, on_batch=on_batch, in_flight=waiting)
        self.instances = instances
        self._executor.shutdown(wait=False)  # the parent's one-thread pool (no thread started yet)
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="pvt-serve-infer")
        self._free: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().close()

    async def _loop(self) -> None:
        self._free = asyncio.Semaphore(self.instances)
        while True:
            await self._free.acquire()
            try:
                batch = await self._gather()
            except BaseException:
                self._free.release()
                raise
            live = [p for p in batch if not p.future.done()]  # a client that went away needs no answer
            if not live:
                self._free.release()
                continue
            rows = sum(len(p.rows) for p in live)
            if self.on_batch is not None:
                self.on_batch(rows)
            self._running_rows += rows
            task = asyncio.get_running_loop().create_task(self._run_batch(live, rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, live: list[_Pending], rows: int) -> None:
        assert self._free is not None
        try:
            await answer_batch(self._executor, self.runtime, live)
        finally:
            self._running_rows -= rows
            self._free.release()


def batcher_for(
    runtime: Runtime,
    instances: int | None,
    max_batch: int,
    max_wait_ms: float,
    on_batch: Callable[[int], None] | None = None,
    in_flight: Callable[[], int] | None = None,
) -> DynamicBatcher:
    """The service's batcher: ``DynamicBatcher`` for one instance, ``PooledBatcher`` for more; ``instances=None``
    takes ``default_instances`` from this machine's CPUs and the runtime's ``threads``."""
    count = instances if instances is not None else default_instances(cpu_count(), runtime.threads)
    if count <= 1:
        return DynamicBatcher(runtime, max_batch, max_wait_ms, on_batch=on_batch, in_flight=in_flight)
    threads = runtime.threads if runtime.threads is not None else "onnxruntime's choice of"
    logging.getLogger("uvicorn.error").info("%d model instances on shared sessions, %s threads each", count, threads)
    return PooledBatcher(runtime, count, max_batch, max_wait_ms, on_batch=on_batch, in_flight=in_flight)
