"""Interleaved A/B of onnxruntime session settings and int8 variants on one exported classify graph (issue 13).

Every variant is an onnxruntime session on the same machine in the same process; each round makes one timed call per
variant in a rotating order, so load from other processes lands on all of them alike. Reported: median, min and max
per variant, and each variant's median ratio to the baseline with the spread of the per-round ratios (min-max).

Two call patterns:
- ``run``: ``session.run`` on a preprocessed batch (what a bulk job does between batches);
- ``decode+run``: decode and preprocess one photo, then ``session.run`` (what a server does per request). Spin-waiting
  pool threads keep a core busy after ``run`` returns, which competes with the decode that follows.

fp32 variants are checked against the baseline's logits (max abs); int8 variants report logits cosine vs fp32.

Usage: python benchmarks/ort_session_ab.py EXPORT_DIR --threads 2 --rounds 12 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pvt_deploy.bench.machine import cpu_line, machine_info
from pvt_deploy.format.manifest import Manifest, load_manifest
from pvt_deploy.runtime import Runtime
from pvt_deploy.runtime.sessions import session_options

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data" / "photos"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _options(threads: int, spin: bool = True, **config: str) -> ort.SessionOptions:
    """onnxruntime's own defaults (spinning pool threads) plus ``config`` entries."""
    options = session_options(threads, allow_spinning=spin)
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return options


def _session(path: Path, options: ort.SessionOptions, disabled: list[str] | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or []
    )


def _variants(model_dir: Path, manifest: Manifest, threads: int, static_int8: Path | None) -> dict[str, Any]:
    graphs = manifest.graphs["classify"]
    fp32 = model_dir / graphs["fp32"].file
    parallel = session_options(1, allow_spinning=True)
    parallel.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    parallel.inter_op_num_threads = threads
    variants: dict[str, Any] = {
        "fp32 default": _session(fp32, _options(threads)),
        "fp32 no-spin": _session(fp32, _options(threads, spin=False)),
        "fp32 no-NCHWc": _session(fp32, _options(threads), disabled=["NchwcTransformer"]),
        "fp32 dynamic_block_base=4": _session(fp32, _options(threads, **{"session.dynamic_block_base": "4"})),
        f"fp32 intra 1 / inter {threads} parallel": _session(fp32, parallel),
    }
    if "int8" in graphs:
        int8 = model_dir / graphs["int8"].file
        variants["int8 dynamic (row by row)"] = _session(int8, _options(threads))
        variants["int8 dynamic no-spin"] = _session(int8, _options(threads, spin=False))
    if static_int8 is not None:
        variants["int8 static QDQ"] = _session(static_int8, _options(threads))
    return variants


def _static_int8(model_dir: Path, manifest: Manifest, batch: np.ndarray, out: Path) -> Path:
    """The static QDQ variant of classify, calibrated on the photos (made once, reused from ``out``)."""
    from pvt_deploy.export.precision import make_variant

    if not out.exists():
        fp32 = model_dir / manifest.entry("classify").file
        make_variant(fp32, "int8", out, calibration_batches=[batch[i : i + 1] for i in range(len(batch))])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--static-int8", type=Path, default=None, help="where to make/reuse a static QDQ int8 graph")
    parser.add_argument("--patterns", default="run,decode+run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    manifest = load_manifest(args.model_dir)
    runtime = Runtime(args.model_dir, device="cpu")
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    batch = runtime.preprocess(photos)
    static = _static_int8(args.model_dir, manifest, batch, args.static_int8) if args.static_int8 else None
    variants = _variants(args.model_dir, manifest, args.threads, static)
    input_name = next(iter(variants.values())).get_inputs()[0].name
    output_names = [o.name for o in variants["fp32 default"].get_outputs()]
    logits_name = "logits" if "logits" in output_names else output_names[0]

    def logits(session: ort.InferenceSession) -> np.ndarray:
        return np.concatenate(
            [session.run([logits_name], {input_name: batch[i : i + 1]})[0] for i in range(len(batch))]
        )

    reference = logits(variants["fp32 default"])
    fidelity: dict[str, dict[str, float]] = {}
    for name, session in variants.items():
        answer = logits(session)
        cosine = (answer * reference).sum(1) / (np.linalg.norm(answer, axis=1) * np.linalg.norm(reference, axis=1))
        fidelity[name] = {
            "logits_max_abs_vs_fp32": float(np.abs(answer - reference).max()),
            "logits_cosine_min_vs_fp32": float(cosine.min()),
        }

    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    one = batch[:1]
    calls: dict[str, Callable[[ort.InferenceSession, int], Any]] = {
        "run": lambda session, i: session.run(None, {input_name: one}),
        "decode+run": lambda session, i: session.run(None, {input_name: runtime.preprocess([photos[i % len(photos)]])}),
    }
    names = list(variants)
    samples = {(p, n): [] for p in patterns for n in names}
    for session in variants.values():  # warm-up, kept apart
        session.run(None, {input_name: one})
    for index in range(args.rounds):
        shift = index % len(names)
        for pattern in patterns:
            for name in names[shift:] + names[:shift]:
                call, session = calls[pattern], variants[name]
                begin = time.perf_counter()
                call(session, index)
                samples[(pattern, name)].append(time.perf_counter() - begin)
        print(f"round {index + 1}/{args.rounds}", flush=True)

    rows = []
    for pattern in patterns:
        base = samples[(pattern, names[0])]
        for name in names:
            times = samples[(pattern, name)]
            per_round = [b / t for b, t in zip(base, times, strict=True)]
            rows.append(
                {
                    "pattern": pattern,
                    "variant": name,
                    "median_ms": 1000 * statistics.median(times),
                    "min_ms": 1000 * min(times),
                    "max_ms": 1000 * max(times),
                    "speedup_vs_default_median": statistics.median(base) / statistics.median(times),
                    "speedup_per_round_min": min(per_round),
                    "speedup_per_round_max": max(per_round),
                    **fidelity[name],
                }
            )
    machine = machine_info()
    result = {
        "machine": machine,
        "model_dir": str(args.model_dir),
        "threads": args.threads,
        "rounds": args.rounds,
        "batch": 1,
        "interleaved": True,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(cpu_line(machine))
    for row in rows:
        print(
            f"{row['pattern']:>10}  {row['variant']:<28} {row['median_ms']:8.1f} ms "
            f"[{row['min_ms']:.0f}-{row['max_ms']:.0f}]  x{row['speedup_vs_default_median']:.2f} "
            f"(rounds {row['speedup_per_round_min']:.2f}-{row['speedup_per_round_max']:.2f})  "
            f"max abs {row['logits_max_abs_vs_fp32']:.1e} cos min {row['logits_cosine_min_vs_fp32']:.6f}"
        )


if __name__ == "__main__":
    main()
