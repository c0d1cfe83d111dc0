"""Torch-free preprocessing: every input kind, every PIL mode rule, EXIF opt-in, and one-line errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import (
    load_image,
    preprocess,
    resize_and_crop,
    resize_spec,
    to_array,
    to_rgb,
)

RGB_STATS = {"mean": [0.5191, 0.5306, 0.4877], "std": [0.2316, 0.2304, 0.2588]}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ------------------------------------------------------------------------------------------ input kinds


def test_every_source_kind_gives_the_same_tensor(photo_paths: list[Path]) -> None:
    path = photo_paths[2]  # chelsea.png, RGB
    with Image.open(path) as opened:
        pil = opened.convert("RGB")
    sources = [path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), pil, np.asarray(pil)]
    batches = [preprocess(source, (64, 64), RGB_STATS) for source in sources]
    for batch in batches:
        assert batch.shape == (1, 3, 64, 64) and batch.dtype == np.float32
        np.testing.assert_array_equal(batch, batches[0])


def test_batch_of_paths_and_non_square_size(photo_paths: list[Path]) -> None:
    batch = preprocess(photo_paths, (96, 64), RGB_STATS)
    assert batch.shape == (len(photo_paths), 3, 96, 64)
    assert np.isfinite(batch).all()
    # each row is the single-image result
    np.testing.assert_array_equal(batch[3], preprocess(photo_paths[3], (96, 64), RGB_STATS)[0])
    assert preprocess(photo_paths[0], 64, RGB_STATS).shape == (1, 3, 64, 64)


def test_normalisation_of_known_pixels() -> None:
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    out = preprocess(image, (32, 32), RGB_STATS)[0]
    expected = (np.array([255, 0, 128], np.float32) / 255 - np.array(RGB_STATS["mean"])) / np.array(RGB_STATS["std"])
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-6)
    assert np.ptp(out, axis=(1, 2)).max() == 0  # a flat image stays flat


def test_center_crop_fraction() -> None:
    """center_crop=0.5 resizes to twice the size then keeps the middle: a centred square survives, the border not."""
    image = Image.new("RGB", (200, 200), (0, 0, 0))
    image.paste((255, 255, 255), (50, 50, 150, 150))
    cropped = resize_and_crop(image, (32, 32), center_crop=0.5)
    assert cropped.size == (32, 32)
    assert _pixels(cropped).min() > 200  # all white: only the middle half is kept
    full = resize_and_crop(image, (32, 32), center_crop=1.0)
    assert _pixels(full).min() == 0


def test_resize_spec_is_json_ready() -> None:
    spec = resize_spec(0.875)
    assert spec["interpolation"] == "bicubic" and spec["center_crop"] == 0.875 and "BICUBIC" in spec["rule"]


# ----------------------------------------------------------------------------------------- colour modes


def test_gray_is_replicated(photo_paths: list[Path]) -> None:
    camera = load_image(photo_paths[1])
    assert camera.mode == "L"
    rgb = _pixels(to_rgb(camera))
    assert rgb.shape[2] == 3
    np.testing.assert_array_equal(rgb[..., 0], _pixels(camera))
    np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])


def test_alpha_is_dropped_by_default_and_composited_on_request() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent dark pixels
    np.testing.assert_array_equal(_pixels(to_rgb(rgba))[0, 0], [10, 20, 30])  # birder: colour under alpha kept
    np.testing.assert_array_equal(_pixels(to_rgb(rgba, background=(255, 255, 255)))[0, 0], [255, 255, 255])
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    composited = _pixels(to_rgb(half, background=(255, 255, 255)))[0, 0]
    assert 120 <= composited[0] <= 130
    la = Image.new("LA", (4, 4), (200, 0))
    np.testing.assert_array_equal(_pixels(to_rgb(la))[0, 0], [200, 200, 200])


def test_rgba_photo_matches_birders_pil_loader(photo_paths: list[Path]) -> None:
    logo = load_image(photo_paths[4])
    assert logo.mode == "RGBA"
    np.testing.assert_array_equal(_pixels(to_rgb(logo)), _pixels(logo.convert("RGB")))


def test_palette_with_transparency_and_one_bit() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 1
    np.testing.assert_array_equal(_pixels(to_rgb(palette))[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(_pixels(to_rgb(palette, background=(0, 0, 255)))[0, 0], [0, 0, 255])
    bilevel = Image.new("1", (4, 4), 1)
    np.testing.assert_array_equal(_pixels(to_rgb(bilevel))[0, 0], [255, 255, 255])


def test_cmyk_uses_pillows_conversion() -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    np.testing.assert_array_equal(_pixels(to_rgb(cmyk))[0, 0], [255, 0, 0])


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 25700, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    np.testing.assert_array_equal(_pixels(to_rgb(image))[0, :, 0], [0, 1, 100, 255])
    # through the whole pipeline from a real 16-bit PNG file
    out = preprocess(_png_bytes(Image.fromarray(np.full((8, 8), 65535, np.uint16))), 8, RGB_STATS)
    np.testing.assert_allclose(out[0, :, 0, 0], (1 - np.array(RGB_STATS["mean"])) / np.array(RGB_STATS["std"]),
                               atol=1e-6)  # fmt: skip


def test_32_bit_int_and_float_are_taken_on_the_8_bit_scale() -> None:
    as_int = Image.fromarray(np.array([[-5, 100, 300]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(_pixels(to_rgb(as_int))[0, :, 0], [0, 100, 255])
    as_float = Image.fromarray(np.array([[-1.0, 100.0, 300.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(_pixels(to_rgb(as_float))[0, :, 0], [0, 100, 255])


def test_to_array_refuses_non_rgb() -> None:
    with pytest.raises(ImageError, match="expected an RGB image"):
        to_array(Image.new("L", (4, 4)), RGB_STATS)


# ----------------------------------------------------------------------------------------------- EXIF


def _rotated_jpeg(tmp_path: Path) -> Path:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_opt_in(tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path)
    plain = preprocess(path, (32, 64), RGB_STATS)  # stored 40x20 stretched into 64 wide x 32 high
    applied = preprocess(path, (32, 64), RGB_STATS, apply_exif=True)
    assert not np.allclose(plain, applied)
    # default: stored pixels as-is: left columns blue
    assert plain[0, 2, 16, 2] > plain[0, 0, 16, 2]
    # applied: rotated 90 clockwise, so blue (the stored left half) is now at the top
    assert applied[0, 2, 2, 32] > applied[0, 0, 2, 32]
    assert applied[0, 0, 30, 32] > applied[0, 2, 30, 32]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="empty image data"):
        load_image(io.BytesIO())


def test_truncated_and_not_an_image(tmp_path: Path, photo_paths: list[Path]) -> None:
    data = photo_paths[5].read_bytes()  # rocket.jpg
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="cut.jpg: truncated image"):
        load_image(tmp_path / "cut.jpg")
    png = photo_paths[2].read_bytes()
    with pytest.raises(ImageError, match="truncated|cannot decode"):
        load_image(png[: len(png) // 2])
    (tmp_path / "notes.jpg").write_text("not an image at all")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        load_image(tmp_path / "notes.jpg")


def test_decompression_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_bytes(Image.new("L", (100, 100)))
    with pytest.raises(ImageError, match="exceeds the limit of 5000"):
        load_image(data, max_pixels=5000)
    # Pillow's own check (warning above its limit, error above twice it) becomes ImageError too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=None)


def test_bad_arrays_and_types() -> None:
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ImageError, match="unsupported image input type"):
        load_image(12345)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="no images"):
        preprocess([], 32, RGB_STATS)


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "bad.png")
    assert "\n" not in str(info.value) and "bad.png" in str(info.value)


def test_errors_and_results_are_the_same_in_worker_threads(photo_paths: list[Path]) -> None:
    """The runtime decodes in a thread pool; the bomb limit and the results must not depend on the thread."""
    from concurrent.futures import ThreadPoolExecutor

    data = _png_bytes(Image.new("L", (100, 100)))

    def bomb() -> str:
        try:
            load_image(data, max_pixels=5000)
        except ImageError as exc:
            return str(exc)
        return "loaded"

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert "exceeds the limit" in pool.submit(bomb).result()
        threaded = pool.submit(preprocess, photo_paths, 64, RGB_STATS).result()
    np.testing.assert_array_equal(threaded, preprocess(photo_paths, 64, RGB_STATS))
