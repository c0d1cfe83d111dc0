"""Parquet for bulk jobs (pyarrow, the ``[bulk]`` extra): one row group per finished part, the run metadata in the
file's own key-value metadata, and embeddings as ``fixed_size_list<float32>[D]``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_METADATA_KEY = b"pvt_deploy.run"


def schema(task: str, dim: int | None, with_labels: bool, random_weights: bool) -> pa.Schema:
    fields = [
        pa.field("index", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
    if task == "embed":
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dim or 0)))
    if with_labels:
        fields += [pa.field("labels", pa.list_(pa.string())), pa.field("probabilities", pa.list_(pa.float32()))]
    if task == "features":
        fields.append(pa.field("file", pa.string()))
    if random_weights:
        fields.append(pa.field("random_weights", pa.bool_()))
    return pa.schema(fields)


def _table(rows: list[dict[str, Any]], embeddings: np.ndarray | None, table_schema: pa.Schema) -> pa.Table:
    columns: dict[str, Any] = {}
    for field in table_schema:
        if field.name == "embedding":
            dim = field.type.list_size
            flat = np.zeros((len(rows), dim), np.float32) if embeddings is None else np.nan_to_num(embeddings, nan=0)
            failed = pa.array([row["status"] != "ok" for row in rows], pa.bool_())
            values = pa.array(flat.reshape(-1), pa.float32())
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim, mask=failed)
        elif field.name == "random_weights":
            columns[field.name] = [True] * len(rows)
        else:
            columns[field.name] = [row.get(field.name) for row in rows]
    return pa.table(columns, schema=table_schema)


def write_parquet(
    path: Path,
    parts: Iterable[tuple[list[dict[str, Any]], np.ndarray | None]],
    run_info: dict[str, Any],
    dim: int | None,
) -> None:
    table_schema = schema(
        run_info["task"], dim, bool(run_info["options"].get("top_k")), bool(run_info.get("random_weights"))
    ).with_metadata({PARQUET_METADATA_KEY: json.dumps(run_info).encode("utf-8")})
    with pq.ParquetWriter(str(path), table_schema) as writer:
        for rows, embeddings in parts:
            if rows:
                writer.write_table(_table(rows, embeddings, table_schema))


def read_parquet_run_info(path: Path) -> dict[str, Any] | None:
    metadata = pq.read_schema(str(path)).metadata or {}
    raw = metadata.get(PARQUET_METADATA_KEY)
    return json.loads(raw) if raw else None
