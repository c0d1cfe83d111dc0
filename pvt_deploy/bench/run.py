"""One benchmark run: every variant, every batch size, interleaved call by call so that machine noise (other
processes, turbo, thermal) lands on all variants alike and the ratios between them stay meaningful.

Per thread setting: the machine's GEMM limits (torch sgemm, MLAS sgemm, MLAS u8s8) -> create each runner (cold
start) -> fidelity on the images -> per batch size: separate warm-up calls, then rounds in which every runner makes
one timed call (the order rotates each round) -> the limits again. The steady state is bounded by a time budget (or
a fixed number of rounds). The load average is recorded at start and end; a loaded run is marked as such."""

from __future__ import annotations

import datetime as dt
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.bench.flops import flops_per_image
from pvt_deploy.bench.machine import load_average, machine_info
from pvt_deploy.bench.measure import (
    LIMITS,
    RssSampler,
    gemm_limits,
    gpu_memory_used_mb,
    limit_for,
    load_record,
    nvidia_smi_query,
    process_peak_rss_mb,
    summarize,
)
from pvt_deploy.bench.runners import (
    OrtRuntimeRunner,
    OrtTensorRTRunner,
    Runner,
    TorchCompileRunner,
    TorchEagerRunner,
    cuda_device_present,
)
from pvt_deploy.errors import BenchError, RunnerUnavailable
from pvt_deploy.export.parity import flip_margin_max, top1_margins
from pvt_deploy.format.manifest import Manifest, load_manifest

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
Progress = Callable[[str], None]


@dataclass
class BenchConfig:
    model_dir: Path
    batch_sizes: Sequence[int] = (1, 8, 32)
    threads: Sequence[int] = field(default_factory=lambda: [os.cpu_count() or 1])
    precisions: Sequence[str] | None = None  # None: every precision exported (fp16 only on CUDA)
    device: str = "cpu"  # cpu, cuda (GPU variants), or auto (cuda when present)
    eager: bool = True
    compile: bool = True
    compile_timeout_s: float = 240.0
    images: Path | None = None
    warmup: int = 1
    rounds: int | None = None  # fixed number of timed rounds per batch size; None: from the budget
    min_rounds: int = 3
    max_rounds: int = 50
    budget_s: float = 360.0  # steady-state seconds for all batch sizes of one thread setting together
    micro_batch: int | None = None  # Runtime batch_size; None lets the runtime choose
    spin_wait: bool = False  # also time each CPU precision with spin-waiting pool threads (RuntimeConfig.spin_wait)
    checkpoint: Path | None = None


def _input_images(config: BenchConfig, manifest: Manifest) -> tuple[np.ndarray, str]:
    """Real photos preprocessed exactly as the runtime does, or seeded noise where none are given."""
    size = manifest.input.size
    if config.images is None:
        rng = np.random.default_rng(0)
        return rng.standard_normal((4, 3, *size), dtype=np.float32), "random normal inputs (no --images)"
    from pvt_deploy.runtime import Runtime

    folder = Path(config.images)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise BenchError(f"--images {folder}: no images found")
    runtime = Runtime(config.model_dir, device="cpu")
    return runtime.preprocess(files), f"{len(files)} images from {folder}"


def _tile(images: np.ndarray, batch: int) -> np.ndarray:
    reps = math.ceil(batch / len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def _fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, float]:
    a, b = reference["embedding"].astype(np.float64), candidate["embedding"].astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    top1_ref = reference["probabilities"].argmax(1)
    top1 = candidate["probabilities"].argmax(1)
    ordered = np.sort(reference["probabilities"], axis=1)
    # log-probabilities differ from logits by one constant per row, so their top-1 margins are the logit margins
    log_reference = np.log(np.maximum(reference["probabilities"].astype(np.float64), 1e-300))
    log_candidate = np.log(np.maximum(candidate["probabilities"].astype(np.float64), 1e-300))
    return {
        "embedding_cosine_mean": float(cosine.mean()),
        "embedding_cosine_min": float(cosine.min()),
        "probabilities_max_abs": float(np.abs(reference["probabilities"] - candidate["probabilities"]).max()),
        "top1_agreement": float((top1 == top1_ref).mean()),
        "reference_top1_margin_median": float(np.median(ordered[:, -1] - ordered[:, -2])),
        "reference_logit_margin_min": float(top1_margins(log_reference).min()),
        "flip_margin_max": flip_margin_max(log_reference, log_candidate),
    }


