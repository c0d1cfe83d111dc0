"""Per-image time of the classify graph at micro-batch 1, 2, 4, 8 on this machine's CPU (picks ``DEFAULT_BATCH_SIZE``).

Rounds are interleaved (every batch size once per round, alternating order) and medians reported, so a busy shared
machine biases all sizes alike. Needs an exported folder (e.g. ``pvt-deploy export pvt_v2_b2 --random-weights``);
torch is not used.

    python benchmarks/runtime_microbatch.py MODEL_DIR [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pvt_deploy import Runtime
from pvt_deploy.format.manifest import load_manifest

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_microbatch.json"


def measure(model_dir: Path, threads: int | None, rounds: int, sizes: list[int]) -> dict[str, object]:
    runtime = Runtime(model_dir, device="cpu", threads=threads)
    session = runtime.session("classify")
    height, width = runtime.spec.size
    rng = np.random.default_rng(0)
    batches = {b: rng.standard_normal((b, 3, height, width)).astype(np.float32) for b in sizes}
    for batch in batches.values():  # warm-up: allocations, thread pool
        session.run(batch, ("probabilities",))
    per_image: dict[int, list[float]] = {b: [] for b in sizes}
    cpu_per_image: dict[int, list[float]] = {b: [] for b in sizes}
    for round_index in range(rounds):
        order = sizes if round_index % 2 == 0 else sizes[::-1]
        for b in order:
            started, cpu_started = time.perf_counter(), time.process_time()
            session.run(batches[b], ("probabilities",))
            per_image[b].append((time.perf_counter() - started) / b)
            cpu_per_image[b].append((time.process_time() - cpu_started) / b)
    return {
        "threads": threads,
        "median_ms_per_image": {str(b): round(1000 * statistics.median(v), 1) for b, v in per_image.items()},
        "min_ms_per_image": {str(b): round(1000 * min(v), 1) for b, v in per_image.items()},
        # CPU time of this process: what an image costs in compute, much less sensitive to other jobs' load
        "median_cpu_ms_per_image": {str(b): round(1000 * statistics.median(v), 1) for b, v in cpu_per_image.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    manifest = load_manifest(args.model_dir)
    load_before = os.getloadavg()
    runs = [measure(args.model_dir, t, args.rounds, args.sizes) for t in args.threads]
    result = {
        "model": {"network": manifest.network, "size": list(manifest.input.size)},
        "onnxruntime": ort.__version__,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rounds": args.rounds,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
