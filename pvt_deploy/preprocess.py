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
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pvt_deploy.errors import ImageError
from pvt_deploy.format.codec import to_json
from pvt_deploy.format.manifest import ResizeRule

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image | np.ndarray

MAX_PIXELS = 89_478_485
"""Pillow's default decompression-bomb limit (~ 0.25 GB of RGBA): larger images are refused with ``ImageError``."""

DECODED_BYTES_PER_PIXEL_LIMIT = 4
"""The per-image decoded-memory bound is ``max_pixels`` times this: the pixel limit at 4 bytes per pixel."""

MAX_FILE_BYTES = 64 * 1024 * 1024
"""Largest encoded image read (64 MiB; a 50-megapixel JPEG is ~25 MB). Checked before reading; configurable
(``Runtime(max_image_bytes=...)``, ``Preprocessor.max_file_bytes``), ``None`` for no limit."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
"""File name endings treated as images when a folder is walked (compare lower-cased); the one list."""

BIRDER_RGB_STATS: dict[str, list[float]] = {"mean": [0.5191, 0.5306, 0.4877], "std": [0.2316, 0.2304, 0.2588]}
"""birder's default ``rgb_stats`` ("birder" mode), which its published checkpoints carry."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """A file name with one of ``IMAGE_EXTENSIONS`` (the name only: the file is not opened)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


INTERPOLATION = "bicubic"
RESIZE_RULE = (
    "PIL Image.resize((int(W/center_crop), int(H/center_crop)), BICUBIC), then center crop to (H, W) at "
    "round((h-H)/2), round((w-W)/2); RGB by convert('RGB') with alpha dropped; x/255; (x-mean)/std; float32 NCHW"
)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def resize_spec(center_crop: float = 1.0) -> dict[str, Any]:
    """The preprocessing description stored in the manifest and graph metadata (``MetadataKey.RESIZE``), in the
    one resize-rule type, ``manifest.ResizeRule``."""
    return to_json(ResizeRule(interpolation=INTERPOLATION, center_crop=float(center_crop), rule=RESIZE_RULE))


def describe(item: Any) -> str:
    """A short name for an input, used in per-item errors and CLI output."""
    if isinstance(item, (str, os.PathLike)):
        name = os.fspath(item)
        return name if isinstance(name, str) else repr(name)
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


_describe = describe


_STORED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
"""Bytes per pixel Pillow allocates for a decoded image of each mode; every other mode (RGB, RGBA, LA, I, F, CMYK,
YCbCr...) takes 4."""


