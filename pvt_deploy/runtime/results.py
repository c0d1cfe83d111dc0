"""Per-item outcomes for ``on_error="collect"``: the answers for the good images, aligned with the input order,
plus one ``ItemError`` per bad image."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import describe, item_error_message, iter_items

T = TypeVar("T")

ON_ERROR_CHOICES = ("raise", "collect")


@dataclass(frozen=True)
class ItemError:
    """Why input number ``index`` (0-based, in input order) produced no answer."""

    index: int
    source: str
    message: str

    def __str__(self) -> str:
        return self.message if self.message.startswith(self.source) else f"{self.source}: {self.message}"

    def to_exception(self) -> ImageError:
        return ImageError(item_error_message(self.index, self.source, self.message))


@dataclass
class BatchResult(Generic[T]):
    """What a ``Runtime`` method returns with ``on_error="collect"``.

    ``value`` has one row per input, in input order, exactly as ``on_error="raise"`` would return it, except that
    rows of failed inputs are NaN (arrays) or ``None`` (``predict``). ``ok[i]`` says whether input ``i`` succeeded;
    ``errors`` lists the failures; ``sources`` names every input."""

    value: T
    ok: np.ndarray
    sources: list[str]
    errors: list[ItemError] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return not self.errors

    def __len__(self) -> int:
        return len(self.sources)

    def good(self) -> Any:
        """``value`` restricted to the successful rows (arrays and dicts of arrays), still in input order."""
        if isinstance(self.value, np.ndarray):
            return self.value[self.ok]
        if isinstance(self.value, dict):
            return {key: array[self.ok] for key, array in self.value.items()}
        if isinstance(self.value, tuple):
            return tuple(array[self.ok] for array in self.value)
        return [item for item, ok in zip(self.value, self.ok, strict=True) if ok]


@dataclass
class ItemLog:
    """The per-item bookkeeping every run shares: which input each row came from, which succeeded, and why not."""

    sources: list[str] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)

    def prepared(self, images: Any, prepare: Callable[[Any], T], on_error: str) -> Iterator[T | None]:
        """Each input through ``prepare``, in order; a bad one yields None after its ``ItemError`` is recorded
        (``on_error="collect"``) or raises it at once (``"raise"``)."""
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        for index, item in enumerate(iter_items(images)):
            source = describe(item)
            self.sources.append(source)
            try:
                value = prepare(item)
            except ImageError as exc:
                error = ItemError(index, source, str(exc))
                if on_error == "raise":
                    raise error.to_exception() from None
                self.errors.append(error)
                self.ok.append(False)
                yield None
                continue
            self.ok.append(True)
            yield value

    def result(self, value: Any) -> BatchResult[Any]:
        return BatchResult(value=value, ok=np.asarray(self.ok, dtype=bool), sources=self.sources, errors=self.errors)
