"""Precision variants (int8, fp16) and the fp32 graph optimizations, applied to an already exported graph.

Owned by the speed work. ``export`` calls these; ``verify`` reads ``PARITY_THRESHOLDS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# Thresholds per precision, checked by `pvt-deploy verify` against the PyTorch fp32 model.
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


def optimize_fp32(model_path: Path, out_path: Path) -> dict[str, Any]:
    """Rewrite a simplified fp32 graph into its fastest parity-preserving form; returns what was done."""
    raise NotImplementedError


def make_variant(
    fp32_path: Path,
    precision: str,
    out_path: Path,
    *,
    calibration_batches: Iterable[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Write the ``precision`` variant of one fp32 graph to ``out_path``; returns a description for the manifest."""
    raise NotImplementedError
