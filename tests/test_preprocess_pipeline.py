"""One preprocessing pipeline: every input kind gives the same tensor through ``Runtime``, the ``preprocess``
function, ``verify``'s photo batches, the int8 calibration loader and train's evaluation view."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pvt_deploy import Runtime
from pvt_deploy.format.manifest import load_manifest
from pvt_deploy.preprocess import Preprocessor, preprocess

MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I;16", "I", "F")


def _inputs(photo: Path) -> dict[str, Any]:
    rgb = Image.open(photo).convert("RGB")
    pixels = np.asarray(rgb)
    kinds: dict[str, Any] = {
        "path": photo,
        "str": str(photo),
        "bytes": photo.read_bytes(),
        "file": io.BytesIO(photo.read_bytes()),
        "HxWx3": pixels,
        "HxWx4": np.dstack([pixels, np.full(pixels.shape[:2], 7, np.uint8)]),
        "HxWx1": pixels[:, :, :1].copy(),
        "HxW": pixels[:, :, 0].copy(),
    }
    for mode in MODES:
        kinds[f"PIL {mode}"] = rgb.convert(mode) if mode not in ("I;16",) else rgb.convert("L").convert("I;16")
    return kinds


def test_every_input_kind_gives_the_same_tensor_everywhere(tiny_export_dir: Path, photo_paths: list[Path]) -> None:
    runtime = Runtime(tiny_export_dir, device="cpu")
    spec = load_manifest(tiny_export_dir).input
    pipeline = Preprocessor.from_input_spec(spec)
    for kind, item in _inputs(photo_paths[2]).items():

        def fresh(item: Any = item) -> Any:  # a file object is consumed by each read: give each call its own
            return io.BytesIO(item.getvalue()) if isinstance(item, io.BytesIO) else item

        from_runtime = runtime.preprocess(fresh())
        from_function = preprocess(fresh(), spec.size, spec.rgb_stats.as_dict(), center_crop=spec.resize.center_crop)
        np.testing.assert_array_equal(from_runtime, from_function, err_msg=kind)
        np.testing.assert_array_equal(from_runtime[0], pipeline(fresh()), err_msg=kind)
        np.testing.assert_array_equal(runtime.preprocess(from_runtime), from_runtime, err_msg=kind)  # NCHW as is
    # the RGB kinds agree with each other; HxWx4 drops alpha like RGBA does
    kinds = _inputs(photo_paths[2])
    np.testing.assert_array_equal(runtime.preprocess(kinds["HxWx4"]), runtime.preprocess(kinds["PIL RGB"]))
    np.testing.assert_array_equal(runtime.preprocess(kinds["path"]), runtime.preprocess(kinds["HxWx3"]))


def test_verify_and_calibration_use_the_runtime_pipeline(
    tiny_export_dir: Path, photo_paths: list[Path], tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    from pvt_deploy.export.exporter import _calibration_batches
    from pvt_deploy.export.verify import input_sets

    runtime = Runtime(tiny_export_dir, device="cpu")
    expected = runtime.preprocess(photo_paths)
    photo_sets = [s for s in input_sets(runtime, photo_paths) if s.name.startswith("photos")]
    np.testing.assert_array_equal(np.concatenate([s.array for s in photo_sets]), expected)
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in photo_paths:
        (calib / path.name).write_bytes(path.read_bytes())
    spec = runtime.manifest.input
    source = SimpleNamespace(size=spec.size, rgb_stats=spec.rgb_stats.as_dict())
    batches = _calibration_batches(calib, source, batch=4)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.concatenate(batches), runtime.preprocess(sorted(calib.iterdir())))

    from pvt_deploy.train.augment import eval_batch  # train's evaluation view

    np.testing.assert_array_equal(eval_batch(photo_paths, spec.size, spec.rgb_stats.as_dict()).numpy(), expected)
