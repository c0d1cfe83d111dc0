"""onnxruntime sessions for one exported graph: device choice, a cached optimized model, and the CPU / CUDA run.

Why a cache: onnxruntime's graph optimizations (fusions, layout changes) take a noticeable share of the first
load of a b2 graph. We save the optimized graph once (``SessionOptions.optimized_model_filepath``) and load it with
optimizations off afterwards. Such a file is only valid for the onnxruntime version, execution provider and CPU
features that produced it, so those (and the source graph's sha256) are in its name. It is written next to the
model in ``.ort-cache/`` or, when the model folder is read-only, under the user cache dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pvt_deploy.errors import DeviceError, ModelDirError
from pvt_deploy.manifest import sha256_file

logger = logging.getLogger("pvt_deploy.runtime")

DEVICES = ("auto", "cpu", "cuda")
CACHE_DIR_NAME = ".ort-cache"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

_fallback_warned = False
_fallback_lock = threading.Lock()


def _nvidia_device_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def cuda_provider_listed() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def warn_cpu_fallback(reason: str) -> None:
    """Warn once per process that ``device="auto"`` fell back to the CPU (a service log should say so once)."""
    global _fallback_warned
    with _fallback_lock:
        if _fallback_warned:
            return
        _fallback_warned = True
    message = f"pvt-deploy: device='auto' is using the CPU ({reason})"
    logger.debug(message)  # services that route warnings to logging (logging.captureWarnings) see it once there
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def requested_providers(device: str) -> list[str]:
    """Providers to try, in order, for a device choice. ``auto`` skips CUDA when no NVIDIA device exists so a
    CPU machine with onnxruntime-gpu installed does not log a failed CUDA library load on every session."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "cuda":
        if not cuda_provider_listed():
            raise DeviceError("device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider")
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if cuda_provider_listed() and _nvidia_device_present():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    reason = "no CUDAExecutionProvider" if not cuda_provider_listed() else "no NVIDIA device found"
    warn_cpu_fallback(reason)
    return [CPU_PROVIDER]


