"""Search benchmark: LanceDB store with the IVF-SQ index on synthetic 512-d vectors (100k and 1M).

Reports index build time, on-disk size, query p50/p95 (one query at a time, k=10) and recall@10 against exact brute
force. The vectors are clustered (like embeddings of similar photos), not uniform noise, on which no ANN index does
well. Run: python benchmarks/search_bench.py [--sizes 100000,1000000] [--out benchmarks/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pvt_deploy.bench.machine import cpu_summary
from pvt_deploy.search import EmbeddingIndex

SWEEP = [(32, 10), (16, 5), (8, 2), (4, 1)]
"""(nprobes, refine_factor) pairs measured on the same store; the first is EmbeddingIndex's default."""


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, 1000, stop - start)] + 0.6 * rng.standard_normal((stop - start, dim))
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    best = np.empty((len(q), k), np.int64)
    for i, row in enumerate(q @ unit.T):
        top = np.argpartition(-row, k)[:k]
        best[i] = top[np.argsort(-row[top])]
    return best


def run(n: int, dim: int, queries: int, work: Path) -> dict:
    vectors = clustered(n, dim, seed=n)
    paths = [f"img{i:07d}.jpg" for i in range(n)]
    source = work / f"emb{n}"
    source.mkdir()
    np.save(source / "embeddings.npy", vectors)
    (source / "paths.txt").write_text("".join(p + "\n" for p in paths))
    (source / "run.json").write_text(json.dumps({"task": "embed", "complete": True}))
    started = time.perf_counter()
    store = EmbeddingIndex.build(source, work / f"db{n}", ann="yes")
    build_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in (work / f"db{n}").rglob("*") if p.is_file())
    rng = np.random.default_rng(0)
    picked = rng.integers(0, n, queries)
    asked = vectors[picked] + 0.1 * rng.standard_normal((queries, dim)).astype(np.float32)
    truth = exact_top(vectors, asked, 10)
    index_of = {p: i for i, p in enumerate(paths)}
    settings = []
    for nprobes, refine in SWEEP:
        store.search(asked[:5], 10, nprobes=nprobes, refine_factor=refine)  # warm-up
        times, found = [], []
        for query in asked:
            t0 = time.perf_counter()
            found.append(store.search(query, 10, nprobes=nprobes, refine_factor=refine)[0])
            times.append(time.perf_counter() - t0)
        overlaps = [
            len({index_of[h.path] for h in hits} & set(row)) / 10 for hits, row in zip(found, truth, strict=True)
        ]
        settings.append(
            {
                "nprobes": nprobes,
                "refine_factor": refine,
                "query_ms_p50": round(1000 * float(np.median(times)), 2),
                "query_ms_p95": round(1000 * float(np.percentile(times, 95)), 2),
                "recall_at_10": round(float(np.mean(overlaps)), 4),
            }
        )
        print(json.dumps({"vectors": n, **settings[-1]}), flush=True)
    return {
        "vectors": n,
        "dim": dim,
        "queries": queries,
        "build_s": round(build_s, 1),
        "store_mb": round(size / 1e6, 1),
        "settings": settings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="search-bench-"))
    results = {"cpu": cpu_summary(), "index": "LanceDB IVF_SQ, sqrt(N) partitions", "runs": []}
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            results["runs"].append(run(n, args.dim, args.queries, work))
            print(json.dumps(results["runs"][-1]), flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
