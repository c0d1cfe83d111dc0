"""``pvt-deploy conformance`` writes vectors that the Python path and the image-input graphs both pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.preprocess import load_image, resize_and_crop, to_rgb
from pvt_deploy.runtime.runtime import Runtime


def _array(folder: Path, record: dict) -> np.ndarray:
    return np.fromfile(folder / record["file"], dtype=np.dtype(record["dtype"]).newbyteorder("<")).reshape(
        record["shape"]
    )


@pytest.fixture(scope="module")
def vectors_dir(tiny_export_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conformance") / "vectors"
    result = CliRunner().invoke(cli, ["conformance", str(tiny_export_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_vectors_cover_every_mode_family(vectors_dir) -> None:
    document = json.loads((vectors_dir / "vectors.json").read_text())
    modes = {vector["pillow_mode"] for vector in document["vectors"]}
    assert {"RGB", "RGBA", "P", "L"} <= modes and modes & {"I;16", "I"}
    assert any(vector["icc_profile"] for vector in document["vectors"])
    assert document["contract"]["resize"]["kernel"] == "cubic"
    assert "min_equal_fraction" in (vectors_dir / "README.md").read_text()


def test_vectors_recheck_against_python_and_image_graphs(tiny_export_dir, vectors_dir) -> None:
    document = json.loads((vectors_dir / "vectors.json").read_text())
    tolerances = document["tolerances"]
    python = Runtime(tiny_export_dir)
    graph = Runtime(tiny_export_dir, preprocess="graph")
    for vector in document["vectors"]:
        data = (vectors_dir / vector["image"]).read_bytes()
        resized = np.asarray(resize_and_crop(to_rgb(load_image(data)), python.spec.size), dtype=np.uint8)
        assert np.array_equal(resized, _array(vectors_dir, vector["resized"])), vector["name"]
        tensor = python.preprocess(data)
        assert np.abs(tensor - _array(vectors_dir, vector["input"])).max() <= tolerances["input"]["max_abs"]
        probabilities, embedding = graph.classify(data, return_embedding=True)
        expected = vector["outputs"]["classify"]
        want = _array(vectors_dir, expected["probabilities"])
        assert np.abs(probabilities - want).max() <= tolerances["probabilities"]["max_abs"], vector["name"]
        want = _array(vectors_dir, expected["embedding"])[0]
        cosine = embedding[0] @ want / np.linalg.norm(embedding[0]) / np.linalg.norm(want)
        assert cosine >= tolerances["embedding"]["min_cosine"], vector["name"]


def test_conformance_refuses_existing_output(tiny_export_dir, vectors_dir) -> None:
    result = CliRunner().invoke(cli, ["conformance", str(tiny_export_dir), "--out", str(vectors_dir)])
    assert result.exit_code != 0 and "already exists" in result.output
    assert (vectors_dir / "vectors.json").is_file()


PYTHON_CLIENT = """
import json, sys
import numpy as np
from PIL import Image
from pvt_deploy.runtime.runtime import Runtime

model_dir, image_path, sixteen_bit = sys.argv[1], sys.argv[2], sys.argv[3]
image = Image.open(image_path)
if image.mode.startswith("I") and sixteen_bit == "shift":  # sharp's 16 -> 8 bit rule: v >> 8, not round(v / 257)
    image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
probabilities, embedding = Runtime(model_dir).classify(image, return_embedding=True)
print("a client may log before its answer")
print(json.dumps({"probabilities": probabilities[0].tolist(), "embedding": embedding[0].tolist()}))
"""


def _python_client(tmp_path: Path, model_dir: Path, sixteen_bit: str) -> str:
    """A client command template: a Python program (Pillow + Runtime) answering in the checker's JSON format."""
    import shlex
    import sys

    script = tmp_path / "client.py"
    script.write_text(PYTHON_CLIENT)
    return (
        " ".join(shlex.quote(word) for word in (sys.executable, str(script), str(model_dir)))
        + f" {{image}} {sixteen_bit}"
    )


def test_check_passes_a_correct_client(tiny_export_dir, vectors_dir, tmp_path) -> None:
    client = _python_client(tmp_path, tiny_export_dir, "round")
    result = CliRunner().invoke(cli, ["conformance", "--check", str(vectors_dir), "--client", client])
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()[1:-1]
    document = json.loads((vectors_dir / "vectors.json").read_text())
    assert [row.split()[0] for row in rows] == [vector["name"] for vector in document["vectors"]]
    assert all(row.split()[3] == "ok" for row in rows), result.output
    assert "All 7 conformance vectors passed" in result.output


