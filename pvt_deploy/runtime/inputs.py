"""The runtime's view of its inputs: the one pipeline in ``pvt_deploy.preprocess`` (``Preprocessor``), so the
runtime, ``verify``, int8 calibration and bench feed the graphs the same tensors. One bad image is one per-item
``ImageError`` and never stops or shifts the others."""

from __future__ import annotations

from typing import Any

import numpy as np

from pvt_deploy.preprocess import Preprocessor, describe, iter_items

PreprocessSpec = Preprocessor
"""The model's own preprocessing, read from its manifest (older name of ``Preprocessor``)."""


def prepare(item: Any, spec: Preprocessor) -> np.ndarray:
    """One item -> (3, H, W) float32, or ``ImageError`` naming what is wrong with it."""
    return spec(item)


def validate_preprocessed(array: np.ndarray, spec: Preprocessor) -> np.ndarray:
    return spec.validate_preprocessed(array)


__all__ = ["PreprocessSpec", "Preprocessor", "describe", "iter_items", "prepare", "validate_preprocessed"]
