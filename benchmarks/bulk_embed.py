"""Embed throughput of a bulk job on the same images: the local engine at 1 and 2 onnxruntime threads against the
Ray Data engine with 1 and 2 actors (1 thread each), on a local Ray with 2 CPUs. Interleaved rounds, medians, ratios
against local/1 thread from the same run.

Run: python benchmarks/bulk_embed.py MODEL_DIR [--images 500] [--rounds 3] [--out benchmarks/results/bulk_embed.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pvt_deploy import Runtime
from pvt_deploy.bench.machine import cpu_summary
from pvt_deploy.jobs import JobPlan, JobSpec, engine_named, run_job

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]


def one_run(model_dir: Path, images: list[str], engine: str, width: int, out: Path) -> float:
    threads = width if engine == "local" else 1
    runtime = Runtime(model_dir, device="cpu", threads=threads)
    started = time.perf_counter()
    plan = JobPlan(JobSpec("embed"), images, out, overwrite=True)
    run_job(runtime, plan, engine_named(engine, actors=width if engine == "ray" else None))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bulk_embed.json"))
    args = parser.parse_args()
    import ray

    photos = sorted(str(p) for p in (REPO / "tests" / "data" / "photos").iterdir() if p.suffix in (".png", ".jpg"))
    images = [photos[i % len(photos)] for i in range(args.images)]
    ray.init(num_cpus=2, include_dashboard=False)
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    seconds: dict[str, list[float]] = {f"{e}/{w}": [] for e, w in CONFIGS}
    try:
        one_run(args.model_dir, images[:20], "ray", 2, work / "warm.parquet")  # start the Ray workers once
        for round_index in range(args.rounds):
            order = CONFIGS[round_index % len(CONFIGS) :] + CONFIGS[: round_index % len(CONFIGS)]
            for engine, width in order:
                took = one_run(args.model_dir, images, engine, width, work / f"{engine}{width}.parquet")
                seconds[f"{engine}/{width}"].append(took)
                print(f"round {round_index} {engine}/{width}: {took:.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(seconds["local/1"])
    results = {
        "cpu": cpu_summary(),
        "model": str(args.model_dir),
        "images": args.images,
        "rounds": args.rounds,
        "configs": {
            name: {
                "median_s": round(statistics.median(runs), 2),
                "min_s": round(min(runs), 2),
                "max_s": round(max(runs), 2),
                "images_per_s": round(args.images / statistics.median(runs), 1),
                "x_local_1_thread": round(base / statistics.median(runs), 2),
            }
            for name, runs in seconds.items()
        },
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
