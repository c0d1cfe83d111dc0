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
