"""How bulk rows look to people and JSON consumers: shared by the CLI's stdout output and Python callers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pvt_deploy.jobs.store import Part
from pvt_deploy.jobs.tasks import JobSpec, compute_part
from pvt_deploy.runtime import Runtime


def iter_parts(
    runtime: Runtime, spec: JobSpec, inputs: Sequence[str], chunk_size: int, advance: Any = None
) -> Iterator[Part]:
    """Rows chunk by chunk with nothing written to disk (``predict`` to stdout): each chunk as soon as it is done."""
    for index, start in enumerate(range(0, len(inputs), chunk_size)):
        part, _ = compute_part(runtime, spec, inputs[start : start + chunk_size], start, index, None, advance)
        yield part


def label_indexes(labels: Sequence[str]) -> dict[str, int]:
    """Label -> class index, for ``prediction_record``."""
    return {label: index for index, label in enumerate(labels)}


def prediction_record(
    row: dict[str, Any], random_weights: bool = False, *, label_index: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """``{"image", "predictions": [{"label", "index", "probability"}]}`` (the HTTP API's prediction shape; ``index``
    needs ``label_index``) or ``{"image", "error"}``, marked when untrained."""
    record: dict[str, Any] = {"image": row["path"]}
    if row["status"] != "ok":
        record["error"] = row["error"]
    else:
        pairs = zip(row["labels"], row["probabilities"], strict=True)
        if label_index is None:
            record["predictions"] = [{"label": label, "probability": p} for label, p in pairs]
        else:
            record["predictions"] = [
                {"label": label, "index": label_index[label], "probability": p} for label, p in pairs
            ]
    if random_weights:
        record["random_weights"] = True
    return record


def prediction_lines(row: dict[str, Any]) -> list[str]:
    """The text form of one answered row: the path, then ``  0.912345  label`` per label."""
    pairs = zip(row["labels"], row["probabilities"], strict=True)
    return [row["path"], *(f"  {probability:.6f}  {label}" for label, probability in pairs)]
