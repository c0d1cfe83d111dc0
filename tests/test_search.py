"""Search over embeddings (LanceDB): results equal brute force on a small set, the same from the CLI, and the
ANN index keeps recall on a larger synthetic set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.errors import SearchIndexError
from pvt_deploy.search import EmbeddingIndex

pytest.importorskip("lancedb")


def _embed_folder(folder: Path, vectors: np.ndarray, paths: list[str], run: dict | None = None) -> Path:
    """An `embed --out FOLDER` result, written directly."""
    folder.mkdir(parents=True)
    np.save(folder / "embeddings.npy", vectors.astype(np.float32))
    (folder / "paths.txt").write_text("".join(p + "\n" for p in paths))
    (folder / "run.json").write_text(json.dumps(run or {"task": "embed", "complete": True}))
    return folder


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = q @ unit.T
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=1)


def test_search_and_duplicates_equal_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    vectors[7] = vectors[3] * 2.5 + 0.01  # a near-duplicate at another scale: cosine ignores length
    paths = [f"img{i:03d}.jpg" for i in range(len(vectors))]
    store = EmbeddingIndex.build(_embed_folder(tmp_path / "emb", vectors, paths), tmp_path / "db")
    assert len(store) == 300 and store.info["ann"] is False
    queries = rng.standard_normal((5, 32)).astype(np.float32)
    expected_order, expected_similarity = _brute_force(vectors, queries, 10)
    for hits, order, similarity in zip(store.search(queries, 10), expected_order, expected_similarity, strict=True):
        assert [hit.path for hit in hits] == [paths[i] for i in order]
        np.testing.assert_allclose([hit.similarity for hit in hits], similarity, atol=1e-5)

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    all_pairs = unit @ unit.T
    rows, cols = np.nonzero(np.triu(all_pairs, 1) >= 0.6)
    pairs = store.duplicates(0.6)
    assert {(a, b) for a, b, _ in pairs} == {(paths[i], paths[j]) for i, j in zip(rows, cols, strict=True)}
    assert pairs[0][:2] == ("img003.jpg", "img007.jpg") and pairs[0][2] > 0.999


def test_cli_build_search_duplicates(tiny_export_dir: Path, photo_paths: list[Path], tmp_path: Path) -> None:
    runner = CliRunner()
    model = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    emb = tmp_path / "emb.parquet"
    assert (
        runner.invoke(
            cli, ["embed", str(model), *map(str, photo_paths), "--out", str(emb), "--device", "cpu"]
        ).exit_code
        == 0
    )
    db = tmp_path / "db"
    built = runner.invoke(cli, ["index", "build", str(emb), "--db", str(db)])
    assert built.exit_code == 0 and f"Indexed {len(photo_paths)} embeddings" in built.stderr
    again = runner.invoke(cli, ["index", "build", str(emb), "--db", str(db)])
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    found = runner.invoke(cli, ["search", "--db", str(db), str(photo_paths[2]), "-k", "3", "--json"])
    assert found.exit_code == 0, found.stderr
    (answer,) = json.loads(found.stdout)
    assert answer["neighbours"][0]["path"] == str(photo_paths[2]) and answer["neighbours"][0]["similarity"] > 0.9999
    assert len(answer["neighbours"]) == 3
    same = runner.invoke(cli, ["duplicates", "--db", str(db), "--threshold", "0.99999"])
    assert same.exit_code == 0 and same.stdout == "" and "0 pairs" in same.stderr
    missing = runner.invoke(cli, ["search", "--db", str(tmp_path / "nothing"), str(photo_paths[0])])
    assert missing.exit_code == SearchIndexError.exit_code
    assert missing.stderr.startswith("Error: ") and len(missing.stderr.splitlines()) == 1


@pytest.mark.slow
def test_ann_index_keeps_recall(tmp_path: Path) -> None:
    """Clustered synthetic vectors (like embeddings of similar photos); the IVF index must find >= 95% of the
    exact top 10."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 64))
    vectors = (centres[rng.integers(0, 50, 12_000)] + 0.5 * rng.standard_normal((12_000, 64))).astype(np.float32)
    paths = [f"v{i}" for i in range(len(vectors))]
    store = EmbeddingIndex.build(_embed_folder(tmp_path / "emb", vectors, paths), tmp_path / "db", ann="yes")
    assert store.info["ann"] is True
    queries = vectors[:50] + 0.1 * rng.standard_normal((50, 64)).astype(np.float32)
    expected, _ = _brute_force(vectors, queries, 10)
    found = store.search(queries, 10)
    recall = np.mean(
        [len({h.path for h in hits} & {paths[i] for i in row}) / 10 for hits, row in zip(found, expected, strict=True)]
    )
    assert recall >= 0.95


def test_cli_one_pair_and_aligned_negative_similarities(
    tiny_export_dir: Path, photo_paths: list[Path], tmp_path: Path
) -> None:
    from pvt_deploy import Runtime

    query = Runtime(tiny_export_dir, device="cpu").embed(photo_paths[0])[0]
    vectors = np.stack([query, -query, query * 2]).astype(np.float32)
    folder = _embed_folder(tmp_path / "emb", vectors, ["same.jpg", "opposite.jpg", "twice.jpg"])
    runner = CliRunner()
    db = tmp_path / "db"
    assert runner.invoke(cli, ["index", "build", str(folder), "--db", str(db)]).exit_code == 0
    found = runner.invoke(cli, ["search", "--db", str(db), "--model", str(tiny_export_dir), str(photo_paths[0])])
    assert found.exit_code == 0, found.stderr
    lines = found.stdout.splitlines()[1:]
    assert [line.split()[1] for line in lines][-1] == "opposite.jpg" and "-1.0" in lines[-1]
    assert len({line.index(".jpg") - len(line.split()[1]) + 4 for line in lines}) == 1  # paths in one column
    pairs = runner.invoke(cli, ["duplicates", "--db", str(db), "--threshold", "0.99"])
    assert pairs.exit_code == 0 and "1 pair at cosine similarity >= 0.99" in pairs.stderr
