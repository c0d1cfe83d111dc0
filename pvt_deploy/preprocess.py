"""birder's inference preprocessing in numpy + Pillow (no torch), so the runtime feeds ONNX the tensor birder feeds
PyTorch.

birder 0.8.4's ``inference_preset(size, rgb_stats, center_crop)`` (``birder/data/transforms/classification.py``)
on a PIL image is, step by step::

    base = (int(H / center_crop), int(W / center_crop))
    v2.Resize(base, BICUBIC, antialias=True)  -> PIL image.resize((base_w, base_h), BICUBIC); skipped if same size
    v2.CenterCrop((H, W))                     -> crop at (round((h - H) / 2), round((w - W) / 2)); zero-pad if smaller
    v2.PILToTensor()                          -> uint8 CHW
    v2.ToDtype(float32, scale=True)           -> x.float() * float32(1 / 255)
    v2.Normalize(mean, std)                   -> (x - mean) / std, in float32

(torchvision always antialiases PIL resizes; Pillow's BICUBIC is a separable a=-0.5 cubic whose support widens
when downscaling.) This module repeats those steps with the same rounding, so results agree with birder to float32
rounding (tests/golden: max abs difference 0 on the real photos).

Colour modes (``to_rgb``): birder's PIL loader is ``Image.open(path).convert("RGB")`` and its default torchvision
loader decodes in RGB mode; both drop an alpha channel without compositing. We match that by default:

* RGB: unchanged.
* 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow's ``convert("RGB")`` (gray is replicated; CMYK uses Pillow's naive
  ``255 - (c + k)`` formula; a palette is looked up).
* RGBA, RGBa, LA, La, PA, and P with a transparency entry: alpha is DROPPED (the colour under it is kept, as
  birder does). Pass ``background=(r, g, b)`` to composite onto a colour instead.
* I;16, I;16B, I;16L, I;16N (16-bit gray): scaled to the full 8-bit range (``round(v / 257)``), as torchvision's
  16-bit PNG decoder + ``ToDtype(scale=True)`` do; Pillow's own convert would clip everything above 255 to white.
* I (32-bit int) and F (float): values are taken to be on the 0..255 scale already: Pillow's ``convert("RGB")``
  (clipped to 0..255; F is truncated).

EXIF orientation is NOT applied by default (birder does not); ``apply_exif=True`` applies it before everything else.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pvt_deploy.errors import ImageError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray

MAX_PIXELS = 89_478_485
"""Pillow's default decompression-bomb limit (~ 0.25 GB of RGBA): larger images are refused with ``ImageError``."""

