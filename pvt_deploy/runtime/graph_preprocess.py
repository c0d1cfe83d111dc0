"""The input side of ``Runtime(..., preprocess="graph")``: one image -> the uint8 pixels the image-input graphs
(``<graph>.image.onnx``) take.

Python decodes, applies the EXIF rule and maps Pillow modes to gray, RGB or RGBA pixels (what the contract leaves
to the caller); the resize, crop and normalisation run inside ONNX, exactly as a client in another language runs
them. The limits are the Python path's (``Preprocessor``: file bytes, pixels, decoded size), checked before any
graph runs. ``Runtime._run`` runs the rows like any other: same graph checks, same per-item errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import (
    DECODED_BYTES_PER_PIXEL_LIMIT,
    Preprocessor,
    apply_exif_orientation,
    describe,
    load_image,
    to_rgb,
)

COEFFICIENT_BYTES = 8
"""The image graphs build their resize weights as float64 [in, out] matrices, one per axis."""


def image_pixels(image: Image.Image, *, apply_exif: bool) -> np.ndarray:
    """Pillow image -> uint8 [H, W, 1|3|4] as the image graphs take it (alpha and gray handled in the graph)."""
    if apply_exif:
        image = apply_exif_orientation(image)
    if image.mode == "RGBA":
        return np.asarray(image, dtype=np.uint8)
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)[:, :, None]
    return np.asarray(to_rgb(image), dtype=np.uint8)


@dataclass(frozen=True)
class ImagePixels:
    """One input -> uint8 [H, W, C] under ``preprocessor``'s limits and EXIF rule; ``ImageError`` otherwise."""

    preprocessor: Preprocessor

    def __call__(self, item: Any) -> np.ndarray:
        if isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating):
            raise ImageError("preprocess='graph' takes images, not preprocessed float tensors")
        spec = self.preprocessor
        image = load_image(item, max_pixels=spec.max_pixels, max_file_bytes=spec.max_file_bytes)
        self.check_resize_weights(image.height, image.width, describe(item))
        try:
            return image_pixels(image, apply_exif=spec.apply_exif)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"cannot decode image ({str(exc).strip() or type(exc).__name__})") from None

    def check_resize_weights(self, height: int, width: int, name: str) -> None:
        """The graph's resize weights grow with each side, not with the pixel count: a 1 x 89,000,000 image has
        few pixels but would need a [89000000, 384] float64 matrix. They get the per-image decoded-memory bound."""
        spec = self.preprocessor
        if spec.max_pixels is None:
            return
        base_h, base_w = (int(side / spec.center_crop) for side in spec.size)
        needed = (height * base_h + width * base_w) * COEFFICIENT_BYTES
        limit = spec.max_pixels * DECODED_BYTES_PER_PIXEL_LIMIT
        if needed > limit:
            raise ImageError(
                f"{name}: {width}x{height} needs {needed} bytes of resize weights in the image graph, over the "
                f"limit of {limit}"
            )