def machine_key(provider: str) -> str:
    """What an optimized graph depends on: onnxruntime version, provider, CPU architecture and feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    digest = hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:12]
    short_provider = provider.replace("ExecutionProvider", "").lower()
    return f"ort{ort.__version__}-{short_provider}-{platform.machine()}-{digest}"


def user_cache_dir() -> Path:
    """``$PVT_DEPLOY_CACHE/ort-optimized``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)``/pvt-deploy/ort-optimized``."""
    if os.environ.get("PVT_DEPLOY_CACHE"):
        return Path(os.environ["PVT_DEPLOY_CACHE"]) / "ort-optimized"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pvt-deploy" / "ort-optimized"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


CACHED_MODEL_NAME = "model.onnx"
CACHED_DATA_NAME = "model.onnx.data"
CACHED_RECORD_NAME = "record.json"


def optimized_cache_path(model_dir: Path, graph_file: str, graph_sha256: str, provider: str) -> Path | None:
    """The folder of one cached optimized graph: under ``<model_dir>/.ort-cache/`` if writable, else the user cache.

    A folder, because the optimized graph keeps its weights in an external-data file beside it (graphs exported
    with a shared ``weights.bin`` would otherwise point at a file that is not in the cache folder)."""
    name = f"{Path(graph_file).stem}.{graph_sha256[:16]}.{machine_key(provider)}"
    for folder in (model_dir / CACHE_DIR_NAME, user_cache_dir()):
        if _writable_dir(folder):
            return folder / name
    return None


def _cache_is_valid(entry: Path) -> bool:
    """``record.json`` holds the sha256 and size of the cached files, so a damaged cache is rebuilt, never used."""
    try:
        record = json.loads((entry / CACHED_RECORD_NAME).read_text(encoding="utf-8"))
        files = record["files"]
        if CACHED_MODEL_NAME not in files:
            return False
        for name, expected in files.items():
            path = entry / name
            if path.stat().st_size != expected["size"] or sha256_file(path) != expected["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclass
class SessionConfig:
    providers: list[str]
    threads: int | None = None
    use_cache: bool = True


def _session_options(threads: int | None, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def _provider_entries(providers: list[str]) -> list[Any]:
    entries: list[Any] = []
    for provider in providers:
        if provider == CUDA_PROVIDER:
            entries.append((CUDA_PROVIDER, {"device_id": 0}))
        else:
            entries.append(provider)
    return entries


def create_session(model_path: Path, graph_sha256: str, config: SessionConfig) -> tuple[ort.InferenceSession, bool]:
    """Load one verified graph, reusing or writing the optimized-graph cache (best effort, never required).

    Returns the session and whether it came from the cache."""
    entries = _provider_entries(config.providers)
    # CPU only: a graph optimized for the CUDA provider may hold provider-specific fusions whose serialized form
    # is not guaranteed to reload; unverified without a GPU, so CUDA sessions always optimize from the source.
    cache = (
        optimized_cache_path(model_path.parent, model_path.name, graph_sha256, config.providers[0])
        if config.use_cache and config.providers[0] == CPU_PROVIDER
        else None
    )
    try:
        if cache is not None and _cache_is_valid(cache):
            try:
                options = _session_options(config.threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
                return ort.InferenceSession(str(cache / CACHED_MODEL_NAME), options, providers=entries), True
            except Exception as exc:  # a stale or foreign cache: rebuild it from the verified source graph
                logger.info("ignoring optimized-graph cache %s (%s)", cache, exc)
        options = _session_options(config.threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        staging = None
        if cache is not None:
            staging = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            options.optimized_model_filepath = str(staging / CACHED_MODEL_NAME)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", CACHED_DATA_NAME
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = ort.InferenceSession(str(model_path), options, providers=entries)
        if staging is not None and cache is not None:
            _publish_cache(staging, cache)
        return session, False
    except DeviceError:
        raise
    except Exception as exc:
        raise ModelDirError(f"{model_path}: onnxruntime cannot load this graph ({_first_line(exc)})") from None


def _publish_cache(staging: Path, cache: Path) -> None:
    """Record checksums, then move the staging folder into place in one rename (a reader sees all or nothing)."""
    try:
        if not (staging / CACHED_MODEL_NAME).is_file():
            return
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in staging.iterdir() if p.is_file()}
        record = {"files": files, "onnxruntime": ort.__version__, "machine": cache.name}
        (staging / CACHED_RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if cache.exists():  # damaged (else it would have been used) or just written by a concurrent process
            if _cache_is_valid(cache):
                return
            shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)
    except OSError as exc:
        logger.info("could not write optimized-graph cache %s (%s)", cache, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class GraphSession:
    """One loaded graph. ``run`` is safe to call from many threads (onnxruntime's ``run`` is; IO bindings are
    created per call)."""

    def __init__(self, session: ort.InferenceSession, output_names: tuple[str, ...], from_cache: bool = False) -> None:
        self.session = session
        self.from_cache = from_cache  # loaded from the optimized-graph cache
        self.output_names = output_names
        self.providers = session.get_providers()
        self.on_cuda = self.providers[0] == CUDA_PROVIDER
        graph_input = session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_dtype = _ORT_TO_NUMPY.get(graph_input.type, np.float32)
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)

    def run(self, batch: np.ndarray, output_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        names = output_names or self.output_names
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if self.on_cuda:
            values = self._run_io_binding(batch, names)
        else:
            values = self.session.run(list(names), {self.input_name: batch})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, values, strict=True)}

    def _run_io_binding(self, batch: np.ndarray, names: tuple[str, ...], device: str = "cuda") -> list[np.ndarray]:
        """Copy the input to the device once, let onnxruntime allocate the outputs there, copy them back once
        (plain ``run`` on CUDA stages through extra host buffers). ``device="cpu"`` exercises the same calls on a
        machine without a GPU."""
        binding = self.session.io_binding()
        device_input = ort.OrtValue.ortvalue_from_numpy(batch, device, 0)
        binding.bind_ortvalue_input(self.input_name, device_input)
        for name in names:
            binding.bind_output(name, device, 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run_plain(self, batch: np.ndarray, output_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """``session.run`` without IO binding, for comparing the two paths on a GPU."""
        names = output_names or self.output_names
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        values = self.session.run(list(names), {self.input_name: batch})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, values, strict=True)}
