"""onnxruntime sessions, created in one place: device and provider choice, quiet CUDA probing, one-line errors.

Sessions are built from the checksummed graph files alone: no optimized graph is saved beside them (it would be a
second copy of the weights that the manifest's checksums do not cover, for 0.10 s of a 0.79 s b2 cold start;
benchmarks/runtime_cold_start.py). Run and allocation failures become one ``InferenceError`` line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pvt_deploy.errors import DeviceError, InferenceError, ModelDirError

logger = logging.getLogger("pvt_deploy.runtime")

DEVICES = ("auto", "cpu", "cuda")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA_PROVIDER, TENSORRT_PROVIDER)

ProviderEntry = str | tuple[str, dict[str, Any]]
"""An onnxruntime execution provider: its name, or (name, provider options)."""

_ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's own default (warning)
_log_lock = threading.Lock()
_warned: set[str] = set()
_warned_lock = threading.Lock()


def nvidia_device_present() -> bool:
    """Whether this machine has an NVIDIA GPU driver loaded (the one NVIDIA probe of the package)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def cuda_provider_listed() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def cuda_usable() -> bool:
    """An NVIDIA device and an onnxruntime build with the CUDA provider (its libraries may still fail to load)."""
    return nvidia_device_present() and cuda_provider_listed()


def warn_once(message: str) -> None:
    """A ``RuntimeWarning`` at most once per process per message (a service log should say it once)."""
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    logger.info(message)  # info, not warning: logging's last-resort handler would print it a second time
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_cpu_fallback(reason: str) -> None:
    """``device="auto"`` is on the CPU although this machine has an NVIDIA device: say so once."""
    warn_once(f"pvt-deploy: device='auto' is using the CPU ({reason})")


def requested_providers(device: str) -> list[ProviderEntry]:
    """Providers to try, in order, for a device choice.

    ``auto`` on a machine without an NVIDIA device is the CPU, silently: nothing was lost. It warns only where it
    matters: an NVIDIA device is present but this onnxruntime has no CUDA provider (or, later, it fails to start)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "cuda":
        if not cuda_provider_listed():
            raise DeviceError("device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider")
        return [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]
    if not nvidia_device_present():
        logger.debug("device='auto': no NVIDIA device, using the CPU")
        return [CPU_PROVIDER]
    if not cuda_provider_listed():
        warn_cpu_fallback("an NVIDIA device is present but this onnxruntime has no CUDAExecutionProvider")
        return [CPU_PROVIDER]
    return [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]


def provider_name(entry: ProviderEntry) -> str:
    return entry if isinstance(entry, str) else entry[0]


def normalize_providers(providers: Sequence[ProviderEntry]) -> list[ProviderEntry]:
    """Check a caller's ``providers=`` list: names (or (name, options)) this onnxruntime offers."""
    entries: list[ProviderEntry] = []
    available = ort.get_available_providers()
    for entry in providers:
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], dict):
            entry = (str(entry[0]), dict(entry[1]))
        elif not isinstance(entry, str):
            raise ValueError(f"providers entries must be names or (name, options) pairs, got {entry!r}")
        name = provider_name(entry)
        if name not in available:
            raise DeviceError(f"execution provider {name!r} is not in this onnxruntime ({', '.join(available)})")
        entries.append(entry)
    if not entries:
        raise ValueError("providers must name at least one execution provider")
    return entries


