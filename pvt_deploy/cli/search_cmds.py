"""``index build``, ``search`` and ``duplicates``: nearest neighbours and near-duplicates over ``embed`` outputs
(LanceDB; the ``[bulk]`` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pvt_deploy.errors import ImageError, SearchIndexError
from pvt_deploy.jobs import collect_inputs
from pvt_deploy.runtime import Runtime
from pvt_deploy.search import EmbeddingIndex


@click.group("index")
def index() -> None:
    """Build a search store from embeddings."""


@index.command("build")
@click.argument("embeddings", type=click.Path(path_type=Path))
@click.option("--db", type=click.Path(path_type=Path), required=True, help="The store's folder (created).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--ann", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="An IVF index (approximate, fast on large stores); auto: from 50,000 rows.")  # fmt: skip
def build(embeddings: Path, db: Path, overwrite: bool, ann: str) -> None:
    """Load EMBEDDINGS (an `embed --out` result: .parquet, .jsonl or a folder) into a store at --db."""
    store = EmbeddingIndex.build(embeddings, db, overwrite=overwrite, ann=ann)
    kind = "an IVF index" if store.info["ann"] else "exact search"
    click.echo(f"Indexed {len(store)} embeddings ({store.info['dim']}-d, {kind}) into {db}", err=True)


def _model_for(store: EmbeddingIndex, model_dir: Path | None) -> Path:
    found = model_dir or store.model_dir
    if found is None:
        raise SearchIndexError(f"{store.db}: records no model folder; pass --model")
    return found


@click.command("search")
@click.argument("images", nargs=-1, required=True)
@click.option("--db", type=click.Path(path_type=Path), required=True, help="A store made by `index build`.")
@click.option("-k", "top", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per image.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="The exported model that embeds IMAGES [the one the store's embeddings came from].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def search(images: tuple[str, ...], db: Path, top: int, model_dir: Path | None, as_json: bool) -> None:
    """The -k most similar stored images (cosine similarity) for each IMAGE. Cosine similarity ignores length, so
    it does not matter whether the store was built from raw or --normalize'd embeddings."""
    store = EmbeddingIndex(db)
    runtime = Runtime(_model_for(store, model_dir))
    paths = collect_inputs(images)
    result = runtime.embed(paths, on_error="collect")
    for error in result.errors:
        click.echo(f"Error: {error}", err=True)
    good = [p for p, ok in zip(paths, result.ok, strict=True) if ok]
    hits = store.search(result.good(), top) if good else []
    if as_json:
        document = [{"image": p, "neighbours": [{"path": h.path, "similarity": h.similarity} for h in found]}
                    for p, found in zip(good, hits, strict=True)]  # fmt: skip
        click.echo(json.dumps(document, indent=1))
    else:
        for path, found in zip(good, hits, strict=True):
            click.echo(path)
            for hit in found:
                click.echo(f"  {_similarity(hit.similarity)}  {hit.path}")
    if result.errors:
        raise ImageError(f"{len(result.errors)} of {len(paths)} inputs failed (listed above)")


@click.command("duplicates")
@click.option("--db", type=click.Path(path_type=Path), required=True, help="A store made by `index build`.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.95, show_default=True,
              help="Cosine similarity at or above which two images are near-duplicates.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def duplicates(db: Path, threshold: float, as_json: bool) -> None:
    """Pairs of stored images at least --threshold similar, most similar first."""
    pairs = EmbeddingIndex(db).duplicates(threshold)
    if as_json:
        click.echo(json.dumps([{"a": a, "b": b, "similarity": s} for a, b, s in pairs], indent=1))
    else:
        for a, b, similarity in pairs:
            click.echo(f"{_similarity(similarity)}  {a}  {b}")
    noun = "pair" if len(pairs) == 1 else "pairs"
    click.echo(f"{len(pairs)} {noun} at cosine similarity >= {threshold}", err=True)


def _similarity(value: float) -> str:
    """A cosine similarity in a fixed width (room for the sign), so the paths after it stay in one column."""
    return f"{value:9.6f}"
