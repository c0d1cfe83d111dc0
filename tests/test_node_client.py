"""The Node.js reference client (clients/node) classifies and embeds like the Python path on the repo photos.

Skips only when node is absent; CI installs the client's packages with ``(cd clients/node && npm ci)``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pvt_deploy.runtime.runtime import Runtime

CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_client_matches_python(tiny_export_dir, photo_paths) -> None:
    assert (CLIENT_DIR / "node_modules").is_dir(), "run (cd clients/node && npm ci) first"
    completed = subprocess.run(
        [NODE, str(CLIENT_DIR / "pvt_client.mjs"), str(tiny_export_dir), *map(str, photo_paths), "--embed", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(path) for path in photo_paths]
    runtime = Runtime(tiny_export_dir)
    probabilities = runtime.classify(photo_paths)
    embeddings = runtime.embed(photo_paths)
    top = runtime.predict(photo_paths, top_k=3)
    for index, row in enumerate(rows):
        assert np.abs(np.asarray(row["probabilities"]) - probabilities[index]).max() <= 1e-4, row["image"]
        embedding = np.asarray(row["embedding"])
        cosine = embedding @ embeddings[index] / np.linalg.norm(embedding) / np.linalg.norm(embeddings[index])
        assert cosine >= 0.99999, row["image"]
        assert row["top"][0][0] == top[index][0][0]


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_client_bad_image_is_one_error_line(tiny_export_dir, tmp_path) -> None:
    assert (CLIENT_DIR / "node_modules").is_dir(), "run (cd clients/node && npm ci) first"
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    completed = subprocess.run(
        [NODE, str(CLIENT_DIR / "pvt_client.mjs"), str(tiny_export_dir), str(junk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("Error: ") and len(completed.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_node_client_passes_the_conformance_vectors(tiny_export_dir, tmp_path) -> None:
    """Palette with transparency, 16-bit gray and an ICC-tagged JPEG decode in Node as the contract says."""
    from pvt_deploy.conformance import write_conformance

    assert (CLIENT_DIR / "node_modules").is_dir(), "run (cd clients/node && npm ci) first"
    document = write_conformance(tiny_export_dir, tmp_path / "vectors")
    images = [str(tmp_path / "vectors" / vector["image"]) for vector in document["vectors"]]
    completed = subprocess.run(
        [NODE, str(CLIENT_DIR / "pvt_client.mjs"), str(tiny_export_dir), *images, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    for line, vector in zip(completed.stdout.splitlines(), document["vectors"], strict=True):
        record = vector["outputs"]["classify"]["probabilities"]
        expected = np.fromfile(tmp_path / "vectors" / record["file"], dtype="<f4").reshape(record["shape"])[0]
        got = np.asarray(json.loads(line)["probabilities"])
        assert np.abs(got - expected).max() <= document["tolerances"]["probabilities"]["max_abs"], vector["name"]
