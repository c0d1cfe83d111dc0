"""The things ``bench`` times. Each runner answers a (N, 3, H, W) float32 batch with probabilities and embeddings,
and reports how long it took from creation to its first answer (cold start)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.bench.measure import gpu_memory_used_mb
from pvt_deploy.errors import PvtDeployError, RunnerUnavailable


class Runner:
    """Base: ``name`` (unique in a run), ``engine``, ``precision``, ``device``, ``threads``."""

    name: str
    engine: str
    precision: str = "fp32"
    device: str = "cpu"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.cold_start_s = float("nan")

    def start(self, first_batch: np.ndarray) -> float:
        """Create whatever the variant needs and answer ``first_batch``; returns seconds taken (cold start)."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def gpu_memory_mb(self) -> float | None:
        return None

    def close(self) -> None:
        """Release sessions and models."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine,
            "precision": self.precision,
            "device": self.device,
            "threads": self.threads,
        }


# ----------------------------------------------------------------------------------------------- PyTorch


class TorchEagerRunner(Runner):
    """Our reference model the way birder's inference runs it: ``eval()``, ``torch.inference_mode()``."""

    engine = "pytorch-eager"

    def __init__(self, model: Any, threads: int, device: str = "cpu", autocast_fp16: bool = False) -> None:
        super().__init__(threads)
        self.model = model
        self.device = device
        self.precision = "fp16-autocast" if autocast_fp16 else "fp32"
        self.name = f"torch-eager-{device}" + ("-fp16" if autocast_fp16 else "")
        self._autocast = autocast_fp16

    def _forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        torch.set_num_threads(self.threads)
        with torch.inference_mode(), self._autocast_context():
            x = torch.from_numpy(batch).to(self.device)
            embedding = self.model.embedding(x)
            logits = self.model.classify(embedding)
            probabilities = torch.softmax(logits.float(), dim=1)
            out = {"probabilities": probabilities, "embedding": embedding.float()}
            if self.device != "cpu":
                torch.cuda.synchronize()
            return {k: v.cpu().numpy() for k, v in out.items()}

    def _autocast_context(self) -> Any:
        import torch

        if self._autocast:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def start(self, first_batch: np.ndarray) -> float:
        import torch

        begin = time.perf_counter()
        self.model = self.model.eval().to(self.device)
        if self.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        self._forward(first_batch)
        self.cold_start_s = time.perf_counter() - begin
        return self.cold_start_s

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self._forward(batch)

    def gpu_memory_mb(self) -> float | None:
        if self.device == "cpu":
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (a hung or slow compile must not stall bench)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"exceeded {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class TorchCompileRunner(TorchEagerRunner):
    """``torch.compile`` (inductor, default mode) of the same model; skipped when it fails or exceeds its time box.

    Compiled with torch's automatic dynamic shapes: the first batch size gets a static graph, the second one
    recompiles once with a symbolic batch that serves every later size. Recompiles happen in warm-up or fidelity
    calls, which ``bench`` keeps apart from the steady state."""

    engine = "torch-compile"

    def __init__(self, model: Any, threads: int, timeout_s: float) -> None:
        super().__init__(model, threads)
        self.name = "torch-compile-cpu"
        self.timeout_s = timeout_s
        self._eager = model

    def start(self, first_batch: np.ndarray) -> float:
        import torch

        begin = time.perf_counter()
        try:
            with _deadline(self.timeout_s):
                self.model = torch.compile(self._eager.eval())
                self._forward(first_batch)
        except Exception as exc:  # includes TimeoutError and inductor/compiler failures
            self.model = self._eager
            torch._dynamo.reset()
            raise RunnerUnavailable(f"torch.compile: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        self.cold_start_s = time.perf_counter() - begin
        return self.cold_start_s

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with _deadline(self.timeout_s):  # a recompile for a new batch size gets the same time box
            return self._forward(batch)


# ------------------------------------------------------------------------------------------- onnxruntime


class OrtRuntimeRunner(Runner):
    """pvt-deploy's own ``Runtime`` on one precision: what a deployment runs, micro-batching included. The cold
    start includes the checksums and onnxruntime's graph optimization, as on a fresh machine."""

    engine = "onnxruntime"

    def __init__(
        self,
        model_dir: Path,
        precision: str,
        device: str,
        threads: int,
        batch_size: int | None,
        spin_wait: bool = False,
    ) -> None:
        super().__init__(threads)
        self.model_dir = model_dir
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.spin_wait = spin_wait
        self.name = f"ort-{device}-{precision}" + ("-spin" if spin_wait else "")
        self.runtime: Any = None
        self._gpu_baseline_mb: float | None = None

    def start(self, first_batch: np.ndarray) -> float:
        from pvt_deploy.runtime import Runtime

        self._gpu_baseline_mb = gpu_memory_used_mb() if self.device == "cuda" else None
        begin = time.perf_counter()
        self.runtime = Runtime(
            self.model_dir,
            device=self.device,
            precision=self.precision,
            threads=self.threads,
            batch_size=self.batch_size,
            spin_wait=self.spin_wait,
        )
        if self.device == "cuda" and self.runtime.active_device != "cuda":
            raise RunnerUnavailable("onnxruntime fell back to the CPU")
        self(first_batch)
        self.cold_start_s = time.perf_counter() - begin
        return self.cold_start_s

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        probabilities, embedding = self.runtime.classify(batch, return_embedding=True)
        return {"probabilities": probabilities, "embedding": embedding}

    def gpu_memory_mb(self) -> float | None:
        if self.device != "cuda" or self._gpu_baseline_mb is None:
            return None
        used = gpu_memory_used_mb()
        return None if used is None else used - self._gpu_baseline_mb

    def describe(self) -> dict[str, Any]:
        batch_size = self.runtime.batch_size if self.runtime is not None else self.batch_size
        return {**super().describe(), "micro_batch": batch_size}

    def close(self) -> None:
        self.runtime = None


class OrtTensorRTRunner(OrtRuntimeRunner):
    """The fp32 classify graph on onnxruntime's TensorRT provider (fp16 kernels allowed), CUDA as fallback."""

    engine = "onnxruntime-tensorrt"

    def __init__(self, model_dir: Path, threads: int, cache_dir: Path) -> None:
        super().__init__(model_dir, "fp32", "cuda", threads, None)
        self.precision = "trt-fp16"
        self.name = "ort-tensorrt-fp16"
        self.cache_dir = cache_dir

    def start(self, first_batch: np.ndarray) -> float:
        from pvt_deploy.errors import RunnerUnavailable
        from pvt_deploy.runtime import Runtime
        from pvt_deploy.runtime.sessions import TENSORRT_PROVIDER

        self._gpu_baseline_mb = gpu_memory_used_mb()
        begin = time.perf_counter()
        options = {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.cache_dir),
        }
        try:  # the runtime's own session seam, with the TensorRT provider passed through
            self.runtime = Runtime(
                self.model_dir,
                providers=[(TENSORRT_PROVIDER, options), "CUDAExecutionProvider"],
                threads=self.threads,
                batch_size=max(len(first_batch), 1),
            )
            self.runtime.load(["classify"])
        except PvtDeployError as exc:
            raise RunnerUnavailable(f"TensorRT provider: {str(exc).splitlines()[0][:200]}") from None
        if self.runtime.session("classify").providers[0] != TENSORRT_PROVIDER:
            raise RunnerUnavailable("TensorRT provider did not load (missing TensorRT libraries?)")
        self(first_batch)
        self.cold_start_s = time.perf_counter() - begin
        return self.cold_start_s


def cuda_device_present() -> bool:
    """A usable NVIDIA device and onnxruntime's CUDA provider (the runtime's rule)."""
    from pvt_deploy.runtime.sessions import cuda_usable

    return cuda_usable()