def _make_runners(config: BenchConfig, manifest: Manifest, threads: int, tmp: Path) -> list[Runner]:
    from pvt_deploy.export.verify import reference_model

    exported = _exported_precisions(manifest)
    wanted = list(config.precisions) if config.precisions else exported
    missing = [p for p in wanted if p not in exported]
    if missing:
        raise BenchError(f"{config.model_dir}: no {missing[0]} graphs exported (have {', '.join(exported)})")
    device = config.device
    if device == "auto":
        device = "cuda" if cuda_device_present() else "cpu"
    if device == "cuda" and not cuda_device_present():
        raise BenchError("--device cuda: no NVIDIA device / CUDA provider here")

    model, _ = reference_model(manifest, config.model_dir, config.checkpoint)
    runners: list[Runner] = []
    if config.eager:
        runners.append(TorchEagerRunner(model, threads))
    if config.compile:
        runners.append(TorchCompileRunner(model, threads, config.compile_timeout_s))
    for precision in wanted:
        if precision == "fp16" and device != "cuda":
            continue  # fp16 is the CUDA variant; ORT's CPU fp16 kernels are reference-speed only
        runners.append(OrtRuntimeRunner(config.model_dir, precision, "cpu", threads, config.micro_batch))
        if config.spin_wait and threads > 1:  # one thread has no pool to spin
            runners.append(OrtRuntimeRunner(config.model_dir, precision, "cpu", threads, config.micro_batch, True))
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            runners.append(TorchEagerRunner(model, threads, device="cuda"))
            runners.append(TorchEagerRunner(_copy_model(model), threads, device="cuda", autocast_fp16=True))
        for precision in wanted:
            if precision != "int8":
                runners.append(OrtRuntimeRunner(config.model_dir, precision, "cuda", threads, config.micro_batch))
        runners.append(OrtTensorRTRunner(config.model_dir, threads, tmp / "trt-cache"))
    return runners


def _copy_model(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def _exported_precisions(manifest: Manifest) -> list[str]:
    variants = manifest.graphs.get("classify") or {}
    return [p for p in ("fp32", "int8", "fp16") if p in variants]


def run_bench(config: BenchConfig, progress: Progress | None = None, bar: Any = None) -> dict[str, Any]:
    """Run everything; returns the JSON-ready result (``report.py`` prints and plots it)."""
    log = progress or (lambda message: None)
    manifest = load_manifest(config.model_dir)
    from pvt_deploy.model.pvt_v2 import PVT_V2_CONFIGS

    network = manifest.network
    if network not in PVT_V2_CONFIGS or manifest.num_classes is None:
        raise BenchError(f"{config.model_dir}: the manifest names no known network and class count")
    size = manifest.input.size
    num_classes = manifest.num_classes
    net_config = PVT_V2_CONFIGS[network].with_overrides(manifest.source.config)
    flops = flops_per_image(net_config, size, num_classes)
    images, images_note = _input_images(config, manifest)
    started = time.perf_counter()
    load_at_start = load_average()
    result: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": {
            "dir": str(config.model_dir),
            "name": manifest.model_name,
            "network": network,
            "size": list(size),
            "num_classes": num_classes,
            "random_weights": manifest.random_weights,
            "gflop_per_image": flops / 1e9,
            "gflop_per_image_with_attention_products": flops_per_image(
                net_config, size, num_classes, attention_products=True
            )
            / 1e9,
        },
        "settings": {
            "batch_sizes": list(config.batch_sizes),
            "threads": list(config.threads),
            "warmup_calls": config.warmup,
            "rounds": config.rounds,
            "budget_s": config.budget_s,
            "fidelity_inputs": images_note,
            "interleaved": True,
            "spin_wait_variants": config.spin_wait,
        },
        "runs": [],
        "variants": {},
        "skipped": {},
        "gemm": {},
        "limits": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for threads in config.threads:
            _bench_threads(config, manifest, threads, images, flops, result, Path(tmp), log, bar)
    result["load"] = load_record(load_at_start, load_average(), config.threads[-1])
    for row in result["runs"]:
        row["loaded"] = result["load"]["loaded"]
    result["process_peak_rss_mb"] = process_peak_rss_mb()
    result["ratios"] = _ratios(result)
    result["wall_s"] = time.perf_counter() - started
    return result


