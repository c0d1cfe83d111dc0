"""Timing and memory primitives: percentiles, the machine's GEMM rates (its limits), load, resident-set sampling."""

from __future__ import annotations

import math
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil

GEMM_SIZE = 2048
"""Square sgemm side for the reference rate: large enough to run at peak, ~0.1 s a call on 2 AVX-512 cores."""


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with few samples it reports a time that was actually seen)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(seconds: list[float], batch: int, flops_per_image: float) -> dict[str, float]:
    """Latency percentiles (ms) per call, images/s and achieved GFLOP/s from the median call."""
    p50 = statistics.median(seconds)
    return {
        "calls": len(seconds),
        "p50_ms": 1000.0 * p50,
        "p95_ms": 1000.0 * percentile(seconds, 95),
        "min_ms": 1000.0 * min(seconds),
        "ms_per_image": 1000.0 * p50 / batch,
        "images_per_s": batch / p50,
        "gflop_per_s": flops_per_image * batch / p50 / 1e9,
    }


def gemm_gflops(threads: int, calls: int = 5, size: int = GEMM_SIZE) -> dict[str, float]:
    """Single-precision GEMM rate on ``threads`` threads (torch.mm, i.e. the BLAS PyTorch itself uses).

    Returns the median and best of ``calls`` timed calls after one warm-up, in GFLOP/s."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)
        rates = []
        for _ in range(calls):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            rates.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(previous)
    return {"median_gflop_per_s": statistics.median(rates), "best_gflop_per_s": max(rates), "size": size}


def ort_gemm_rate(threads: int, kind: str = "fp32", calls: int = 5, size: int = GEMM_SIZE) -> dict[str, float]:
    """onnxruntime's own GEMM rate on ``threads`` threads, i.e. the MLAS kernels the exported graphs run on.

    ``kind="fp32"``: a ``MatMul`` with a constant (pre-packed) weight, MLAS sgemm: the limit of the fp32 graphs.
    ``kind="u8s8"``: a ``MatMulInteger`` with uint8 activations and a constant int8 weight, MLAS's u8s8 GEMM (AVX2
    ``vpmaddubsw``; VNNI/AMX where the CPU has it): the limit of the int8 graphs, whose quantized MatMuls run on it.
    Returns the median and best of ``calls`` timed runs after one warm-up, in G(FL)OP/s (2 ops per multiply-add)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pvt_deploy.runtime.sessions import session_options

    rng = np.random.default_rng(0)
    if kind == "fp32":
        weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a = rng.standard_normal((size, size), dtype=np.float32)
        a_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [weight]
    elif kind == "u8s8":
        weight = numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "B")
        zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), "a_zero")  # asymmetric, as dynamic int8 is
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zero"], ["Y"])
        a = rng.integers(0, 256, (size, size), dtype=np.uint8)
        a_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [weight, zero]
    else:
        raise ValueError(f"unknown GEMM kind {kind!r} (fp32, u8s8)")
    graph = helper.make_graph(
        [node],
        f"gemm_{kind}",
        [helper.make_tensor_value_info("A", a_type, [size, size])],
        [helper.make_tensor_value_info("Y", y_type, [size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = session_options(threads)  # as the runtime's sessions run (no spin-waiting)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"A": a})
    rates = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, {"A": a})
        rates.append(2.0 * size**3 / (time.perf_counter() - start) / 1e9)
    return {"median_gflop_per_s": statistics.median(rates), "best_gflop_per_s": max(rates), "size": size}


LIMITS = ("torch-sgemm", "mlas-sgemm", "mlas-u8s8")
"""The machine's GEMM rates a variant is held against: torch's BLAS for PyTorch fp32, MLAS sgemm for onnxruntime fp32,
MLAS u8s8 for onnxruntime int8 (as if every FLOP ran at that rate: the float ops left in an int8 graph count too)."""


def gemm_limits(threads: int, calls: int = 5) -> dict[str, dict[str, float]]:
    """Every rate in ``LIMITS`` on ``threads`` threads."""
    return {
        "torch-sgemm": gemm_gflops(threads, calls),
        "mlas-sgemm": ort_gemm_rate(threads, "fp32", calls),
        "mlas-u8s8": ort_gemm_rate(threads, "u8s8", calls),
    }


def limit_for(engine: str, precision: str, device: str) -> str | None:
    """Which of ``LIMITS`` bounds a variant; None where none was measured (GPU variants)."""
    if device != "cpu":
        return None
    if engine.startswith("pytorch") or engine.startswith("torch"):
        return "torch-sgemm" if precision == "fp32" else None
    if engine == "onnxruntime":
        return {"fp32": "mlas-sgemm", "int8": "mlas-u8s8"}.get(precision)
    return None


LOADED_ABOVE = 1.0
"""A run is marked loaded when other work kept more than this many runnable threads on the machine."""


def load_record(start: list[float] | None, end: list[float] | None, own_threads: int) -> dict[str, object]:
    """The load the run saw and whether it was loaded: the 1-minute average above ``LOADED_ABOVE`` at the start, or
    at the end once the bench's own threads (which the load average counts too) are taken off."""
    reasons = []
    if start is not None and start[0] > LOADED_ABOVE:
        reasons.append(f"load average {start[0]:.2f} at start")
    if end is not None and end[0] - own_threads > LOADED_ABOVE:
        reasons.append(f"load average {end[0]:.2f} at end (bench's own threads: {own_threads})")
    return {
        "start": start,
        "end": end,
        "own_threads": own_threads,
        "loaded": bool(reasons),
        "why": "; ".join(reasons) if reasons else None,
        "rule": f"loaded when the 1-min load average is > {LOADED_ABOVE:g} at start, or > {LOADED_ABOVE:g} + the "
        "bench's own threads at end; loaded figures are noisy (other processes share the cores)",
    }


class RssSampler:
    """Peak resident set of this process as seen right after each call (one process runs every variant, so a
    variant's figure includes what earlier variants left allocated; ``process_peak_mb`` is the OS high-water mark).
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak_bytes = 0

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def process_peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def nvidia_smi_query(field: str) -> str | None:
    """One ``nvidia-smi --query-gpu`` field of device 0 (e.g. ``name``, ``memory.used``), or None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines and lines[0].strip() else None


def gpu_memory_used_mb() -> float | None:
    """GPU memory in use on device 0 (all processes); None where nvidia-smi cannot say."""
    used = nvidia_smi_query("memory.used")
    try:
        return float(used) if used is not None else None
    except ValueError:
        return None
