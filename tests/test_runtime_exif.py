"""``Runtime(exif_transpose=True)``: EXIF orientation applied before preprocessing, and recorded in the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pvt_deploy import Runtime


def test_exif_transpose_is_opt_in_and_recorded(tiny_export_dir: Path, tmp_path: Path) -> None:
    pixels = np.zeros((64, 32, 3), dtype=np.uint8)
    pixels[:8] = 255  # a white band at the top: rotation moves it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)

    plain = Runtime(tiny_export_dir, device="cpu")
    rotated = Runtime(tiny_export_dir, device="cpu", exif_transpose=True)
    assert not plain.metadata["preprocess"]["exif_transpose"]
    assert rotated.metadata["preprocess"]["exif_transpose"]
    upright = Image.open(path).transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(rotated.preprocess(path), plain.preprocess(upright))
    assert not np.array_equal(rotated.preprocess(path), plain.preprocess(path))
