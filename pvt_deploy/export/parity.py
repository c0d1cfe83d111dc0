"""Compare onnxruntime outputs with PyTorch's and judge them against ``PARITY_THRESHOLDS``.

Thresholds are keyed ``<kind>_<metric>``: kind is an output name (``probabilities``, ``logits``, ``embedding``)
or ``features`` for stage1..stage4; metric ``max_abs`` and ``*_max`` metrics (``flip_margin_max``) are upper
bounds, ``cosine_min``/``cosine_mean`` lower bounds. The rule is generic: a new key needs no code change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEEP_CLASS_MARGIN = 0.5
"""Logits: wherever the fp32 top-1 leads the runner-up by at least this much, a variant must keep the top-1."""

MARGIN_BUCKETS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)
"""Edges of the fp32-margin buckets that fidelity is reported by (logits)."""

PARITY_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {
        "probabilities_max_abs": 1e-5,
        "logits_max_abs": 1e-4,
        "features_max_abs": 1e-4,
        "embedding_cosine_min": 0.99999,
    },
    "int8": {
        "embedding_cosine_mean": 0.999,
        "embedding_cosine_min": 0.995,
        "features_cosine_min": 0.99,
        # a class may change only where fp32 itself nearly tied: the largest fp32 top-1 margin among the samples
        # whose top-1 changed must stay under 0.5 logit (docs/speed.md, "An int8 that keeps the class")
        "logits_flip_margin_max": KEEP_CLASS_MARGIN,
    },
    "fp16": {"embedding_cosine_min": 0.9999, "features_cosine_min": 0.9999},
}
"""Limits per precision, checked by ``export`` and ``verify`` against the PyTorch fp32 model."""


def output_kind(name: str) -> str:
    """``stage3`` -> ``features``; other output names are their own kind."""
    return "features" if name.startswith("stage") else name


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample's flattened output (float64 so the measure itself adds no error)."""
    a64 = a.reshape(a.shape[0], -1).astype(np.float64)
    b64 = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    return np.where(denom > 0, dots / np.maximum(denom, 1e-300), np.where(np.abs(a64 - b64).max(axis=1) == 0, 1, 0))


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Fraction of samples whose top-k class sets (top-1: the argmax) are the same."""
    k = min(k, reference.shape[1])
    ref = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    got = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    same = [set(r) == set(g) for r, g in zip(ref.tolist(), got.tolist(), strict=True)]
    return float(np.mean(same))


def top1_margins(logits: np.ndarray) -> np.ndarray:
    """Per sample: top-1 logit minus the runner-up (float64; 0 for a tie or a single class)."""
    if logits.shape[1] < 2:
        return np.zeros(len(logits))
    ordered = np.sort(logits.astype(np.float64), axis=1)
    return ordered[:, -1] - ordered[:, -2]


def flip_margin_max(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The largest fp32 top-1 margin among the samples whose top-1 the candidate changed (0 when none changed):
    a class change is harmless only where the reference itself nearly tied."""
    flipped = reference.argmax(1) != candidate.argmax(1)
    return float(top1_margins(reference)[flipped].max()) if flipped.any() else 0.0


def margin_buckets(
    reference: np.ndarray, candidate: np.ndarray, edges: tuple[float, ...] = MARGIN_BUCKETS
) -> list[dict[str, float]]:
    """Top-1 agreement and |delta logit| percentiles by bucket of the reference's top-1 margin (logits rows)."""
    margins = top1_margins(reference)
    same = reference.argmax(1) == candidate.argmax(1)
    delta = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (margins >= low) & (margins < high)
        count = int(inside.sum())
        row: dict[str, float] = {"margin_from": low, "margin_to": high, "samples": count}
        if count:
            row["top1_agreement"] = float(same[inside].mean())
            row["flips"] = int((~same[inside]).sum())
            for q in (50, 90, 99):
                row[f"delta_logit_p{q}"] = float(np.percentile(delta[inside], q))
            row["delta_logit_max"] = float(delta[inside].max())
        rows.append(row)
    return rows


def output_metrics(name: str, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max abs difference and cosine (min and mean over samples); top-1/top-5 agreement for class scores."""
    if reference.shape != candidate.shape:
        raise ValueError(f"{name}: onnxruntime shape {candidate.shape} != PyTorch shape {reference.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    cosine = cosine_per_sample(reference, candidate)
    metrics = {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }
    if name in ("probabilities", "logits"):
        metrics["top1_agreement"] = topk_agreement(reference, candidate, 1)
        metrics["top5_agreement"] = topk_agreement(reference, candidate, 5)
    if name == "logits":
        metrics["flip_margin_max"] = flip_margin_max(reference, candidate)
        metrics["top1_margin_min"] = float(top1_margins(reference).min()) if len(reference) else 0.0
    return metrics


def is_upper_bound(metric: str) -> bool:
    """``max_abs`` and ``*_max`` metrics are limits from above; the others (cosines, agreements) from below."""
    return metric == "max_abs" or metric.endswith("_max")


def merge_metrics(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Combine two measurements of one output as the worse of each (agreements and means: the lower)."""
    merged = dict(a)
    for key, value in b.items():
        if key not in merged:
            merged[key] = value
        elif is_upper_bound(key):
            merged[key] = max(merged[key], value)
        else:
            merged[key] = min(merged[key], value)
    return merged


@dataclass
class ThresholdCheck:
    key: str
    limit: float
    value: float
    passed: bool


@dataclass
class GraphParity:
    """Metrics per output of one graph at one precision, and the threshold checks they were held to."""

    graph: str
    precision: str
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[ThresholdCheck] = field(default_factory=list)
    runs: list[list[int]] = field(default_factory=list)  # [batch, height, width] of each compared run

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def add(self, name: str, metrics: dict[str, float]) -> None:
        previous = self.outputs.get(name)
        self.outputs[name] = metrics if previous is None else merge_metrics(previous, metrics)

    def judge(self, thresholds: dict[str, dict[str, float]] | None = None) -> GraphParity:
        """Check every applicable threshold of this precision; features are judged on their worst stage."""
        table = (thresholds or PARITY_THRESHOLDS).get(self.precision, {})
        kinds: dict[str, dict[str, float]] = {}
        for name, metrics in self.outputs.items():
            kind = output_kind(name)
            kinds[kind] = metrics if kind not in kinds else merge_metrics(kinds[kind], metrics)
        self.checks = []
        for key, limit in table.items():
            kind, _, metric = key.partition("_")
            if kind not in kinds or metric not in kinds[kind]:
                continue
            value = kinds[kind][metric]
            passed = value <= limit if is_upper_bound(metric) else value >= limit
            self.checks.append(ThresholdCheck(key, limit, value, bool(passed)))
        return self

    def failures(self) -> list[str]:
        failed = [c for c in self.checks if not c.passed]
        return [f"{self.graph}/{self.precision} {c.key} = {c.value:.3g} (limit {c.limit:g})" for c in failed]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "outputs": self.outputs,
            "checks": {c.key: {"value": c.value, "limit": c.limit, "passed": c.passed} for c in self.checks},
            "runs": self.runs,
        }
