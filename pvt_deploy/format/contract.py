"""The preprocessing contract as data: what any implementation must do to an image to feed the tensor graphs.

Written by export to ``manifest.json`` (``input.preprocess``) and to every graph's metadata (key ``preprocess``,
JSON), so a client in another language reads the rules instead of an English sentence. Torch-free: the runtime
and clients read it; ``pvt_deploy.preprocess`` is its Python implementation and the image-input graphs
(``*.image.onnx``) its ONNX one. A change to the rules bumps ``CONTRACT_VERSION``.

``PreprocessContract`` is the typed value: the few numbers that vary between models (size, rgb_stats, crop, EXIF,
input name). The document is a function of them (``to_json``); ``from_json`` reads those numbers back and refuses
a document of another contract version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pvt_deploy.format.codec import FormatError, from_json

CONTRACT_VERSION = 1
METADATA_KEY = "preprocess"

PILLOW_MODE_RULES: dict[str, str] = {
    "RGB": "unchanged",
    "RGBA, RGBa, LA, La, PA, P with a transparency entry": "drop alpha (keep the colour under it; no compositing)",
    "P": "look the palette up (Pillow convert('RGB'))",
    "L, 1": "replicate gray to R, G and B (1-bit: 0 -> 0, 1 -> 255)",
    "I;16, I;16B, I;16L, I;16N": "16-bit gray v -> round(v / 257) (round half to even), then replicate",
    "I, F": "values taken on the 0..255 scale: clip to 0..255 (F truncated), then replicate",
    "CMYK": "Pillow convert('RGB'): R = 255 - min(255, C + K) (likewise G with M, B with Y)",
    "YCbCr, LAB, HSV": "Pillow convert('RGB')",
}
"""How each Pillow mode becomes 8-bit RGB (``pvt_deploy.preprocess.to_rgb``, birder's ``convert('RGB')``)."""


def resize_contract() -> dict[str, Any]:
    """Pillow's ``Image.resize(..., BICUBIC)`` (``src/libImaging/Resample.c``) as numbers and rules."""
    return {
        "library": "Pillow Image.resize(BICUBIC), reducing_gap None",
        "kernel": "cubic",
        "a": -0.5,
        "support": 2.0,
        "antialias": True,
        "support_scaling": "support and kernel argument scale by max(in/out, 1) (the filter widens when downscaling)",
        "sampling": "output pixel o of an axis centres at (o + 0.5) * in/out; taps x in "
        "[floor(center - support + 0.5), floor(center + support + 0.5)) clipped to the image; weight "
        "k(x) = cubic((x - center + 0.5) / max(in/out, 1)); weights divided by their sum",
        "fixed_point_bits": 22,
        "coefficient_rounding": "c = trunc(k * 2^22 + 0.5) for k >= 0, trunc(k * 2^22 - 0.5) for k < 0",
        "pass_rounding": "uint8 = clip((2^21 + sum(pixel * c)) >> 22, 0, 255) after each pass",
        "pass_order": {
            "default": ["horizontal", "vertical"],
            "vertical_first_when": "(in_h - out_h) > 0 and (in_h - out_h) > 2 * (in_w - out_w)",
            "note": "Pillow 13.0's rule; Pillow releases before it always run horizontal first",
        },
        "skip_unchanged_axis": True,
        "colour_space": "decoded 8-bit RGB values as stored (no ICC conversion, no gamma, no premultiplied alpha)",
    }


def preprocess_contract(
    size: Sequence[int],
    rgb_stats: dict[str, Sequence[float]],
    center_crop: float = 1.0,
    *,
    apply_exif: bool = False,
    input_name: str = "input",
) -> dict[str, Any]:
    """The machine-readable preprocessing contract for a model of input ``size`` = (height, width)."""
    height, width = (int(v) for v in size)
    return {
        "contract_version": CONTRACT_VERSION,
        "steps": ["decode", "exif", "to_rgb", "resize", "center_crop", "to_float", "normalize", "layout"],
        "decode": {
            "pixels": "the file's stored 8-bit (or 16-bit) samples, as Pillow decodes them",
            "icc_profile": "ignored (no colour management)",
            "jpeg": "libjpeg-compatible decode (Pillow's libjpeg-turbo, default DCT, fancy upsampling)",
        },
        "exif": {
            "apply_orientation": bool(apply_exif),
            "rule": "the Orientation tag is applied first (rotate/flip) only when apply_orientation is true",
        },
        "modes": dict(PILLOW_MODE_RULES),
        "resize": {
            **resize_contract(),
            "to": [int(height / center_crop), int(width / center_crop)],
            "size_order": "height, width",
        },
        "center_crop": {
            "fraction": float(center_crop),
            "size": [height, width],
            "offset": "top = round((h - height) / 2), left = round((w - width) / 2), round half to even",
        },
        "to_float": {"dtype": "float32", "rule": "x = float32(uint8) * float32(1 / 255)"},
        "normalize": {
            "mean": [float(v) for v in rgb_stats["mean"]],
            "std": [float(v) for v in rgb_stats["std"]],
            "rule": "(x - mean[c]) / std[c] in float32, per RGB channel c",
        },
        "layout": {"input": input_name, "order": "NCHW", "channels": "RGB", "dtype": "float32"},
        "image_graphs": {
            "input": "image",
            "dtype": "uint8",
            "shape": ["height", "width", "channels"],
            "channels": "1 (gray, replicated), 3 (RGB) or 4 (RGBA: alpha dropped)",
            "refuses": "zero height or width, or another channel count: the graph fails to run (no answer)",
            "does": ["resize", "center_crop", "to_float", "normalize", "layout"],
            "caller_does": ["decode", "exif", "to_rgb"],
        },
    }


MIN_CENTER_CROP = 0.25
"""The smallest centre-crop fraction: the resize target is at most 4x the model input per side, so a manifest
cannot make every image resize to gigapixels (``center_crop: 1e-9``)."""


def check_center_crop(value: float) -> float:
    """``value`` when it is a finite number in [MIN_CENTER_CROP, 1], else ``FormatError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"center_crop must be a finite number, got {value!r}")
    if not MIN_CENTER_CROP <= value <= 1:
        raise FormatError(f"center_crop must be in [{MIN_CENTER_CROP}, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class PreprocessContract:
    """The contract of one model: the document ``preprocess_contract`` writes, as the values it is made from."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: float = 1.0
    apply_exif: bool = False
    input_name: str = "input"
    version: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        check_center_crop(self.center_crop)
        if self.version != CONTRACT_VERSION:
            raise FormatError(f"contract_version {self.version} is not supported (expected {CONTRACT_VERSION})")

    def to_json(self) -> dict[str, Any]:
        return preprocess_contract(
            self.size,
            {"mean": self.mean, "std": self.std},
            self.center_crop,
            apply_exif=self.apply_exif,
            input_name=self.input_name,
        )

    @classmethod
    def from_json(cls, document: Any, where: str = "preprocess") -> PreprocessContract:
        """The values of a contract document; ``FormatError`` naming ``where`` when one is missing or malformed."""
        if not isinstance(document, dict):
            raise FormatError(f"'{where}' must be the preprocessing contract object")
        version = document.get("contract_version")
        if type(version) is not int or version != CONTRACT_VERSION:
            raise FormatError(f"'{where}.contract_version' must be {CONTRACT_VERSION}, got {version!r}")

        def part(section: str, key: str) -> Any:
            value = document.get(section)
            if not isinstance(value, dict) or key not in value:
                raise FormatError(f"'{where}.{section}' has no {key!r}")
            return value[key]

        values = {
            "size": from_json(tuple[int, int], part("center_crop", "size"), f"{where}.center_crop.size"),
            "mean": from_json(tuple[float, float, float], part("normalize", "mean"), f"{where}.normalize.mean"),
            "std": from_json(tuple[float, float, float], part("normalize", "std"), f"{where}.normalize.std"),
            "center_crop": from_json(float, part("center_crop", "fraction"), f"{where}.center_crop.fraction"),
            "apply_exif": from_json(bool, part("exif", "apply_orientation"), f"{where}.exif.apply_orientation"),
            "input_name": from_json(str, part("layout", "input"), f"{where}.layout.input"),
        }
        try:
            return cls(**values, version=version)
        except FormatError as exc:
            raise FormatError(f"'{where}': {exc}") from None
