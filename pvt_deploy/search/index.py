"""Nearest-neighbour search and near-duplicate finding over embeddings, in an embedded LanceDB store.

LanceDB because it is embedded (a folder, no server), Arrow/Parquet-native (``embed --out x.parquet`` loads
without conversion) and grows to object storage. Vectors are stored L2-normalised and compared by cosine
similarity; small tables are searched exactly, large ones through an ANN index (``ANN_MIN_ROWS``,
benchmarks/search_bench.py for recall and latency).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.errors import OutputError, SearchIndexError
from pvt_deploy.jobs import read_run_info
from pvt_deploy.runtime.operations import l2_normalize

os.environ.setdefault("LANCE_LOG", "error")  # lance's Rust notices ("dataset will be created") are not for users

TABLE_NAME = "embeddings"
INFO_NAME = "pvt_deploy_index.json"
ANN_MIN_ROWS = 10_000
"""Below this many rows the store is searched exactly (about 80 ms a query at 20k rows here; the IVF index: 4 ms)."""
EXACT_DUPLICATES_MAX_ROWS = 50_000
"""Up to this many rows, duplicates are found exactly by blockwise matrix products; above, through the index."""


@dataclass(frozen=True)
class Hit:
    path: str
    similarity: float


def load_embeddings(source: Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(paths, (N, D) float32, run info) of the successful rows of an ``embed`` output: Parquet, JSONL or folder."""
    source = Path(source)
    info = read_run_info(source) or {}
    if info.get("task") not in (None, "embed"):
        raise SearchIndexError(f"{source}: holds {info.get('task')} rows, not embeddings")
    try:
        if source.is_dir():
            paths = (source / "paths.txt").read_text(encoding="utf-8").splitlines()
            vectors = np.load(source / "embeddings.npy", allow_pickle=False)
        elif source.suffix.lower() == ".parquet":
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            table = pq.read_table(source, columns=["path", "status", "embedding"])
            table = table.filter(pc.equal(table["status"], "ok"))
            paths = table["path"].to_pylist()
            column = table["embedding"].combine_chunks()
            vectors = column.values.to_numpy().reshape(len(paths), -1) if len(paths) else np.zeros((0, 0), np.float32)
        elif source.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows = [row for row in rows if row.get("status") == "ok"]
            paths = [row["path"] for row in rows]
            vectors = np.asarray([row["embedding"] for row in rows], np.float32)
        else:
            raise SearchIndexError(f"{source}: expected an embed output (.parquet, .jsonl or a folder)")
    except (OSError, ValueError, KeyError) as exc:
        raise SearchIndexError(f"{source}: not a readable embed output ({exc})") from None
    if len(paths) != len(vectors) or not len(paths):
        raise SearchIndexError(f"{source}: no embeddings to index")
    return paths, np.ascontiguousarray(vectors, np.float32), info