def _bench_threads(
    config: BenchConfig,
    manifest: Manifest,
    threads: int,
    images: np.ndarray,
    flops: float,
    result: dict[str, Any],
    tmp: Path,
    log: Progress,
    bar: Any,
) -> None:
    """One thread setting: GEMM limits, start every runner, time each batch size, GEMM limits again."""
    limits_before = gemm_limits(threads)
    log(
        f"[{threads} threads] limits: "
        + ", ".join(f"{name} {rate['median_gflop_per_s']:.1f} GFLOP/s" for name, rate in limits_before.items())
        + f"; load average {load_average()}"
    )
    runners = _start_runners(_make_runners(config, manifest, threads, tmp), images, threads, result, log)
    try:
        share = config.budget_s / max(1, len(config.batch_sizes))
        for batch in config.batch_sizes:
            x = _tile(images, batch)
            warm = _warm_up(runners, x, config.warmup, f"@{threads}t/batch{batch}", result)
            active = [r for r in runners if r.name in warm]
            round_cost = sum(warm.values())
            rounds = _round_count(config, share, round_cost)
            log(f"  batch {batch}: {rounds} interleaved rounds of {len(active)} variants (~{round_cost:.1f} s each)")
            if bar is not None:
                bar.reset(total=rounds * len(active))
                bar.set_description(f"{threads}t batch {batch}")
            rss = {r.name: RssSampler() for r in active}
            samples = _timed_rounds(active, x, rounds, rss, bar)
            result["runs"] += _rows(active, threads, batch, warm, samples, rss, flops)
        _record_limits(result, threads, limits_before, gemm_limits(threads))
    finally:
        for runner in runners:
            runner.close()


