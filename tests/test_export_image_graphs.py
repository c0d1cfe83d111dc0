"""The image-input graphs (``classify.image.onnx``, ``embed.image.onnx``) against the Python path, and the
Pillow-exact resize inside them."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from pvt_deploy.errors import ImageError, ModelDirError
from pvt_deploy.export.preprocess_graph import preprocess_graph
from pvt_deploy.format.codec import to_json
from pvt_deploy.preprocess import BIRDER_RGB_STATS, to_rgb
from pvt_deploy.runtime.runtime import Runtime

PROBABILITY_TOLERANCE = 1e-4
MIN_COSINE = 0.99999


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _every_mode() -> dict[str, Image.Image]:
    """One small image per Pillow mode family (odd sizes: upscale, downscale, and the vertical-first order)."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (97, 61, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (50, 83, 4), dtype=np.uint8), mode="RGBA")
    gray16 = Image.fromarray(rng.integers(0, 65536, (40, 70), dtype=np.uint16))
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 3
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": rgb.convert("P"),
        "P+transparency": palette_transparent,
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "I;16": gray16,
        "I": rgb.convert("L").convert("I"),
        "F": rgb.convert("L").convert("F"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
    }


@pytest.fixture(scope="module")
def runtimes(tiny_export_dir):
    return Runtime(tiny_export_dir), Runtime(tiny_export_dir, preprocess="graph")


def test_export_writes_image_graphs_and_labels(tiny_export_dir) -> None:
    manifest = Runtime(tiny_export_dir).manifest
    assert set(manifest.image_graphs) == {"classify", "embed"}
    for entry in manifest.image_graphs.values():
        assert entry.file in manifest.files
        assert [to_json(spec) for spec in entry.inputs] == [
            {"name": "image", "shape": ["height", "width", "channels"], "dtype": "uint8"}
        ]
    labels = (tiny_export_dir / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == list(manifest.labels)
    assert manifest.parity["export"]["classify/image"]["max_abs"] <= 1e-5


def test_graph_path_matches_python_on_photos(runtimes, photo_paths) -> None:
    python, graph = runtimes
    p_python, e_python = python.classify(photo_paths, return_embedding=True)
    p_graph, e_graph = graph.classify(photo_paths, return_embedding=True)
    assert np.abs(p_python - p_graph).max() <= PROBABILITY_TOLERANCE
    assert _cosine(e_python, e_graph).min() >= MIN_COSINE
    assert _cosine(python.embed(photo_paths), graph.embed(photo_paths)).min() >= MIN_COSINE
    assert [p[0][0] for p in graph.predict(photo_paths)] == [p[0][0] for p in python.predict(photo_paths)]


def test_graph_path_matches_python_on_every_pillow_mode(runtimes) -> None:
    python, graph = runtimes
    images = _every_mode()
    encoded = []
    for mode, image in images.items():  # through encoded bytes too, as a service receives them
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF" if mode in ("I;16", "I", "F", "CMYK", "YCbCr", "LA") else "PNG")
        encoded.append(buffer.getvalue())
    for items in (list(images.values()), encoded):
        p_python, e_python = python.classify(items, return_embedding=True)
        p_graph, e_graph = graph.classify(items, return_embedding=True)
        worst = np.abs(p_python - p_graph).max(axis=1)
        assert worst.max() <= PROBABILITY_TOLERANCE, dict(zip(images, worst.tolist(), strict=True))
        assert _cosine(e_python, e_graph).min() >= MIN_COSINE


def test_resize_in_the_graph_is_pillows(photo_paths) -> None:
    """Bit-exact on the photos and on shapes that take each pass order (the target is >= 99% equal, <= 1 level)."""
    session = ort.InferenceSession(
        preprocess_graph((64, 64), BIRDER_RGB_STATS, resized_output=True).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(3)
    images = [to_rgb(Image.open(path)) for path in photo_paths]
    images += [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((97, 61, 3), (61, 97, 3))]
    images += [Image.fromarray(rng.integers(0, 256, (20, 33, 3), dtype=np.uint8))]  # upscale both ways
    for image in images:
        expected = np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC))
        (got,) = session.run(["resized"], {"image": np.asarray(image)})
        assert np.array_equal(got, expected), image.size


def test_graph_mode_refuses_what_it_cannot_run(tiny_export_dir, runtimes) -> None:
    _, graph = runtimes
    with pytest.raises(ModelDirError, match="no image-input variant of the 'features' graph"):
        graph.features(np.zeros((70, 70, 3), np.uint8))
    with pytest.raises(ImageError, match="not preprocessed float tensors"):
        graph.classify(np.zeros((3, 64, 64), np.float32))
    result = graph.embed([np.zeros((70, 70, 3), np.uint8), b"not an image"], on_error="collect")
    assert result.ok.tolist() == [True, False] and np.isnan(result.value[1]).all()
    with pytest.raises(ValueError, match="preprocess must be one of"):
        Runtime(tiny_export_dir, preprocess="pillow")


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0, 1), (5, 5, 5), (5, 5, 2)])
def test_image_graphs_refuse_what_the_contract_forbids_when_called_directly(tiny_export_dir, shape) -> None:
    """Clients in other languages call the image graphs without Runtime: the graph itself fails on an image with
    no pixels or a channel count other than 1, 3 or 4 (it answered finite probabilities before)."""
    for name in ("classify.image.onnx", "embed.image.onnx"):
        session = ort.InferenceSession(str(tiny_export_dir / name))
        with pytest.raises(Exception, match="Reshape"):
            session.run(None, {"image": np.zeros(shape, np.uint8)})
        assert np.isfinite(
            session.run(None, {"image": np.zeros((5, 7, shape[2] if shape[2] in (1, 3, 4) else 3), np.uint8)})[0]
        ).all()


def test_graph_mode_applies_the_python_paths_limits_before_the_graph_runs(tiny_export_dir, runtimes, tmp_path) -> None:
    """A (20000, 20000, 3) array is refused by the pixel limit as one ImageError for its item (it reached
    onnxruntime before); a file over the byte limit likewise, before it is read."""
    _, graph = runtimes
    huge = np.zeros((20000, 20000, 3), np.uint8)  # calloc'd: no page is touched
    result = graph.classify([huge, np.zeros((70, 70, 3), np.uint8)], on_error="collect")
    assert result.ok.tolist() == [False, True]
    assert "exceeds the limit" in str(result.errors[0])
    with pytest.raises(ImageError, match="pixels exceeds the limit of 1000"):
        Runtime(tiny_export_dir, preprocess="graph", max_pixels=1000).classify(np.zeros((40, 40, 3), np.uint8))
    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    limited = Runtime(tiny_export_dir, preprocess="graph", max_image_bytes=image.stat().st_size - 1)
    with pytest.raises(ImageError, match="exceeds the image file limit"):
        limited.classify(image)


def test_graph_mode_bounds_the_resize_weights_of_a_long_thin_image(tiny_export_dir) -> None:
    """The image graphs' resize weights grow with the sides: a 1 x 100,000 image passes the pixel limit but is
    refused by the decoded-memory bound (here scaled down with max_pixels) before the graph runs."""
    runtime = Runtime(tiny_export_dir, preprocess="graph", max_pixels=100_000)
    with pytest.raises(ImageError, match="bytes of resize weights"):
        runtime.classify(np.zeros((1, 100_000, 3), np.uint8))
    assert np.isfinite(runtime.classify(np.zeros((200, 300, 3), np.uint8))).all()
