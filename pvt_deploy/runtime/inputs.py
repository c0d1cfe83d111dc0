"""Turning whatever the caller passes into per-item (3, H, W) float32 model inputs, one item at a time, so that
one bad image is one per-item ``ImageError`` and never stops or shifts the others."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import apply_exif_orientation, load_image, resize_and_crop, to_array, to_rgb

_SINGLE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)


@dataclass(frozen=True)
class PreprocessSpec:
    """The model's own preprocessing, read from its manifest / graph metadata."""

    size: tuple[int, int]
    rgb_stats: dict[str, list[float]]
    center_crop: float = 1.0
    apply_exif: bool = False
    dynamic_size: bool = False


def describe(item: Any) -> str:
    """A short name for an input, used in per-item errors and CLI output."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item) if isinstance(os.fspath(item), str) else repr(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    if isinstance(item, Image.Image):
        return f"<PIL image {item.width}x{item.height} {item.mode}>"
    if isinstance(item, np.ndarray):
        return f"<array {item.shape} {item.dtype}>"
    name = getattr(item, "name", None)
    if isinstance(name, str):
        return name
    return f"<{type(item).__name__}>"


def _is_single(images: Any) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return isinstance(images, _SINGLE_TYPES) or hasattr(images, "read")


def iter_items(images: Any) -> Iterator[Any]:
    """One image or many -> items. A 4-D array is a batch: one item per row (NCHW float32 preprocessed rows, or
    NHWC uint8 images). Iterables are consumed lazily, so a generator of a million paths stays cheap."""
    if _is_single(images):
        yield images
        return
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            yield images  # rejected with a clear message by prepare()
            return
        yield from images  # rows keep their dtype; prepare() validates each
        return
    if isinstance(images, dict) or not isinstance(images, Iterable):
        raise ImageError(f"unsupported images argument of type {type(images).__name__}")
    for item in images:
        if isinstance(item, np.ndarray) and item.ndim == 4 and item.shape[0] == 1:
            item = item[0]
        yield item


def validate_preprocessed(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A caller's already-preprocessed (3, H, W) row: float32, the model's size, finite."""
    if array.dtype != np.float32:
        raise ImageError(f"preprocessed input must be float32, got {array.dtype} (cast with .astype(np.float32))")
    if array.ndim != 3 or array.shape[0] != 3:
        raise ImageError(f"preprocessed input must be NCHW with 3 channels, got a row of shape {array.shape}")
    height, width = array.shape[1:]
    if spec.dynamic_size:
        if height % 32 or width % 32 or height < 32 or width < 32:
            raise ImageError(f"preprocessed input size {height}x{width} must be a positive multiple of 32")
    elif (height, width) != spec.size:
        raise ImageError(f"preprocessed input is {height}x{width}, this model takes {spec.size[0]}x{spec.size[1]}")
    if not np.isfinite(array).all():
        raise ImageError("preprocessed input contains NaN or infinite values")
    return array


def prepare(item: Any, spec: PreprocessSpec) -> np.ndarray:
    """One item -> (3, H, W) float32, or ``ImageError`` naming what is wrong with it."""
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8:
            if item.ndim == 3 and item.shape[2] != 3 or item.ndim not in (2, 3):
                raise ImageError(f"uint8 array images must be HxWx3 (or HxW gray), got shape {item.shape}")
        elif np.issubdtype(item.dtype, np.floating):
            if item.ndim != 3:
                raise ImageError(f"preprocessed input must be NCHW float32, got shape {item.shape}")
            return validate_preprocessed(item, spec)
        else:
            raise ImageError(
                f"array inputs must be uint8 HxWx3 images or float32 NCHW preprocessed tensors, got {item.dtype}"
            )
    elif not (isinstance(item, _SINGLE_TYPES) or hasattr(item, "read")):
        raise ImageError(f"unsupported image input of type {type(item).__name__}")
    try:
        image = load_image(item)
        if spec.apply_exif:
            image = apply_exif_orientation(image)
        image = to_rgb(image)
        return to_array(resize_and_crop(image, spec.size, spec.center_crop), spec.rgb_stats)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, io.UnsupportedOperation) as exc:
        # lazily decoded PIL images passed in by the caller can fail here (truncated data, closed file)
        raise ImageError(f"cannot decode image ({str(exc).strip() or type(exc).__name__})") from None
