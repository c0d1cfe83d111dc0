"""A budget on decoded image memory, shared by every decoder of a process (``serve``'s decode pool, bulk jobs).

The pixel limit bounds one image's pixels, but memory is pixels x bytes per pixel x copies, and concurrent decodes
multiply it: a 167 KB 16-bit gray PNG of 88 megapixels passes the pixel limit, and eight of them decoding at once
took a server from 393 MB to 4.9 GB. So each decode first reserves its estimated peak bytes (read from the image
header: Pillow opens lazily, the pixels are not decoded yet) and gives them back when its row is made; a decode that
does not fit waits, and gives up after a deadline (``DecodeBusy``: a service answers 503). An image that alone needs
more than the whole budget can never fit and is refused (``ImageError``).

Torch-free and Pillow-only, next to ``pvt_deploy.preprocess``."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
from collections.abc import Iterator

from PIL import Image

from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import check_decoded_size, stored_bytes_per_pixel

RGB_BYTES_PER_PIXEL = 4
SIXTEEN_BIT_WORK_BYTES_PER_PIXEL = 4
"""16-bit gray becomes 8-bit (``preprocess.to_rgb``): a numpy copy of the samples (2) + the 8-bit plane and its
8-bit image (1 + 1)."""

MB = 1024 * 1024
"""The unit of the ``--max-decode-mb`` options (a mebibyte)."""

DEFAULT_DECODE_BUDGET_BYTES = 1024 * MB
"""1 GiB in flight: one worst-case image (89 Mpixel 16-bit gray: ~0.9 GB at its peak) fits, two do not."""


class DecodeBusy(TimeoutError):
    """The budget stayed full for the whole wait: try again later (a service answers 503 + Retry-After)."""


def peak_decoded_bytes(width: int, height: int, mode: str) -> int:
    """Peak bytes of decoding one image of this header and turning it into 8-bit RGB (``preprocess.to_rgb``): the
    decoded image, plus the working copies of the 16-bit conversion, plus the RGB copy unless it is RGB already."""
    pixels = max(int(width), 0) * max(int(height), 0)
    per_pixel = stored_bytes_per_pixel(mode)
    stored = per_pixel * pixels
    if mode == "RGB":
        return stored
    extra = SIXTEEN_BIT_WORK_BYTES_PER_PIXEL * pixels if per_pixel == 2 else 0
    return stored + extra + RGB_BYTES_PER_PIXEL * pixels


def estimate_decoded_bytes(
    source: bytes | bytearray | memoryview | str | os.PathLike[str], *, max_pixels: int | None = None
) -> int | None:
    """``peak_decoded_bytes`` from an encoded image's header (bytes, or a path to a regular file), without decoding
    its pixels; ``None`` when Pillow cannot read a header (the decoder then says why, as for any bad image).

    With ``max_pixels`` (the decoder's own pixel limit), an image that limit refuses by its header needs 0 bytes: it
    is never decoded, and the decoder's refusal ("decompression bomb") is the clearer message."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            opened = Image.open(io.BytesIO(bytes(source)))
        elif stat.S_ISREG(os.stat(source).st_mode):  # a FIFO or a device is never opened here: it could block
            opened = Image.open(source)
        else:
            return None
        with opened as image:
            width, height, mode = image.width, image.height, image.mode
    except Exception:  # noqa: BLE001 - any unreadable header is the decoder's to report, one line per item
        return None
    if max_pixels is not None:
        try:
            check_decoded_size(width, height, mode, max_pixels)
        except ImageError:
            return 0
    return peak_decoded_bytes(width, height, mode)


class DecodeBudget:
    """Bytes of decoded images in flight, bounded by ``limit_bytes``. Thread-safe; one per process or service.

    ``with budget.reserve(n, timeout=10): decode()`` waits until ``n`` bytes fit (FIFO is not guaranteed; a
    smaller image may pass a larger one), raises ``DecodeBusy`` after ``timeout`` seconds (``None``: wait as long
    as it takes, as a bulk job does), and ``ImageError`` at once when ``n`` exceeds the whole budget."""

    def __init__(self, limit_bytes: int = DEFAULT_DECODE_BUDGET_BYTES) -> None:
        self.limit_bytes = _checked_limit(limit_bytes)
        self._in_use = 0
        self._changed = threading.Condition()

    def set_limit(self, limit_bytes: int) -> None:
        """Change the bound (a job's ``--max-decode-mb`` on the process budget); waiting decodes re-check it."""
        limit_bytes = _checked_limit(limit_bytes)
        with self._changed:
            self.limit_bytes = limit_bytes
            self._changed.notify_all()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        with self._changed:
            return self._in_use

    def check_fits(self, nbytes: int) -> None:
        """``ImageError`` when ``nbytes`` exceed the whole budget: such an image can never be decoded here."""
        if nbytes > self.limit_bytes:
            raise ImageError(
                f"decoding needs about {_mb(nbytes)} MB, over the decoded-memory limit of {_mb(self.limit_bytes)} MB"
            )

    @contextlib.contextmanager
    def reserve(self, nbytes: int, *, timeout: float | None) -> Iterator[None]:
        nbytes = max(int(nbytes), 0)
        self.check_fits(nbytes)
        with self._changed:
            # a limit lowered meanwhile (``set_limit``) below ``nbytes`` ends the wait too, and refuses it
            fits = lambda: nbytes > self.limit_bytes or self._in_use + nbytes <= self.limit_bytes  # noqa: E731
            if not self._changed.wait_for(fits, timeout=timeout):
                raise DecodeBusy(
                    f"decoded-memory budget full ({_mb(self._in_use)} of {_mb(self.limit_bytes)} MB in use)"
                )
            self.check_fits(nbytes)
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()

    @contextlib.contextmanager
    def decoding(
        self,
        source: bytes | bytearray | memoryview | str | os.PathLike[str],
        *,
        max_pixels: int | None = None,
        timeout: float | None,
    ) -> Iterator[None]:
        """Hold ``source``'s estimated decoded bytes (``estimate_decoded_bytes``, header only) while the caller
        decodes it: the one estimate-then-reserve rule of every decoder (serve's uploads, the jobs' decode tasks)."""
        with self.reserve(estimate_decoded_bytes(source, max_pixels=max_pixels) or 0, timeout=timeout):
            yield


_PROCESS_BUDGET: DecodeBudget | None = None
_PROCESS_BUDGET_LOCK = threading.Lock()


def process_decode_budget() -> DecodeBudget:
    """One ``DecodeBudget`` (``DEFAULT_DECODE_BUDGET_BYTES``) for every decoder of this process that has none of
    its own, e.g. a bulk job's decode threads (``reserve(..., timeout=None)``: they wait, never fail)."""
    global _PROCESS_BUDGET
    with _PROCESS_BUDGET_LOCK:
        if _PROCESS_BUDGET is None:
            _PROCESS_BUDGET = DecodeBudget()
        return _PROCESS_BUDGET


def _checked_limit(limit_bytes: int) -> int:
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 1:
        raise ValueError(f"limit_bytes must be a positive integer, got {limit_bytes!r}")
    return limit_bytes


def _mb(nbytes: int) -> int:
    return round(nbytes / MB)


__all__ = [
    "DEFAULT_DECODE_BUDGET_BYTES",
    "MB",
    "DecodeBudget",
    "DecodeBusy",
    "estimate_decoded_bytes",
    "peak_decoded_bytes",
    "process_decode_budget",
]
