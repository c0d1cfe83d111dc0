"""Interleaved CPU onnxruntime timing of already exported graphs, with per-round ratios against the first.

Usage: .venv/bin/python benchmarks/export_time_graphs.py ROUNDS OUT.json A.onnx B.onnx ...  (1x3x384x384, 2 threads)
Ratios of runs taken back to back cancel most of the load other processes put on a shared machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

rounds, out, paths = int(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
options = ort.SessionOptions()
options.intra_op_num_threads = 2
options.inter_op_num_threads = 1
sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
x = np.random.default_rng(0).standard_normal((1, 3, 384, 384), dtype=np.float32)
for s in sessions:
    for _ in range(3):
        s.run(None, {"input": x})
times: list[list[float]] = [[] for _ in paths]
for r in range(rounds):
    order = list(range(len(paths))) if r % 2 == 0 else list(reversed(range(len(paths))))
    for i in order:
        t0 = time.perf_counter()
        sessions[i].run(None, {"input": x})
        times[i].append((time.perf_counter() - t0) * 1e3)
report = {
    "rounds": rounds,
    "onnxruntime": ort.__version__,
    "graphs": {
        p.name: {
            "median_ms": round(statistics.median(t), 1),
            "min_ms": round(min(t), 1),
            "median_ratio_vs_first": round(statistics.median(a / b for a, b in zip(t, times[0], strict=True)), 3),
        }
        for p, t in zip(paths, times, strict=True)
    },
}
out.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
