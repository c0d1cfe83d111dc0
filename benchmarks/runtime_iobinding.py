"""CUDA: IO binding (the Runtime's path) against plain ``session.run``, per batch size, on the card it runs on.

Not run yet (no GPU in the session that wrote it). Interleaved rounds, medians; also checks that both paths give
the same outputs. Writes ``benchmarks/results/runtime_iobinding.json`` with the card named.

    python benchmarks/runtime_iobinding.py MODEL_DIR [--rounds 20] [--sizes 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pvt_deploy import Runtime
from pvt_deploy.errors import PvtDeployError

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_iobinding.json"


def card_name() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--graph", default="classify")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    try:
        runtime = Runtime(args.model_dir, device="cuda", precision=args.precision)
        session = runtime.session(args.graph)
    except PvtDeployError as exc:
        sys.exit(f"Error: {exc}")
    if not session.on_cuda:
        sys.exit("the session is not on CUDA; nothing to measure")
    height, width = runtime.spec.size
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        batch = rng.standard_normal((size, 3, height, width)).astype(np.float32)
        paths = {"io_binding": session.run, "plain_run": session.run_plain}
        outputs = {name: run(batch) for name, run in paths.items()}  # warm-up + equality
        max_abs = max(
            float(np.abs(outputs["io_binding"][k] - outputs["plain_run"][k]).max()) for k in session.output_names
        )
        times: dict[str, list[float]] = {name: [] for name in paths}
        for round_index in range(args.rounds):
            for name in list(paths) if round_index % 2 == 0 else list(paths)[::-1]:
                started = time.perf_counter()
                paths[name](batch)
                times[name].append(time.perf_counter() - started)
        medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
        rows.append(
            {
                "batch": size,
                "median_ms": {name: round(value, 3) for name, value in medians.items()},
                "speedup_io_binding": round(medians["plain_run"] / medians["io_binding"], 3),
                "max_abs_difference": max_abs,
            }
        )
        print(rows[-1])
    result = {
        "card": card_name(),
        "onnxruntime": ort.__version__,
        "model": runtime.manifest.model_name,
        "network": runtime.manifest.network,
        "graph": args.graph,
        "precision": args.precision,
        "size": [height, width],
        "rounds": args.rounds,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
