"""``RuntimeConfig``: every option that shapes how a ``Runtime`` runs, in one picklable value.

The CLI, ``serve`` (and its Ray Serve replicas) and bulk jobs (and their Ray Data actors) all build a
``RuntimeConfig`` and hand it on whole, so no option can be lost on the way to the process that runs the model."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from pvt_deploy.preprocess import MAX_FILE_BYTES, MAX_PIXELS
from pvt_deploy.runtime.sessions import DEVICES, ProviderEntry

PREPROCESS_MODES = ("python", "graph")
"""``python``: Pillow + numpy in this process feed the tensor graphs; ``graph``: decoded pixels feed the image-input
graphs, which resize and normalise inside ONNX (docs/portability.md)."""


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeConfig:
    """How a ``Runtime`` runs. ``None`` means "the runtime's default" (threads: onnxruntime's; batch size: 1 on
    CPU, 16 on CUDA; providers: chosen from ``device``)."""

    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    batch_size: int | None = None
    providers: tuple[ProviderEntry, ...] | None = None
    """onnxruntime execution providers as given (names or (name, options) pairs); overrides ``device``."""
    preprocess: Literal["python", "graph"] | str = "python"
    exif_transpose: bool = False
    max_image_bytes: int | None = MAX_FILE_BYTES
    """The largest image file read (``None``: no limit)."""
    max_pixels: int | None = MAX_PIXELS
    """The most pixels one image may have once its header is read (decompression bombs)."""
    spin_wait: bool = False
    """onnxruntime's pool threads spin between ops instead of sleeping. Off by default: spinning threads take the
    cores that decoding and other processes need. On a machine left to one caller it cuts batch-1 latency (b2/384,
    2 threads, quiet: 1.04-1.14x, docs/speed.md); with one thread there is no pool and it changes nothing."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {self.preprocess!r}")
        _check_positive("threads", self.threads)
        _check_positive("batch_size", self.batch_size)
        _check_positive("max_image_bytes", self.max_image_bytes)
        _check_positive("max_pixels", self.max_pixels)
        limit = max_threads()
        if self.threads is not None and self.threads > limit:
            raise ValueError(f"threads must be <= {limit} (4x the {cpu_count()} CPUs present), got {self.threads}")
        if self.providers is not None and not isinstance(self.providers, tuple):
            object.__setattr__(self, "providers", tuple(self.providers))

    def replace(self, **changes: Any) -> RuntimeConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (run metadata, ``/v1/model``); ``from_json`` reads it back."""
        value = asdict(self)
        if self.providers is not None:
            value["providers"] = [list(p) if isinstance(p, tuple) else p for p in self.providers]
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> RuntimeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown runtime option(s): {', '.join(unknown)}")
        options = dict(value)
        if options.get("providers") is not None:
            options["providers"] = tuple(tuple(p) if isinstance(p, list) else p for p in options["providers"])
        return cls(**options)


def max_threads() -> int:
    """The most onnxruntime threads a session may be given: 4 per CPU present. Above that a thread pool only adds
    memory and contention (``--threads 100000`` grew past 4.7 GB and crashed ``serve``)."""
    return 4 * cpu_count()


def _check_positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
