"""Shared external-data weights vs three self-contained graphs, on an exported folder.

Usage: .venv/bin/python benchmarks/export_shared_weights.py EXPORT_DIR
Builds self-contained copies of the three fp32 graphs in a temp folder, then compares disk use, onnxruntime
CPU session creation time (median of interleaved runs, 2 threads), process RSS growth after loading all three,
and that outputs are bit-identical. Writes benchmarks/results/shared_weights.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pvt_deploy.format.manifest import load_manifest

GRAPHS = ("classify", "embed", "features")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_RSS_SCRIPT = """
import sys, psutil, onnxruntime as ort
p = psutil.Process(); before = p.memory_info().rss
o = ort.SessionOptions(); o.intra_op_num_threads = 2
s = [ort.InferenceSession(f, o, providers=["CPUExecutionProvider"]) for f in sys.argv[1:]]
print(p.memory_info().rss - before)
"""


def _rss_growth(paths: list[Path]) -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *map(str, paths)], capture_output=True, text=True)
    return int(out.stdout.strip())


def main(folder: Path) -> None:
    manifest = load_manifest(folder)
    size = list(manifest.input.size)
    shared = [folder / f"{g}.onnx" for g in GRAPHS]
    shared_bytes = sum(p.stat().st_size for p in shared) + (folder / "weights.bin").stat().st_size
    with tempfile.TemporaryDirectory() as tmp:
        alone = [Path(tmp) / f"{g}.onnx" for g in GRAPHS]
        for src, dst in zip(shared, alone, strict=True):
            onnx.save(onnx.load(str(src)), str(dst))  # load_external_data=True inlines weights.bin
        alone_bytes = sum(p.stat().st_size for p in alone)
        times: dict[str, list[float]] = {"shared": [], "self_contained": []}
        for _ in range(5):
            for key, paths in (("shared", shared), ("self_contained", alone)):
                t0 = time.perf_counter()
                for p in paths:
                    _session(p)
                times[key].append(time.perf_counter() - t0)
        x = np.random.default_rng(0).standard_normal((2, 3, *size), dtype=np.float32)
        identical = all(
            all(
                np.array_equal(a, b)
                for a, b in zip(_session(s).run(None, {"input": x}), _session(a_).run(None, {"input": x}), strict=True)
            )
            for s, a_ in zip(shared, alone, strict=True)
        )
        report = {
            "folder": str(folder),
            "network": manifest.network,
            "size": size,
            "bytes_shared": shared_bytes,
            "bytes_self_contained": alone_bytes,
            "saving": round(1 - shared_bytes / alone_bytes, 3),
            "load_all_three_s_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "rss_growth_load_all_three_mb": {
                "shared": round(_rss_growth(shared) / 1e6, 1),
                "self_contained": round(_rss_growth(alone) / 1e6, 1),
            },
            "outputs_bit_identical": identical,
            "onnxruntime": ort.__version__,
        }
    out = Path(__file__).parent / "results" / "shared_weights.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
