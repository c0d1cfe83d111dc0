"""Resident memory of one ``Runtime`` over 1,000 calls: it should rise during warm-up and then stay flat.

Each call decodes a real photo, preprocesses it and runs a graph (classify with embedding; every 5th call also the
features graph, every 7th a batch with a bad input collected as an error). RSS (psutil) is sampled every 10 calls.
Flat means: the least-squares slope over calls 200..1000 is under 1 KiB per call.

    python benchmarks/runtime_memory.py [MODEL_DIR] [--calls 1000]

Without MODEL_DIR the tiny test export is built first in a subprocess (that step needs torch; the measured process
never imports it).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PHOTOS = REPO / "tests" / "data" / "photos"
FLAT_SLOPE_KIB_PER_CALL = 1.0

BUILD_TINY = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.fixtures.checkpoints import write_tiny_checkpoint
from tests.fixtures.exported import export_tiny
out = Path({out!r})
export_tiny(write_tiny_checkpoint(out / "tiny.pt"), out / "pvt_v2_tiny")
"""


def build_tiny_export(folder: Path) -> Path:
    code = BUILD_TINY.format(repo=str(REPO), out=str(folder))
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder / "pvt_v2_tiny"


def measure(model_dir: Path, calls: int, every: int) -> dict[str, object]:
    from pvt_deploy import Runtime  # after the export subprocess, so this process stays torch-free

    process = psutil.Process()
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
    runtime = Runtime(model_dir, device="cpu", threads=1)
    samples: list[tuple[int, float]] = [(0, process.memory_info().rss / 2**20)]
    started = time.perf_counter()
    for call in range(1, calls + 1):
        photo = photos[call % len(photos)]
        runtime.classify(str(photo), return_embedding=True)
        if call % 5 == 0:
            runtime.features(photo.read_bytes())
        if call % 7 == 0:
            runtime.predict([photo, PHOTOS / "missing.jpg"], top_k=3, on_error="collect")
        if call % every == 0:
            gc.collect()
            samples.append((call, process.memory_info().rss / 2**20))
    seconds = time.perf_counter() - started
    steady = np.array([(c, rss) for c, rss in samples if c >= min(200, calls // 5)])
    slope_mib = float(np.polyfit(steady[:, 0], steady[:, 1], 1)[0]) if len(steady) > 1 else 0.0
    return {
        "model_dir": str(model_dir),
        "calls": calls,
        "seconds": round(seconds, 1),
        "torch_imported": "torch" in sys.modules,
        "rss_mib": {
            "start": round(samples[0][1], 1),
            "after_200_calls": round(next(rss for c, rss in samples if c >= min(200, calls)), 1),
            "end": round(samples[-1][1], 1),
            "max": round(max(rss for _, rss in samples), 1),
        },
        "steady_slope_kib_per_call": round(slope_mib * 1024, 3),
        "flat": abs(slope_mib * 1024) < FLAT_SLOPE_KIB_PER_CALL,
        "samples": [[c, round(rss, 2)] for c, rss in samples],
    }


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls, rss = zip(*result["samples"], strict=True)  # type: ignore[arg-type]
    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    axis.plot(calls, rss, marker=".", linewidth=1)
    axis.set_xlabel("calls")
    axis.set_ylabel("RSS (MiB)")
    axis.set_title(f"Runtime RSS over {result['calls']} calls (slope {result['steady_slope_kib_per_call']} KiB/call)")
    axis.set_ylim(0, max(rss) * 1.15)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10, help="sample RSS every N calls")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or build_tiny_export(Path(scratch))
        result = measure(model_dir, args.calls, args.every)
    if args.model_dir is None:
        result["model_dir"] = "tiny test export (tests/fixtures/exported.py)"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(result, RESULTS / "runtime_memory.png")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    if not result["flat"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