def _round_count(config: BenchConfig, budget_s: float, round_cost_s: float) -> int:
    """The fixed ``--rounds``, else as many rounds as fit ``budget_s`` (within min/max rounds)."""
    if config.rounds:
        return config.rounds
    return int(min(config.max_rounds, max(config.min_rounds, budget_s // max(round_cost_s, 1e-9))))


def _start_runners(
    candidates: list[Runner], images: np.ndarray, threads: int, result: dict[str, Any], log: Progress
) -> list[Runner]:
    """Cold start and first answer of each runner; fidelity against the first CPU eager answer. Skips are recorded."""
    runners: list[Runner] = []
    reference: dict[str, np.ndarray] | None = None
    for runner in candidates:
        key = f"{runner.name}@{threads}t"
        try:
            cold = runner.start(images[:1])
            answer = runner(images)
        except RunnerUnavailable as exc:
            result["skipped"][key] = str(exc)
            log(f"  skip {runner.name}: {exc}")
            runner.close()
            continue
        if reference is None and runner.engine == "pytorch-eager" and runner.device == "cpu":
            reference = answer
        result["variants"][key] = {
            **runner.describe(),
            "cold_start_s": cold,
            "fidelity": _fidelity(reference, answer) if reference is not None else None,
        }
        runners.append(runner)
        log(f"  {runner.name}: first answer after {cold:.2f} s")
    if not runners:
        raise BenchError("no variant could run")
    return runners


def _warm_up(runners: list[Runner], x: np.ndarray, calls: int, suffix: str, result: dict[str, Any]) -> dict[str, float]:
    """Untimed calls per runner, kept apart from the rounds; seconds per call of those that could run."""
    warm: dict[str, float] = {}
    for runner in runners:
        begin = time.perf_counter()
        try:
            for _ in range(max(1, calls)):
                runner(x)
        except (RunnerUnavailable, TimeoutError) as exc:  # e.g. a recompile over its time box
            result["skipped"][f"{runner.name}{suffix}"] = f"{type(exc).__name__}: {exc}"
            continue
        warm[runner.name] = (time.perf_counter() - begin) / max(1, calls)
    return warm


def _timed_rounds(
    runners: list[Runner], x: np.ndarray, rounds: int, rss: dict[str, RssSampler], bar: Any
) -> dict[str, list[float]]:
    """``rounds`` rounds of one timed call per runner, the order rotated each round so noise lands on all alike."""
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    for index in range(rounds):
        shift = index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            begin = time.perf_counter()
            runner(x)
            samples[runner.name].append(time.perf_counter() - begin)
            rss[runner.name].sample()
            if bar is not None:
                bar.update(1)
    return samples


def _rows(
    runners: list[Runner],
    threads: int,
    batch: int,
    warm: dict[str, float],
    samples: dict[str, list[float]],
    rss: dict[str, RssSampler],
    flops: float,
) -> list[dict[str, Any]]:
    """One result row per runner: latency summary, throughput, memory."""
    rows = []
    for runner in runners:
        row = {
            "variant": f"{runner.name}@{threads}t",
            **runner.describe(),
            "batch": batch,
            "warmup_ms": 1000.0 * warm[runner.name],
            **summarize(samples[runner.name], batch, flops),
            "rss_peak_mb": rss[runner.name].peak_mb,
        }
        gpu = runner.gpu_memory_mb()
        if gpu is not None:
            row["gpu_memory_mb"] = gpu
        rows.append(row)
    return rows


def _record_limits(
    result: dict[str, Any], threads: int, before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> None:
    """Each GEMM limit for ``threads`` (median of before/after) and each CPU row's share of its own limit.

    ``gemm`` keeps torch's sgemm (``gemm_fraction``: every variant against one yardstick); ``limits`` has all three,
    and ``limit`` / ``limit_fraction`` on a row name the one that bounds that variant (``measure.limit_for``)."""
    rates = {
        name: statistics.median([before[name]["median_gflop_per_s"], after[name]["median_gflop_per_s"]])
        for name in LIMITS
    }
    result["limits"][str(threads)] = {
        name: {"before": before[name], "after": after[name], "gflop_per_s": rates[name]} for name in LIMITS
    }
    torch_rate = rates["torch-sgemm"]
    result["gemm"][str(threads)] = {
        "before": before["torch-sgemm"],
        "after": after["torch-sgemm"],
        "gflop_per_s": torch_rate,
    }
    for row in result["runs"]:
        if row["threads"] != threads or row["device"] != "cpu":
            continue
        row["gemm_fraction"] = row["gflop_per_s"] / torch_rate
        limit = limit_for(row["engine"], row["precision"], row["device"])
        if limit is not None:
            row["limit"] = limit
            row["limit_gflop_per_s"] = rates[limit]
            row["limit_fraction"] = row["gflop_per_s"] / rates[limit]


def _ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Speed-up of every variant over CPU PyTorch eager at the same batch and threads (median vs median)."""
    eager = {
        (row["threads"], row["batch"]): row["p50_ms"]
        for row in result["runs"]
        if row["engine"] == "pytorch-eager" and row["device"] == "cpu"
    }
    cuda_fp16 = {
        (row["threads"], row["batch"]): row["p50_ms"]
        for row in result["runs"]
        if row["engine"] == "pytorch-eager" and row["device"] == "cuda" and row["precision"] == "fp16-autocast"
    }
    ratios: dict[str, dict[str, float]] = {}
    for row in result["runs"]:
        base = eager.get((row["threads"], row["batch"]))
        if base:
            row["speedup_vs_eager"] = base / row["p50_ms"]
            ratios.setdefault(row["variant"], {})[f"batch{row['batch']}"] = row["speedup_vs_eager"]
        gpu_base = cuda_fp16.get((row["threads"], row["batch"]))
        if gpu_base and row["device"] == "cuda":  # the CUDA target: ORT fp16 vs PyTorch fp16 autocast
            row["speedup_vs_eager_cuda_fp16"] = gpu_base / row["p50_ms"]
    return ratios


def _machine() -> dict[str, Any]:
    info = machine_info()
    if cuda_device_present():
        info["gpu_memory_used_at_start_mb"] = gpu_memory_used_mb()
        info["gpu"] = nvidia_smi_query("name")
    return info
