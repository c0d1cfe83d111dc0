"""The Node.js reference client (clients/node) classifies and embeds like the Python path on the repo photos, and
passes the conformance vectors through ``pvt-deploy conformance --check``; so does the snippet in docs/portability.md.

The tests prepare the client themselves (``npm ci`` into clients/node, once per lockfile, under a file lock), so the
README's test command is all a checkout needs. They skip, saying why, where node or npm is absent or the install
cannot run (offline without an npm cache)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.runtime.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
CLIENT_DIR = REPO / "clients" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
INSTALLED_STAMP = ".pvt-deploy-installed"
"""Written into node_modules after a successful ``npm ci``: the sha256 of the package-lock.json it installed."""

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are needed for the Node client")


def npm_ci_environment() -> dict[str, str]:
    """onnxruntime-node's postinstall would download CUDA binaries; its CPU binaries ship in the package."""
    return {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "npm_config_audit": "false", "npm_config_fund": "false"}


def prepare_node_client(client_dir: Path = CLIENT_DIR) -> None:
    """``npm ci`` in ``client_dir`` unless node_modules already holds this package-lock.json's install; a file lock
    keeps two pytest sessions from installing into one checkout at once. Skips the calling test when it fails."""
    lock_hash = hashlib.sha256((client_dir / "package-lock.json").read_bytes()).hexdigest()
    stamp = client_dir / "node_modules" / INSTALLED_STAMP
    lock_path = (
        Path(tempfile.gettempdir()) / f"pvt-deploy-npm-ci-{hashlib.sha256(bytes(client_dir)).hexdigest()[:16]}.lock"
    )
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text().strip() == lock_hash:
            return
        try:
            completed = subprocess.run(
                [NPM, "ci", "--no-audit", "--no-fund"],
                cwd=client_dir,
                env=npm_ci_environment(),
                capture_output=True,
                text=True,
                timeout=600,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("`npm ci` in clients/node took over 10 minutes (no network?)")
        if completed.returncode != 0:
            said = (completed.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"`npm ci` in clients/node failed (offline without an npm cache?): {said}")
        stamp.write_text(lock_hash + "\n")


@pytest.fixture(scope="session")
def node_client() -> Path:
    """clients/node with its packages installed; the client script's path."""
    prepare_node_client()
    return CLIENT_DIR / "pvt_client.mjs"


@pytest.fixture(scope="module")
def vectors_dir(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pvt_deploy.runtime.conformance import write_conformance

    out = tmp_path_factory.mktemp("node-conformance") / "vectors"
    write_conformance(tiny_export_dir, out)
    return out


def test_node_client_matches_python(node_client, tiny_export_dir, photo_paths) -> None:
    completed = subprocess.run(
        [NODE, str(node_client), str(tiny_export_dir), *map(str, photo_paths), "--embed", "--json"],
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


def test_node_client_bad_image_is_one_error_line(node_client, tiny_export_dir, tmp_path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    completed = subprocess.run(
        [NODE, str(node_client), str(tiny_export_dir), str(junk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert completed.stderr.startswith("Error: ") and len(completed.stderr.strip().splitlines()) == 1


def test_node_client_passes_the_conformance_vectors(node_client, tiny_export_dir, vectors_dir) -> None:
    """Palette with transparency, 16-bit gray and an ICC-tagged JPEG decode in Node as the contract says, judged
    by the project's own checker (probabilities and embedding within the vectors' tolerances)."""
    client = shlex.join([NODE, str(node_client), str(tiny_export_dir)]) + " {image} --json --embed"
    result = CliRunner().invoke(cli, ["conformance", "--check", str(vectors_dir), "--client", client])
    assert result.exit_code == 0, result.output
    document = json.loads((vectors_dir / "vectors.json").read_text())
    rows = result.output.splitlines()[1 : 1 + len(document["vectors"])]
    assert [row.split()[0] for row in rows] == [vector["name"] for vector in document["vectors"]]
    assert all(row.split()[3] == "ok" for row in rows), result.output


def docs_node_snippet() -> str:
    """The ```js block of docs/portability.md: a whole program, run here as written."""
    text = (REPO / "docs" / "portability.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```js\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "docs/portability.md should hold exactly one ```js snippet"
    return blocks[0]


@pytest.fixture
def docs_snippet(node_client, tmp_path) -> Path:
    """The docs' snippet saved as a module that resolves its imports from clients/node/node_modules."""
    folder = tmp_path / "snippet"
    folder.mkdir()
    (folder / "node_modules").symlink_to(CLIENT_DIR / "node_modules", target_is_directory=True)
    (folder / "package.json").write_text('{"type": "module"}\n')
    script = folder / "classify.mjs"
    script.write_text(docs_node_snippet())
    return script


def test_docs_node_snippet_passes_every_vector(docs_snippet, tiny_export_dir, vectors_dir) -> None:
    """The snippet a porter copies decodes 16-bit PNGs as round(v / 257) (sharp alone gives v >> 8)."""
    client = shlex.join([NODE, str(docs_snippet), str(tiny_export_dir)]) + " {image}"
    result = CliRunner().invoke(cli, ["conformance", "--check", str(vectors_dir), "--client", client])
    assert result.exit_code == 0, result.output


def test_prepare_reinstalls_when_the_lockfile_changes(node_client, tmp_path, monkeypatch) -> None:
    """The stamp ties node_modules to one package-lock.json: a different lockfile means `npm ci` runs again."""
    calls: list[list[str]] = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    client_dir = tmp_path / "client"
    (client_dir / "node_modules").mkdir(parents=True)
    (client_dir / "package-lock.json").write_text('{"lockfileVersion": 3}')
    monkeypatch.setattr(subprocess, "run", fake_run)
    prepare_node_client(client_dir)
    prepare_node_client(client_dir)
    assert len(calls) == 1 and calls[0][1] == "ci"
    (client_dir / "package-lock.json").write_text('{"lockfileVersion": 3, "changed": true}')
    prepare_node_client(client_dir)
    assert len(calls) == 2


def test_node_client_marks_untrained_answers(node_client, tiny_export_dir, photo_paths, tmp_path) -> None:
    """Issue: the Node client's output did not say an export's weights are random; pvt-deploy predict does."""
    untrained = Path(shutil.copytree(tiny_export_dir, tmp_path / "untrained"))
    manifest = json.loads((untrained / "manifest.json").read_text())
    manifest["random_weights"] = True  # not a checksummed file: the runtime reads the flag from here
    (untrained / "manifest.json").write_text(json.dumps(manifest))
    image = str(photo_paths[0])
    as_json = subprocess.run(
        [NODE, str(node_client), str(untrained), image, "--json"], capture_output=True, text=True, timeout=60
    )
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["random_weights"] is True
    as_text = subprocess.run(
        [NODE, str(node_client), str(untrained), image], capture_output=True, text=True, timeout=60
    )
    assert as_text.stdout.splitlines()[0] == "# RANDOM WEIGHTS (untrained): these answers are meaningless"
    trained = subprocess.run(
        [NODE, str(node_client), str(tiny_export_dir), image, "--json"], capture_output=True, text=True, timeout=60
    )
    assert "random_weights" not in json.loads(trained.stdout)