@contextlib.contextmanager
def quiet_provider_logs(providers: Sequence[ProviderEntry]) -> Iterator[None]:
    """While GPU providers are probed, onnxruntime's default logger prints coloured lines for every library it
    cannot load (``libcublasLt.so.13: cannot open ...``) before our own one-line error; silence it meanwhile."""
    if not any(provider_name(p) in GPU_PROVIDERS for p in providers):
        yield
        return
    with _log_lock:
        ort.set_default_logger_severity(4)
        try:
            yield
        finally:
            ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def session_options(
    threads: int | None = None, optimization: str = "all", allow_spinning: bool = False
) -> ort.SessionOptions:
    """Session options for every graph. Pool threads do not spin-wait by default: on b2/384 at 2 threads, batch 1,
    no spinning measured 1.52x faster at load 12-17 for back-to-back runs and 1.48x for decode+run (medians of an
    interleaved run; every round favoured it, 1.12x at worst; results in
    benchmarks/results/ort_session_ab-b2-384-amd-epyc-avx2.json), because spinning threads take the cores that
    decoding and other processes need. On a machine left to one caller spinning is the faster one (1.04-1.14x,
    quiet), hence ``RuntimeConfig.spin_wait`` (docs/speed.md)."""
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 4  # fatal only: run failures reach the caller as one InferenceError line
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def create_session(
    model_path: Path,
    providers: Sequence[ProviderEntry] = (CPU_PROVIDER,),
    threads: int | None = None,
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """The one place onnxruntime sessions are built (runtime, verify, bench). Load failures are one
    ``ModelDirError`` line; GPU provider probing is quiet."""
    options = options or session_options(threads)
    try:
        with quiet_provider_logs(providers):
            return ort.InferenceSession(str(model_path), options, providers=list(providers))
    except Exception as exc:
        raise ModelDirError(f"{model_path}: onnxruntime cannot load this graph ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
}
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
}


def describe_values(values: Any) -> list[dict[str, Any]]:
    """onnxruntime ``NodeArg``s as manifest-style ``{name, shape, dtype}`` dicts."""
    return [
        {
            "name": v.name,
            "shape": [d if isinstance(d, int) else str(d) for d in v.shape],
            "dtype": ORT_DTYPES.get(v.type, v.type),
        }
        for v in values
    ]


class GraphSession:
    """One loaded graph. ``run`` is safe to call from many threads (onnxruntime's ``run`` is; IO bindings are
    created per call). ``name`` (the graph file) names it in errors."""

    def __init__(self, session: ort.InferenceSession, output_names: tuple[str, ...], name: str = "graph") -> None:
        self.session = session
        self.name = name
        self.output_names = output_names
        self.providers = session.get_providers()
        self.on_cuda = self.providers[0] in GPU_PROVIDERS
        graph_input = session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_dtype = _ORT_TO_NUMPY.get(graph_input.type, np.float32)
        self.inputs = describe_values(session.get_inputs())
        self.outputs = describe_values(session.get_outputs())
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)

    def output_row_shape(self, name: str) -> tuple[int, ...]:
        """An output's shape without the batch dim (symbolic dims as 0), for rows of inputs that all failed."""
        for output in self.outputs:
            if output["name"] == name:
                return tuple(d if isinstance(d, int) else 0 for d in output["shape"][1:])
        return ()

    def run(self, batch: np.ndarray, output_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The named outputs (float32) for one input batch; ``InferenceError`` when onnxruntime cannot run it."""
        names = output_names or self.output_names
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        with self.failures_as_errors():
            if self.on_cuda:
                values = self.run_io_binding(batch, names)
            else:
                values = self.session.run(list(names), {self.input_name: batch})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, values, strict=True)}

    @contextlib.contextmanager
    def failures_as_errors(self) -> Iterator[None]:
        """onnxruntime's run and allocation failures (its own exception types, ``MemoryError``) as one
        ``InferenceError`` line naming the graph."""
        try:
            yield
        except (KeyboardInterrupt, InferenceError):
            raise
        except Exception as exc:
            raise InferenceError(f"onnxruntime could not run {self.name}: {_first_line(exc)}"[:500]) from None

    def run_io_binding(self, batch: np.ndarray, names: tuple[str, ...], device: str = "cuda") -> list[np.ndarray]:
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
        with self.failures_as_errors():
            values = self.session.run(list(names), {self.input_name: batch})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, values, strict=True)}
