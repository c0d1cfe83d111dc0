"""Which exporter/opset/simplifier gives the fastest correct b2 graph on CPU onnxruntime (384px, batch 1, 2 threads)?

Exports ClassifyGraph of pvt_v2_b2 (random weights, 550 classes) per candidate, checks parity against PyTorch
at batch 1 and 3, then times all candidates interleaved (round-robin) and reports medians. Writes
benchmarks/results/exporter_bench.json. Run: .venv/bin/python benchmarks/export_exporters.py [rounds]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pvt_deploy.export import onnx_io
from pvt_deploy.export.graphs import reference_outputs, wrap
from pvt_deploy.model.pvt_v2 import create_model

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
WORK = Path("/tmp/exporter_bench")
WORK.mkdir(exist_ok=True)
OUT = Path(__file__).parent / "results"
OUT.mkdir(exist_ok=True)
SIZE = 384
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15

torch.manual_seed(0)
model = create_model("pvt_v2_b2", 550, size=(SIZE, SIZE)).eval()
names = ["probabilities", "logits", "embedding"]


def export(exporter: str, opset: int, path: Path) -> float:
    """The shipped code path (pvt_deploy.export.onnx_io), so the measurement is of what export writes."""
    t0 = time.perf_counter()
    onnx_io.export_graph(
        wrap(model, "classify"), "classify", path, size=(SIZE, SIZE), dynamic_size=False, exporter=exporter, opset=opset
    )
    return time.perf_counter() - t0


def simplify(src: Path, tool: str) -> Path:
    dst = src.with_name(src.stem + f".{tool}.onnx")
    shutil.copy(src, dst)
    onnx_io.simplify_graph(dst, tool)
    return dst


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity(sess: ort.InferenceSession) -> dict[str, float]:
    res = {}
    for b in (1, 3):
        x = torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(b))
        ref = reference_outputs(model, "classify", x)
        got = sess.run(None, {"input": x.numpy()})
        for n, g in zip(names, got, strict=True):
            res[n] = max(res.get(n, 0.0), float(np.abs(g - ref[n].numpy()).max()))
    return res


candidates = {}
report = {
    "size": SIZE,
    "batch": 1,
    "threads": 2,
    "rounds": ROUNDS,
    "torch": torch.__version__,
    "onnxruntime": ort.__version__,
    "candidates": {},
}
plan = [("torchscript", 17), ("torchscript", 18), ("dynamo", 18), ("dynamo", 20), ("dynamo", 23)]
for exporter, opset in plan:
    raw = WORK / f"{exporter}_op{opset}.onnx"
    try:
        secs = export(exporter, opset, raw)
    except Exception as exc:  # record and continue: a failing candidate is a result too
        report["candidates"][f"{exporter}-op{opset}"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print(exporter, opset, "FAILED", exc, flush=True)
        continue
    for tool in ("raw", "onnxsim", "onnxslim"):
        key = f"{exporter}-op{opset}-{tool}"
        try:
            path = raw if tool == "raw" else simplify(raw, tool)
            sess = session(path)
            diffs = parity(sess)
        except Exception as exc:
            report["candidates"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(key, "FAILED", exc, flush=True)
            continue
        nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
        report["candidates"][key] = {"export_s": round(secs, 1), "nodes": nodes, "max_abs": diffs, "times_ms": []}
        candidates[key] = sess
        print(key, f"export {secs:.1f}s nodes {nodes} parity {diffs}", flush=True)

x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
for sess in candidates.values():
    for _ in range(3):
        sess.run(None, {"input": x})
for _round in range(ROUNDS):
    for key, sess in candidates.items():
        t0 = time.perf_counter()
        sess.run(None, {"input": x})
        report["candidates"][key]["times_ms"].append((time.perf_counter() - t0) * 1e3)
for key in candidates:
    t = report["candidates"][key]["times_ms"]
    report["candidates"][key]["median_ms"] = round(statistics.median(t), 2)
    print(f"{key:32s} median {statistics.median(t):8.2f} ms  min {min(t):8.2f}", flush=True)
(OUT / "exporter_bench.json").write_text(json.dumps(report, indent=2))
