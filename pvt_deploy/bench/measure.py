"""Timing and memory primitives: percentiles, the machine's sgemm rate, resident-set sampling."""

from __future__ import annotations

import math
import resource
import shutil
import statistics
import subprocess
import sys
import time

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
