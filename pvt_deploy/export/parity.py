"""Compare onnxruntime outputs with PyTorch's and judge them against ``PARITY_THRESHOLDS``.

Thresholds are keyed ``<kind>_<metric>``: kind is an output name (``probabilities``, ``logits``, ``embedding``)
or ``features`` for stage1..stage4; metric ``max_abs`` is an upper bound, ``cosine_min``/``cosine_mean`` lower
bounds. The rule is generic: a new key needs no code change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PARITY_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {
        "probabilities_max_abs": 1e-5,
        "logits_max_abs": 1e-4,
        "features_max_abs": 1e-4,
        "embedding_cosine_min": 0.99999,
    },
    "int8": {"embedding_cosine_mean": 0.999, "embedding_cosine_min": 0.995, "features_cosine_min": 0.99},
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
    return metrics


def merge_metrics(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Combine two measurements of one output as the worse of each (agreements and means: the lower)."""
    merged = dict(a)
    for key, value in b.items():
        if key not in merged:
            merged[key] = value
        elif key == "max_abs":
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
            passed = value <= limit if metric == "max_abs" else value >= limit
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
