"""Conformance vectors: images in every Pillow mode family plus what a correct implementation must produce from
them (the resized uint8 pixels, the input tensor, the graphs' outputs), so a client in any language can test
itself against ``manifest.json``'s ``input.preprocess`` contract. Torch-free (built on ``Runtime``).

Layout of the folder written by ``write_conformance`` (raw little-endian arrays, described in ``vectors.json``)::

    README.md           how to check an implementation against the vectors
    vectors.json        per image: file, mode, and each array's file, dtype, shape; the tolerances
    images/<name>.<ext> the encoded images
    arrays/<name>.resized.u8     uint8 [h, w, 3]   after decode, mode rule, resize and crop
    arrays/<name>.input.f32      float32 [1, 3, h, w]  the tensor graphs' input
    arrays/<name>.<graph>.<output>.f32   the fp32 graphs' outputs for that input
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms

from pvt_deploy.errors import OutputError
from pvt_deploy.preprocess import load_image, resize_and_crop, to_rgb

VECTORS_NAME = "vectors.json"
TOLERANCES = {
    "resized": {"min_equal_fraction": 0.99, "max_levels": 1},
    "input": {"max_abs": 1e-6},
    "probabilities": {"max_abs": 1e-4},
    "embedding": {"min_cosine": 0.99999},
}
GRAPH_OUTPUTS = {"classify": ("probabilities", "embedding"), "embed": ("embedding",)}


def conformance_images(seed: int = 11) -> dict[str, tuple[str, bytes]]:
    """name -> (file name, encoded bytes): RGB, RGBA, palette with transparency, gray, 16-bit gray, ICC JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:90, 0:130]
    smooth = np.stack([(x * 2) % 256, (y * 3) % 256, ((x + y) * 5) % 256], axis=-1).astype(np.uint8)
    noisy = np.clip(smooth.astype(int) + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(noisy)
    alpha = (x * 255 // 129).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([noisy, alpha]), mode="RGBA")
    palette = rgb.quantize(64)
    palette.info["transparency"] = 5
    gray = rgb.convert("L")
    gray16 = Image.fromarray(
        (np.asarray(gray, np.uint16) * 257 + rng.integers(0, 257, gray.size[::-1])).astype(np.uint16)
    )
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    encoded = {}
    for name, image, fmt, extra in (
        ("rgb", rgb, "PNG", {}),
        ("rgba", rgba, "PNG", {}),
        ("palette", palette, "PNG", {"transparency": 5}),
        ("gray", gray, "PNG", {}),
        ("gray16", gray16, "PNG", {}),
        ("icc", Image.fromarray(smooth), "JPEG", {"quality": 90, "icc_profile": icc}),
        ("tall", Image.fromarray(noisy.transpose(1, 0, 2).copy()), "PNG", {}),
    ):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **extra)
        encoded[name] = (f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}", buffer.getvalue())
    return encoded


def _write_array(folder: Path, name: str, array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    (folder / name).write_bytes(little.tobytes())
    return {"file": f"arrays/{name}", "dtype": str(array.dtype), "shape": list(array.shape)}


def write_conformance(model_dir: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Write the vectors of the export at ``model_dir`` into ``out_dir`` (staged, renamed into place at the end)."""
    from pvt_deploy.runtime.runtime import Runtime

    runtime = Runtime(model_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir} already exists; pass --force to replace it")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / "arrays").mkdir()
    spec = runtime.spec
    entries = []
    try:
        for name, (file_name, data) in conformance_images().items():
            (staging / "images" / file_name).write_bytes(data)
            image = load_image(data)
            resized = np.asarray(resize_and_crop(to_rgb(image), spec.size, spec.center_crop), dtype=np.uint8)
            tensor = runtime.preprocess(data)
            entry: dict[str, Any] = {
                "name": name,
                "image": f"images/{file_name}",
                "pillow_mode": image.mode,
                "icc_profile": "icc_profile" in image.info,
                "resized": _write_array(staging / "arrays", f"{name}.resized.u8", resized),
                "input": _write_array(staging / "arrays", f"{name}.input.f32", tensor),
                "outputs": {},
            }
            for graph, names in GRAPH_OUTPUTS.items():
                if graph not in runtime.graphs:
                    continue
                produced = runtime.session(graph).run(tensor, names)
                entry["outputs"][graph] = {
                    output: _write_array(staging / "arrays", f"{name}.{graph}.{output}.f32", produced[output])
                    for output in names
                }
            entries.append(entry)
        document = {
            "model_name": runtime.manifest.model_name,
            "contract": runtime.describe()["preprocess"],
            "tolerances": TOLERANCES,
            "vectors": entries,
        }
        (staging / VECTORS_NAME).write_text(json.dumps(document, indent=1) + "\n")
        (staging / "README.md").write_text(README)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return document


README = """# pvt-deploy conformance vectors

Test an implementation of the preprocessing contract (`manifest.json` -> `input.preprocess`) and of the graphs
in any language. `vectors.json` lists, per image in `images/`, raw little-endian arrays in `arrays/` with their
dtype and shape, and the tolerances.

For every vector:

1. Decode `image` to its stored samples: no ICC conversion (`icc.jpg` carries a profile to catch decoders
   that apply it), no EXIF rotation unless `contract.exif.apply_orientation` is true.
2. Apply the mode rule of `contract.modes` (alpha dropped, palette looked up, 16-bit gray `round(v / 257)`,
   gray replicated), then the resize of `contract.resize` and the crop of `contract.center_crop`: compare with
   `resized` (uint8 [h, w, 3]): at least `min_equal_fraction` of the values equal, none more than `max_levels`
   apart (this implementation: all equal).
3. Scale and normalise (`contract.to_float`, `contract.normalize`) into float32 NCHW: compare with `input`
   (max abs difference `input.max_abs`).
4. Run `classify.onnx` / `embed.onnx` on your tensor (or `classify.image.onnx` / `embed.image.onnx` on your
   decoded uint8 [H, W, C] pixels) and compare with `outputs`: probabilities within `probabilities.max_abs`,
   embeddings with cosine similarity at least `embedding.min_cosine`.

Re-create with `pvt-deploy conformance MODEL_DIR --out DIR`; `tests/test_conformance.py` re-checks a written
folder against Python and the image-input graphs.
"""
