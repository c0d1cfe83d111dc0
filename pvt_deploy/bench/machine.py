"""Which machine a bench figure came from: CPU model and the SIMD flags that decide int8 and fp32 kernels.

Speed ratios differ between an AVX2-only CPU and one with AVX-512 VNNI or AMX (int8 GEMMs in particular), so every
result carries the CPU's name, family/model and those flags, with the onnxruntime and torch versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16")
"""Flags that select onnxruntime's MLAS / PyTorch's oneDNN kernels; every ``amx_*`` flag is recorded as well."""


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name, vendor, family/model and the speed-relevant flags of the first processor in ``text``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # only the first processor block; the others repeat it
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name") or platform.processor() or "unknown",
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "flags": [f for f in SPEED_FLAGS if f in flags] + sorted(f for f in flags if f.startswith("amx_")),
    }


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """``parse_cpuinfo`` of this machine (name only, no flags, where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def cpu_summary() -> str:
    """This machine's CPU in one line, e.g. ``AMD EPYC (family 25 model 1; avx2 fma)``: what every benchmark result
    names next to its figures."""
    cpu = cpu_info()
    return f"{cpu['model_name']} (family {cpu['family']} model {cpu['model']}; {' '.join(cpu['flags']) or 'no AVX2'})"


def machine_info() -> dict[str, Any]:
    """The ``machine`` section of a bench result."""
    import onnxruntime as ort
    import torch

    cpu = cpu_info()
    return {
        "platform": platform.platform(),
        "processor": cpu["model_name"],
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
    }


def cpu_line(machine: dict[str, Any]) -> str:
    """One line naming the CPU, its speed flags (and the notable ones it lacks) and the library versions."""
    cpu = machine.get("cpu") or {"model_name": machine.get("processor", "unknown"), "flags": []}
    flags = cpu.get("flags") or []
    lacking = [f for f in ("avx512f", "avx512_vnni", "amx_int8") if f not in flags]
    family = f", family {cpu['family']} model {cpu['model']}" if cpu.get("family") else ""
    return (
        f"CPU: {cpu['model_name']}{family}, {machine.get('logical_cpus')} logical CPUs; "
        f"flags: {' '.join(flags) or 'none of ' + '/'.join(SPEED_FLAGS)}"
        + (f" (no {'/'.join(lacking)})" if lacking else "")
        + f"; onnxruntime {machine.get('onnxruntime')}, torch {machine.get('torch')}"
    )


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None