class EmbeddingIndex:
    """An opened search store: ``EmbeddingIndex.build(embeddings, db)`` once, then ``EmbeddingIndex(db)``."""

    def __init__(self, db: Path) -> None:
        self.db = Path(db)
        try:
            self.info: dict[str, Any] = json.loads((self.db / INFO_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SearchIndexError(f"{self.db}: not a search index (build one with `pvt-deploy index build`)") from None
        import lancedb

        self.table = lancedb.connect(str(self.db)).open_table(TABLE_NAME)

    @property
    def model_dir(self) -> Path | None:
        model = (self.info.get("run") or {}).get("model") or {}
        return Path(model["model_dir"]) if model.get("model_dir") else None

    def __len__(self) -> int:
        return int(self.info["rows"])

    @classmethod
    def build(cls, source: Path, db: Path, *, overwrite: bool = False, ann: str = "auto") -> EmbeddingIndex:
        """Load ``source`` into a new store at ``db`` (built aside, renamed into place). ``ann``: ``auto`` (an index
        from ANN_MIN_ROWS rows on), ``yes`` or ``no``."""
        import lancedb
        import pyarrow as pa

        db = Path(db)
        if ann not in ("auto", "yes", "no"):
            raise ValueError(f"ann must be auto, yes or no, got {ann!r}")
        if db.exists() and not overwrite:
            raise OutputError(f"{db} already exists; pass --overwrite to replace it")
        paths, vectors, run = load_embeddings(source)
        vectors = l2_normalize(vectors)
        staging = db.with_name(f".{db.name}.building")
        shutil.rmtree(staging, ignore_errors=True)
        dim = vectors.shape[1]
        table = pa.table(
            {"path": pa.array(paths, pa.string()),
             "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)}
        )  # fmt: skip
        store = lancedb.connect(str(staging)).create_table(TABLE_NAME, table)
        indexed = ann == "yes" or (ann == "auto" and len(paths) >= ANN_MIN_ROWS)
        if indexed:
            _create_ann_index(store, len(paths))
        info = {"rows": len(paths), "dim": dim, "source": str(source), "ann": indexed, "run": run}
        (staging / INFO_NAME).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if db.exists():
            shutil.rmtree(db)
        staging.rename(db)
        return cls(db)

    def search(
        self, vectors: np.ndarray, k: int = 10, *, nprobes: int | None = None, refine_factor: int | None = None
    ) -> list[list[Hit]]:
        """The ``k`` most similar stored rows (cosine similarity, highest first) for each query vector.

        With an index: ``nprobes`` IVF partitions are scanned and ``refine_factor * k`` candidates re-ranked by
        their exact vectors (defaults: NPROBES, REFINE_FACTOR; benchmarks/search_bench.py sweeps them)."""
        results = []
        for vector in l2_normalize(np.atleast_2d(np.asarray(vectors, np.float32))):
            query = self.table.search(vector).distance_type("cosine").limit(k)
            if self.info.get("ann"):
                query = query.nprobes(nprobes or NPROBES).refine_factor(refine_factor or REFINE_FACTOR)
            found = query.select(["path", "_distance"]).to_arrow()
            distances = found["_distance"].to_pylist()
            results.append([Hit(p, 1.0 - d) for p, d in zip(found["path"].to_pylist(), distances, strict=True)])
        return results

    def vectors(self) -> tuple[list[str], np.ndarray]:
        table = self.table.to_arrow()
        paths = table["path"].to_pylist()
        return paths, table["vector"].combine_chunks().values.to_numpy().reshape(len(paths), -1)

    def duplicates(self, threshold: float, neighbours: int = 10) -> list[tuple[str, str, float]]:
        """Pairs of stored rows with cosine similarity >= ``threshold``, most similar first (each pair once).

        Exact (blockwise products) up to EXACT_DUPLICATES_MAX_ROWS rows; above, each row's ``neighbours`` nearest
        through the index."""
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        paths, vectors = self.vectors()
        pairs: dict[tuple[int, int], float] = {}
        if len(paths) <= EXACT_DUPLICATES_MAX_ROWS:
            for start in range(0, len(paths), 1024):
                block = vectors[start : start + 1024] @ vectors.T
                rows, cols = np.nonzero(block >= threshold)
                for row, col in zip(rows + start, cols, strict=True):
                    if row < col:
                        pairs[(int(row), int(col))] = float(block[row - start, col])
        else:
            position = {path: i for i, path in enumerate(paths)}
            for i, hits in enumerate(self.search(vectors, neighbours + 1)):
                for hit in hits:
                    j = position[hit.path]
                    if i != j and hit.similarity >= threshold:
                        pairs[(min(i, j), max(i, j))] = hit.similarity
        ordered = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
        return [(paths[i], paths[j], similarity) for (i, j), similarity in ordered]


NPROBES = 8
REFINE_FACTOR = 2
"""From benchmarks/search_bench.py at 1M clustered 512-d vectors: recall@10 1.0 at 10.4 ms p50 (32/10: 1.0 at
15.0 ms; 4/1: 0.957 at 9.1 ms), on a 2-core machine loaded by other work."""


def _create_ann_index(table: Any, rows: int) -> None:
    from lancedb.index import IvfSq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table.create_index("vector", config=IvfSq(distance_type="cosine", num_partitions=max(1, int(math.sqrt(rows)))))