def stored_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel of Pillow's in-memory image of ``mode`` (1, 2 for 16-bit gray, else 4)."""
    return _STORED_BYTES_PER_PIXEL.get(mode, 4)


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Memory one decoded image of this size and Pillow mode takes (the decoder's own buffer)."""
    return width * height * stored_bytes_per_pixel(mode)


def check_decoded_size(width: int, height: int, mode: str, max_pixels: int | None, name: str = "image") -> int:
    """Refuse an image by its header, before it is decoded: no pixels, more than ``max_pixels`` pixels, or more
    decoded bytes than ``max_pixels * DECODED_BYTES_PER_PIXEL_LIMIT``. Returns the decoded bytes (the decoder's
    own buffer; a memory budget reserves the larger ``decode_budget.peak_decoded_bytes``). The one
    per-image size rule of the Python and image-graph paths."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: empty image ({width}x{height} pixels)")
    size = decoded_bytes(width, height, mode)
    if max_pixels is not None:
        if width * height > max_pixels:
            raise ImageError(
                f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                "(possible decompression bomb)"
            )
        limit = max_pixels * DECODED_BYTES_PER_PIXEL_LIMIT
        if size > limit:
            raise ImageError(f"{name}: {width}x{height} {mode} decodes to {size} bytes, over the limit of {limit}")
    return size


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"array images must be uint8, got {array.dtype}")
    if array.ndim in (2, 3) and (array.shape[0] == 0 or array.shape[1] == 0):
        raise ImageError(f"empty image (array of shape {array.shape})")
    if array.ndim in (2, 3):
        channels = 1 if array.ndim == 2 else array.shape[2]
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "RGBA")
        check_decoded_size(array.shape[1], array.shape[0], mode, max_pixels, _describe(array))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageError(f"array images must be HxW, HxWx1, HxWx3 or HxWx4 uint8, got shape {array.shape}")


def _warning_filter(action: str, category: type[Warning]) -> contextlib.AbstractContextManager:
    """A scoped warnings filter, in the main thread only.

    ``warnings.catch_warnings`` swaps process-wide state and is not thread-safe before Python 3.14, so calls from
    other threads (e.g. a service's request threads) skip it. Nothing depends on it for correctness: ``max_pixels``
    is checked explicitly, and Pillow raises ``DecompressionBombError`` itself above twice its limit."""
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
            check_decoded_size(image.width, image.height, image.mode, max_pixels, name)
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


def _check_pixels(image: Image.Image, name: str, max_pixels: int | None = None) -> Image.Image:
    check_decoded_size(image.width, image.height, image.mode, max_pixels, name)
    return image


def _read_regular_file(path: Path, max_bytes: int | None) -> bytes:
    """The bytes of a regular file, never more than ``max_bytes``. The file is opened non-blocking and checked on
    the open descriptor, so a FIFO never hangs, ``/dev/zero`` is never read, and a file swapped after a check is
    still caught."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, expected an image file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{path}: is a folder, expected an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path}: not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ImageError(f"{path}: {info.st_size} bytes exceeds the image file limit of {max_bytes} bytes")
        chunks = []
        remaining = None if max_bytes is None else max_bytes + 1
        while remaining is None or remaining > 0:
            chunk = os.read(fd, 1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            if remaining is not None:
                remaining -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew after the check
        raise ImageError(f"{path}: more than the image file limit of {max_bytes} bytes")
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes)")
    return data


def load_image(
    source: ImageSource, *, max_pixels: int | None = MAX_PIXELS, max_file_bytes: int | None = MAX_FILE_BYTES
) -> Image.Image:
    """Decode one image from a path, bytes, a binary file object, a PIL image or a uint8 array.

    Paths must be regular files (a FIFO, a device or a socket is refused before any read) no larger than
    ``max_file_bytes``. An image with no pixels is refused. The image keeps its own mode (see ``to_rgb``); every
    failure is one ``ImageError`` line naming the input."""
    if isinstance(source, Image.Image):
        return _check_pixels(source, _describe(source), max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        data = _read_regular_file(Path(source), max_file_bytes)
        return _check_pixels(_decode(io.BytesIO(data), name, max_pixels), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty image data (0 bytes)")
        if max_file_bytes is not None and len(source) > max_file_bytes:
            raise ImageError(f"{name}: exceeds the image file limit of {max_file_bytes} bytes")
        return _check_pixels(_decode(io.BytesIO(bytes(source)), name, max_pixels), name)
    if hasattr(source, "read"):
        try:
            # read fully (pipes and sockets too), closing nothing of the caller's; at most one byte over the limit
            data = source.read() if max_file_bytes is None else source.read(max_file_bytes + 1)
        except OSError as exc:
            raise ImageError(f"{name}: cannot read ({exc})") from None
        if not data:
            raise ImageError(f"{name}: empty image data (0 bytes)")
        if max_file_bytes is not None and len(data) > max_file_bytes:
            raise ImageError(f"{name}: exceeds the image file limit of {max_file_bytes} bytes")
        return _check_pixels(_decode(io.BytesIO(data), name, max_pixels), name)
    raise ImageError(f"unsupported image input type {type(source).__name__}")


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag (opt-in: birder does not do this)."""
    return ImageOps.exif_transpose(image) or image


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB by the rule in the module docstring (birder's, by default).

    ``background``: composite images with alpha onto this colour instead of dropping the alpha channel."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(sixteen_to_eight_bit(np.asarray(image)), mode="L").convert("RGB")
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


SIXTEEN_BIT_ROWS_PER_STEP = 256
"""Rows converted at a time, so the working memory of the conversion is a strip, not a copy of the image."""


def sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8 ``round(v / 257)``, in integers: ``(2v + 257) // 514`` is the same value for every
    v in 0..65535 (v / 257 is never exactly halfway), without float64 copies of an image that may be 88 Mpixel."""
    gray = np.empty(values.shape, dtype=np.uint8)
    for start in range(0, values.shape[0], SIXTEEN_BIT_ROWS_PER_STEP):
        strip = values[start : start + SIXTEEN_BIT_ROWS_PER_STEP].astype(np.uint32)
        gray[start : start + SIXTEEN_BIT_ROWS_PER_STEP] = np.minimum((2 * strip + 257) // 514, 255)
    return gray


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


_SINGLE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)


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
            yield images  # rejected with a clear message by Preprocessor
            return
        yield from images  # rows keep their dtype; each is validated on its own
        return
    if isinstance(images, dict) or not isinstance(images, Iterable):
        raise ImageError(f"unsupported images argument of type {type(images).__name__}")
    for item in images:
        if isinstance(item, np.ndarray) and item.ndim == 4 and item.shape[0] == 1:
            item = item[0]
        yield item


@dataclass(frozen=True)
class Preprocessor:
    """The one preprocessing pipeline: any accepted input -> the model's (3, H, W) float32 row.

    Built from the model's preprocessing spec (``Preprocessor.from_input_spec(manifest.input)``) and used by the
    runtime, ``verify``, int8 calibration and bench, so they all feed the graphs the same tensors. Accepts a path,
    bytes, a binary file object, a PIL image (any mode), an HxW / HxWx1 / HxWx3 / HxWx4 uint8 array, or an already
    preprocessed (3, H, W) float32 row (validated, passed through)."""

    size: tuple[int, int]
    rgb_stats: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in BIRDER_RGB_STATS.items()})
    center_crop: float = 1.0
    apply_exif: bool = False
    dynamic_size: bool = False
    background: tuple[int, int, int] | None = None
    max_file_bytes: int | None = MAX_FILE_BYTES
    max_pixels: int | None = MAX_PIXELS

    @classmethod
    def from_input_spec(cls, spec: Any, **overrides: Any) -> Preprocessor:
        """From a ``pvt_deploy.format.manifest.InputSpec`` (``manifest.input``)."""
        values: dict[str, Any] = {
            "size": tuple(spec.size),
            "rgb_stats": spec.rgb_stats.as_dict(),
            "center_crop": spec.resize.center_crop,
            "apply_exif": spec.resize.apply_exif,
            "dynamic_size": spec.dynamic_size,
        }
        values.update(overrides)
        return cls(**values)

    def validate_preprocessed(self, array: np.ndarray) -> np.ndarray:
        """A caller's already-preprocessed (3, H, W) row: float32, the model's size, finite."""
        if array.dtype != np.float32:
            raise ImageError(f"preprocessed input must be float32, got {array.dtype} (cast with .astype(np.float32))")
        if array.ndim != 3 or array.shape[0] != 3:
            raise ImageError(f"preprocessed input must be NCHW with 3 channels, got a row of shape {array.shape}")
        height, width = array.shape[1:]
        if self.dynamic_size:
            if height % 32 or width % 32 or height < 32 or width < 32:
                raise ImageError(f"preprocessed input size {height}x{width} must be a positive multiple of 32")
        elif (height, width) != tuple(self.size):
            raise ImageError(f"preprocessed input is {height}x{width}, this model takes {self.size[0]}x{self.size[1]}")
        if not np.isfinite(array).all():
            raise ImageError("preprocessed input contains NaN or infinite values")
        return array

    def __call__(self, item: Any) -> np.ndarray:
        """One item -> (3, H, W) float32, or ``ImageError`` naming what is wrong with it."""
        if isinstance(item, np.ndarray):
            if np.issubdtype(item.dtype, np.floating):
                if item.ndim != 3:
                    raise ImageError(f"preprocessed input must be NCHW float32, got shape {item.shape}")
                return self.validate_preprocessed(item)
            if item.dtype != np.uint8:
                raise ImageError(
                    f"array inputs must be uint8 HxWx3 images or float32 NCHW preprocessed tensors, got {item.dtype}"
                )
        elif not (isinstance(item, _SINGLE_TYPES) or hasattr(item, "read")):
            raise ImageError(f"unsupported image input of type {type(item).__name__}")
        try:
            image = load_image(item, max_pixels=self.max_pixels, max_file_bytes=self.max_file_bytes)
            if self.apply_exif:
                image = apply_exif_orientation(image)
            image = to_rgb(image, background=self.background)
            return to_array(resize_and_crop(image, self.size, self.center_crop), self.rgb_stats)
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, io.UnsupportedOperation) as exc:
            # lazily decoded PIL images passed in by the caller can fail here (truncated data, closed file)
            raise ImageError(f"cannot decode image ({str(exc).strip() or type(exc).__name__})") from None

    def batch(self, images: Any) -> np.ndarray:
        """One image or many -> (N, 3, H, W) float32; the first bad input raises ``ImageError`` naming its index."""
        rows = []
        for index, item in enumerate(iter_items(images)):
            try:
                rows.append(self(item))
            except ImageError as exc:
                raise ImageError(item_error_message(index, describe(item), str(exc))) from None
        if not rows:
            return np.empty((0, 3, *self.size), dtype=np.float32)
        return np.stack(rows)

    def prepare(self, images: Any) -> Prepared:
        """``batch`` as ``Prepared`` rows: a ``Runtime`` runs them without checking them again."""
        return Prepared(self.batch(images))


@dataclass(frozen=True)
class Prepared:
    """Model-input rows (N, 3, H, W) float32 that a ``Preprocessor`` made, so already valid: a ``Runtime`` method
    given them skips the per-row check it applies to a caller's own float arrays (dtype, size, NaN). Services and
    bulk jobs decode into these (``Runtime.prepare``, ``Prepared.concat``) so each row is checked once.
    Constructing one by hand opts out of that check; a row the graph cannot take is then an ``InferenceError``."""

    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def concat(parts: Sequence[Prepared]) -> Prepared:
        """Several requests' rows as one batch, in order."""
        return Prepared(np.concatenate([part.rows for part in parts]) if len(parts) != 1 else parts[0].rows)


def item_error_message(index: int, source: str, message: str) -> str:
    """``image 3 (a.jpg): truncated image``: the input's index and name said once."""
    if message.startswith(source):
        return f"image {index}: {message}"
    return f"image {index} ({source}): {message}"


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

    ``size`` is (H, W) or an int; a 4-D uint8 array is taken as a batch of HxWxC images. The ``Preprocessor``
    pipeline underneath is the runtime's."""
    pipeline = Preprocessor(
        _normalize_size(size),
        {key: list(values) for key, values in rgb_stats.items()},
        center_crop=center_crop,
        apply_exif=apply_exif,
        background=background,
    )
    batch = pipeline.batch(images)
    if not len(batch):
        raise ImageError("no images given")
    return batch


__all__ = [
    "BIRDER_RGB_STATS",
    "IMAGE_EXTENSIONS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "Prepared",
    "Preprocessor",
    "describe",
    "is_image_file",
    "iter_items",
    "RESIZE_RULE",
    "apply_exif_orientation",
    "load_image",
    "preprocess",
    "resize_and_crop",
    "resize_spec",
    "to_array",
    "to_rgb",
]