INTERPOLATION = "bicubic"
RESIZE_RULE = (
    "PIL Image.resize((int(W/center_crop), int(H/center_crop)), BICUBIC), then center crop to (H, W) at "
    "round((h-H)/2), round((w-W)/2); RGB by convert('RGB') with alpha dropped; x/255; (x-mean)/std; float32 NCHW"
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def resize_spec(center_crop: float = 1.0) -> dict[str, Any]:
    """The preprocessing description stored in exported metadata (``MetadataKey.RESIZE``)."""
    return {"interpolation": INTERPOLATION, "center_crop": float(center_crop), "rule": RESIZE_RULE}


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"array images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageError(f"array images must be HxW, HxWx1, HxWx3 or HxWx4 uint8, got shape {array.shape}")


def _warning_filter(action: str, category: type[Warning]) -> contextlib.AbstractContextManager:
    """A scoped warnings filter, in the main thread only.

    ``warnings.catch_warnings`` swaps process-wide state and is not thread-safe before Python 3.14; worker threads
    (the runtime decodes in a pool) skip it. Nothing depends on it for correctness: ``max_pixels`` is checked
    explicitly, and Pillow raises ``DecompressionBombError`` itself above twice its limit."""
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    manager = warnings.catch_warnings()

    @contextlib.contextmanager
    def scoped():
        with manager:
            warnings.simplefilter(action, category)
            yield

    return scoped()


def _decode(handle: IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode, so truncation and bombs surface here as ``ImageError`` and not later."""
    with _warning_filter("error", Image.DecompressionBombWarning):
        try:
            image = Image.open(handle)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageError(
                    f"{name}: {image.width}x{image.height} = {image.width * image.height} pixels exceeds the "
                    f"limit of {max_pixels} (possible decompression bomb)"
                )
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: refused as a possible decompression bomb ({exc})") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image (unknown or unsupported format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc).strip() or type(exc).__name__
            if "truncated" in reason.lower():
                raise ImageError(f"{name}: truncated image ({reason})") from None
            raise ImageError(f"{name}: cannot decode image ({reason})") from None
    return image


def load_image(source: ImageSource, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Decode one image from a path, bytes, a binary file object, a PIL image or a uint8 array.

    The image keeps its own mode (see ``to_rgb``); every failure is one ``ImageError`` line naming the input."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{path}: no such file")
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, expected an image file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not data:
            raise ImageError(f"{path}: empty file (0 bytes)")
        return _decode(io.BytesIO(data), name, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty image data (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), name, max_pixels)
    if hasattr(source, "read"):
        try:
            data = source.read()  # read fully: works for pipes and sockets too, and closes nothing of the caller's
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({exc})") from None
        if not data:
            raise ImageError(f"{name}: empty image data (0 bytes)")
        return _decode(io.BytesIO(data), name, max_pixels)
    raise ImageError(f"unsupported image input type {type(source).__name__}")


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag (opt-in: birder does not do this)."""
    return ImageOps.exif_transpose(image) or image


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB by the rule in the module docstring (birder's, by default).

    ``background``: composite images with alpha onto this colour instead of dropping the alpha channel."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if background is not None:
        has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info)
        if has_alpha:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return image
    # Pillow warns that palette transparency "should be converted to RGBA"; dropping it is the rule here
    with _warning_filter("ignore", UserWarning):
        return image.convert("RGB")


def _normalize_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(v) for v in size)
    return height, width


def resize_and_crop(image: Image.Image, size: int | Sequence[int], center_crop: float = 1.0) -> Image.Image:
    """birder's ``Resize(int(size / center_crop), BICUBIC)`` + ``CenterCrop(size)`` on a PIL image."""
    height, width = _normalize_size(size)
    if center_crop <= 0:
        raise ValueError(f"center_crop must be > 0, got {center_crop}")
    base_h, base_w = int(height / center_crop), int(width / center_crop)
    if (image.height, image.width) != (base_h, base_w):
        image = image.resize((base_w, base_h), resample=Image.Resampling.BICUBIC)
    if (image.height, image.width) == (height, width):
        return image
    if height > image.height or width > image.width:  # only when center_crop > 1: torchvision pads with zeros
        pad_left = (width - image.width) // 2 if width > image.width else 0
        pad_top = (height - image.height) // 2 if height > image.height else 0
        canvas = Image.new(image.mode, (max(width, image.width), max(height, image.height)), 0)
        canvas.paste(image, (pad_left, pad_top))
        image = canvas
        if (image.height, image.width) == (height, width):
            return image
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def to_array(image: Image.Image, rgb_stats: dict[str, Sequence[float]]) -> np.ndarray:
    """uint8 RGB image -> normalised float32 CHW, in birder's operation order (scale by 1/255, subtract, divide)."""
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError(f"expected an RGB image, got array shape {pixels.shape}")
    chw = pixels.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(rgb_stats["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(rgb_stats["std"], dtype=np.float32).reshape(3, 1, 1)
    return (chw - mean) / std


def preprocess_one(
    source: ImageSource,
    size: int | Sequence[int],
    rgb_stats: dict[str, Sequence[float]],
    *,
    center_crop: float = 1.0,
    apply_exif: bool = False,
    background: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """One image -> (3, H, W) float32."""
    image = load_image(source)
    if apply_exif:
        image = apply_exif_orientation(image)
    image = to_rgb(image, background=background)
    return to_array(resize_and_crop(image, size, center_crop), rgb_stats)


def _is_single(images: Any) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or hasattr(images, "read")


def preprocess(
    images: ImageSource | Iterable[ImageSource],
    size: int | Sequence[int],
    rgb_stats: dict[str, Sequence[float]],
    *,
    center_crop: float = 1.0,
    apply_exif: bool = False,
    background: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """One image or many -> (N, 3, H, W) float32, exactly birder's ``inference_preset`` for PIL inputs.

    ``size`` is (H, W) or an int; a 4-D uint8 array is taken as a batch of HxWxC images."""
    items = [images] if _is_single(images) else list(images)  # type: ignore[arg-type]
    if not items:
        raise ImageError("no images given")
    height, width = _normalize_size(size)
    batch = np.empty((len(items), 3, height, width), dtype=np.float32)
    for index, item in enumerate(items):
        batch[index] = preprocess_one(
            item, (height, width), rgb_stats, center_crop=center_crop, apply_exif=apply_exif, background=background
        )
    return batch


__all__ = [
    "MAX_PIXELS",
    "RESIZE_RULE",
    "apply_exif_orientation",
    "load_image",
    "preprocess",
    "preprocess_one",
    "resize_and_crop",
    "resize_spec",
    "to_array",
    "to_rgb",
]
