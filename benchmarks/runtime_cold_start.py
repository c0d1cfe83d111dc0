"""Does an optimized-graph cache pay for itself in cold start? (It was dropped from the runtime on this result.)

Each round starts two fresh processes, in alternating order, on the same exported folder's classify graph:

* ``source``: what the runtime does: sha256 of the graph and its weights, an onnxruntime session at
  ORT_ENABLE_ALL, the first batch-1 answer.
* ``cached``: the most a cache could save: a session on onnxruntime's already optimized graph (saved once before
  the rounds) with optimizations off, after hashing only that copy (a cache must be checked against a record;
  the source's own hashes are skipped, which a real cache could not always do), and the first answer.

Run: ``python benchmarks/runtime_cold_start.py EXPORT_DIR [ROUNDS]`` (writes
``benchmarks/results/runtime_cold_start.json``; medians, CPU named from /proc/cpuinfo).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pvt_deploy.bench.machine import cpu_summary
from pvt_deploy.format.manifest import load_manifest

OUT = Path(__file__).parent / "results" / "runtime_cold_start.json"


def _one(mode: str, model: Path, files: list[Path], threads: int = 2) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort

    from pvt_deploy.files import sha256_file

    begin = time.perf_counter()
    for path in files:
        sha256_file(path)
    hashed = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if mode == "source" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    size = list(session.get_inputs()[0].shape[2:])
    session.run(["probabilities"], {"input": np.zeros((1, 3, *size), np.float32)})
    done = time.perf_counter()
    return {
        "hash_s": hashed - begin,
        "session_s": loaded - hashed,
        "first_run_s": done - loaded,
        "total_s": done - begin,
    }


def _optimized_copy(graph: Path, folder: Path) -> Path:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "model.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return folder / "model.onnx"


def main() -> None:
    if sys.argv[1] == "--one":
        mode, model, files = sys.argv[2], Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]]
        print(json.dumps(_one(mode, model, files)))
        return
    export_dir = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    manifest = load_manifest(export_dir)
    graph = manifest.path(manifest.entry("classify").file)
    sources = [graph, *(manifest.path(name) for name in manifest.data_files())]
    with tempfile.TemporaryDirectory() as tmp:
        cached = _optimized_copy(graph, Path(tmp))
        plans = {"source": sources, "cached": [cached, cached.with_name("model.onnx.data")]}
        samples: dict[str, list[dict[str, float]]] = {"source": [], "cached": []}
        for index in range(rounds):
            for mode in ("source", "cached") if index % 2 == 0 else ("cached", "source"):
                model = graph if mode == "source" else cached
                done = subprocess.run(
                    [sys.executable, __file__, "--one", mode, str(model), *map(str, plans[mode])],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                samples[mode].append(json.loads(done.stdout))
        cache_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
    medians = {mode: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for mode, runs in samples.items()}
    result = {
        "model": manifest.network,
        "size": list(manifest.input.size),
        "cpu": cpu_summary(),
        "threads": 2,
        "rounds": rounds,
        "cache_mb_per_graph": round(cache_mb, 1),
        "median": medians,
        "saved_s": medians["source"]["total_s"] - medians["cached"]["total_s"],
        "samples": samples,
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
