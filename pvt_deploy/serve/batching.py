"""Dynamic batching: concurrent requests' preprocessed rows go through the model in one ``Runtime`` call.

Requests wait at most ``max_wait_ms`` for company, and only while company is on its way (other requests admitted
and still decoding): a lone request runs at once, so batching costs nothing at concurrency 1. A batch holds at
most ``max_batch`` rows (a single request
with more rows still runs whole; ``Runtime`` splits it into micro-batches of ``max_batch``). Inference runs on one
worker thread, so the event loop keeps accepting and decoding while the model is busy. An image's answer does not
depend on its batch mates: ``Runtime`` is batch-invariant for every shipped precision (fp32 within the parity
thresholds; a variant that cannot be is run row by row by ``Runtime`` itself)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pvt_deploy.runtime import Runtime
from pvt_deploy.runtime.operations import OPERATIONS, Outputs, run_operation


class InferenceBackend(Protocol):
    """What the HTTP app needs from whoever runs the model: local dynamic batching, or a Ray Serve replica."""

    async def run(self, operation: str, rows: np.ndarray) -> Outputs: ...


def run_grouped(runtime: Runtime, requests: Sequence[tuple[str, np.ndarray]]) -> list[Outputs]:
    """Many requests' rows -> one ``Runtime`` call per operation -> each request's own rows back, in order."""
    answers: list[Outputs | None] = [None] * len(requests)
    for operation in OPERATIONS:
        members = [i for i, (op, _) in enumerate(requests) if op == operation]
        if not members:
            continue
        stacked = np.concatenate([requests[i][1] for i in members]) if len(members) > 1 else requests[members[0]][1]
        outputs = run_operation(runtime, operation, stacked)
        start = 0
        for i in members:
            count = len(requests[i][1])
            answers[i] = {name: value[start : start + count] for name, value in outputs.items()}
            start += count
    return [answer if answer is not None else {} for answer in answers]


async def answer_batch(executor: ThreadPoolExecutor, runtime: Runtime, live: list[_Pending]) -> None:
    """Run one gathered batch on ``executor`` and answer each request's future; a failed batch answers its own
    requests with the error (the batching loop never dies of it)."""
    loop = asyncio.get_running_loop()
    try:
        answers = await loop.run_in_executor(executor, run_grouped, runtime, [(p.operation, p.rows) for p in live])
    except Exception as exc:
        for pending in live:
            if not pending.future.done():
                pending.future.set_exception(exc)
        return
    for pending, answer in zip(live, answers, strict=True):
        if not pending.future.done():
            pending.future.set_result(answer)


@dataclass
class _Pending:
    operation: str
    rows: np.ndarray
    future: asyncio.Future[Outputs] = field(repr=False)


class DynamicBatcher:
    """Gathers requests on the event loop and runs each batch on one worker thread.

    ``on_batch(rows)`` is called once per batch (metrics). ``in_flight()`` is how many images the service has
    admitted and not yet answered; when every one of them is already in the batch, it runs without waiting. Start
    is lazy (first ``run``), so the same app object
    works under uvicorn and inside a Ray replica."""

    def __init__(
        self,
        runtime: Runtime,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.in_flight = in_flight
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pvt-serve-infer")
        self._carry: _Pending | None = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def run(self, operation: str, rows: np.ndarray) -> Outputs:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pvt-serve-batcher")
        assert self._queue is not None
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(operation, rows, future))
        return await future

    async def close(self) -> None:
        """Stop gathering (in-flight batches have finished by the time uvicorn's drain calls this)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def _gather(self) -> list[_Pending]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch = [first]
        rows = len(first.rows)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while rows < self.max_batch:
            if self._queue.empty() and self.in_flight is not None and self.in_flight() <= rows:
                break  # nobody else is coming: waiting would only add latency
            remaining = deadline - loop.time()
            try:
                item = (
                    self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if rows + len(item.rows) > self.max_batch:
                self._carry = item  # starts the next batch, so no request waits twice
                break
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            live = [p for p in batch if not p.future.done()]  # a client that went away needs no answer
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(sum(len(p.rows) for p in live))
            await answer_batch(self._executor, self.runtime, live)
