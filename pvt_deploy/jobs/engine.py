"""What a bulk job is (``JobPlan``), what it reports (``JobEvents``) and what runs it (a ``JobEngine``).

An engine turns a plan's remaining inputs into finished parts, in input order; ``run_job`` does everything around
that (the lock, the plan on disk, resume, the final output). Two engines implement the one ``JobEngine`` Protocol:
``LocalEngine`` (this process, chunk by chunk) and ``RayEngine`` (``jobs/ray_engine.py``: a Ray Data pipeline). A
new engine is one class here or beside it; ``run_job`` does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pvt_deploy.jobs.store import Part, features_dir
from pvt_deploy.jobs.tasks import JobSpec, compute_part
from pvt_deploy.runtime import Runtime
from pvt_deploy.runtime.config import RuntimeConfig

DEFAULT_CHUNK_SIZE = 64

ComputedPart = tuple[Part, np.ndarray | None]
"""A finished part and, for embed jobs, its embeddings (one row per input, NaN where the input failed)."""


@dataclass(frozen=True)
class JobPlan:
    """One bulk job: what to compute (``spec``) over which ``inputs`` into which ``out``, in parts of ``chunk_size``
    inputs, and what to do with an earlier run there (``resume`` it, ``overwrite`` it, or refuse)."""

    spec: JobSpec
    inputs: Sequence[str]
    out: Path
    chunk_size: int = DEFAULT_CHUNK_SIZE
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "out", Path(self.out))
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")

    @property
    def features_dir(self) -> Path:
        """Where a features job's per-image ``.npz`` files go while it runs (inside ``OUT.partial``)."""
        return features_dir(self.out)


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
    failed: list[dict] = field(default_factory=list)
    already_complete: bool = False


class JobEngine(Protocol):
    """What ``run_job`` needs from whoever computes the rows."""

    name: str
    """Recorded in the run metadata (``engine``)."""

    def worker_config(self, config: RuntimeConfig) -> RuntimeConfig:
        """The configuration the Runtimes that compute the rows run with (recorded in the run metadata)."""
        ...

    def compute(
        self, runtime: Runtime, plan: JobPlan, start: int, first_part: int, events: JobEvents
    ) -> Iterator[ComputedPart]:
        """Parts of ``plan.chunk_size`` inputs for ``plan.inputs[start:]``, in order, numbered from ``first_part``;
        ``events.advance`` per finished input."""
        ...


class LocalEngine:
    """This process, one chunk after another, on the given ``Runtime`` as it is."""

    name = "local"

    def worker_config(self, config: RuntimeConfig) -> RuntimeConfig:
        return config

    def compute(
        self, runtime: Runtime, plan: JobPlan, start: int, first_part: int, events: JobEvents
    ) -> Iterator[ComputedPart]:
        for offset, chunk_start in enumerate(range(start, len(plan.inputs), plan.chunk_size)):
            chunk = plan.inputs[chunk_start : chunk_start + plan.chunk_size]
            yield compute_part(
                runtime, plan.spec, chunk, chunk_start, first_part + offset, plan.features_dir, events.advance
            )
