"""The operations every front end offers (classify, embed, features) and the rules on their outputs (top-k
ranking, L2 normalisation), written once: ``Runtime.predict``, ``serve`` and bulk jobs all use these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

OPERATIONS = ("classify", "embed", "features")
"""``classify``: probabilities + embedding (one classify-graph run); ``embed``: the embedding; ``features``:
stage1..stage4."""

Outputs = dict[str, np.ndarray]
Ranked = list[tuple[str, float]]


class Model(Protocol):
    """What ``run_operation`` calls: ``Runtime``'s inference methods (a Protocol, so this module sits below it)."""

    def classify(self, images: Any, return_embedding: bool = ...) -> Any: ...
    def embed(self, images: Any) -> Any: ...
    def features(self, images: Any) -> Any: ...


def run_operation(runtime: Model, operation: str, images: Any) -> Outputs:
    """One ``Runtime`` call (images or preprocessed rows) -> the operation's named outputs."""
    if operation == "classify":
        probabilities, embedding = runtime.classify(images, return_embedding=True)
        return {"probabilities": probabilities, "embedding": embedding}
    if operation == "embed":
        return {"embedding": runtime.embed(images)}
    if operation == "features":
        return dict(runtime.features(images))
    raise ValueError(f"unknown operation {operation!r}; expected one of {', '.join(OPERATIONS)}")


def top_k_indices(probabilities: np.ndarray, k: int) -> list[np.ndarray]:
    """Per row of (N, classes) probabilities, the class indices of the ``k`` most likely, most likely first (ties:
    lower class index first). ``k`` larger than the class count gives every class; a NaN row (a failed input)
    gives none. The one ranking rule of the package."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    return [
        np.empty(0, dtype=np.int64) if np.isnan(row).any() else np.argsort(-row, kind="stable")[:k]
        for row in np.asarray(probabilities)
    ]


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[Ranked]:
    """``top_k_indices`` as (label, probability) pairs."""
    return [
        [(labels[i], float(row[i])) for i in order]
        for row, order in zip(np.asarray(probabilities), top_k_indices(probabilities, k), strict=True)
    ]


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero, NaN rows stay NaN), float32."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.where(norms > 0, norms, 1)).astype(np.float32)