def test_check_fails_the_16_bit_shift_and_names_the_vector(tiny_export_dir, vectors_dir, tmp_path) -> None:
    """A decoder that turns 16-bit samples into 8 bits as v >> 8 (sharp's rule) misses the gray16 vector only."""
    client = _python_client(tmp_path, tiny_export_dir, "shift")
    result = CliRunner().invoke(cli, ["conformance", "--check", str(vectors_dir), "--client", client])
    assert result.exit_code == 7, result.output
    failed = [row.split()[0] for row in result.output.splitlines() if "FAIL" in row]
    assert failed == ["gray16"], result.output
    assert "1 of 7 conformance vectors failed: gray16" in result.output


def test_check_reports_a_crashing_client_per_vector(vectors_dir, tmp_path) -> None:
    import sys

    client = f"{sys.executable} -c 'import sys; sys.exit(\"Error: cannot decode \" + sys.argv[1])' {{image}}"
    result = CliRunner().invoke(cli, ["conformance", "--check", str(vectors_dir), "--client", client])
    assert result.exit_code == 7
    rows = result.output.splitlines()[1:8]
    assert all("FAIL: client exit 1: Error: cannot decode" in row for row in rows), result.output


def test_check_usage_errors(vectors_dir, tmp_path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["conformance", "--check", str(vectors_dir)]).exit_code == 2
    assert runner.invoke(cli, ["conformance", "--client", "x {image}"]).exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["conformance", "--check", str(empty), "--client", "x {image}"])
    assert result.exit_code == 2 and "no vectors.json" in result.output


def _cubic(x: float) -> float:
    """docs/portability.md, "The resize as formulas": Keys' cubic, a = -0.5."""
    a, x = -0.5, abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _resample_axis(pixels: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One pass of the documented resize along ``axis``: 22-bit fixed-point taps, uint8 after the pass."""
    import math

    source = np.moveaxis(pixels, axis, 0).astype(np.int64)
    scale = source.shape[0] / size
    widen = max(scale, 1.0)
    out = np.empty((size, *source.shape[1:]), np.int64)
    for o in range(size):
        center = (o + 0.5) * scale
        lo = max(math.trunc(center - 2 * widen + 0.5), 0)
        hi = min(math.trunc(center + 2 * widen + 0.5), source.shape[0])
        weights = [_cubic((i - center + 0.5) / widen) for i in range(lo, hi)]
        total = sum(weights)
        taps = [math.trunc(w / total * 2**22 + (0.5 if w >= 0 else -0.5)) for w in weights]
        out[o] = np.clip(((1 << 21) + np.tensordot(np.array(taps), source[lo:hi], axes=(0, 0))) >> 22, 0, 255)
    return np.moveaxis(out, 0, axis).astype(np.uint8)


@pytest.mark.parametrize(
    "in_size, out_size",
    [((130, 90), (64, 64)), ((97, 61), (64, 64)), ((61, 97), (64, 64)), ((300, 200), (96, 96)), ((40, 400), (40, 100))],
)
def test_documented_resize_formulas_equal_pillow(in_size, out_size) -> None:
    """The kernel, taps, fixed point, per-pass rounding and pass order that docs/portability.md spells out give
    Pillow's BICUBIC pixels exactly (vertical-first, horizontal-first and one-axis shapes)."""
    from PIL import Image

    (in_w, in_h), (out_w, out_h) = in_size, out_size
    pixels = np.random.default_rng(0).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)

    def horizontal(image: np.ndarray) -> np.ndarray:  # a pass whose axis keeps its size is skipped
        return image if image.shape[1] == out_w else _resample_axis(image, out_w, 1)

    def vertical(image: np.ndarray) -> np.ndarray:
        return image if image.shape[0] == out_h else _resample_axis(image, out_h, 0)

    vertical_first = (in_h - out_h) > 0 and (in_h - out_h) > 2 * (in_w - out_w)
    ours = horizontal(vertical(pixels)) if vertical_first else vertical(horizontal(pixels))
    pillow = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.BICUBIC))
    assert np.array_equal(ours, pillow)
