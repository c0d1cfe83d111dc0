"""``conformance``: write test vectors for implementations of the preprocessing contract in other languages."""

from __future__ import annotations

from pathlib import Path

import click

from pvt_deploy.conformance import write_conformance


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def conformance(model_dir: Path, out_dir: Path, force: bool) -> None:
    """Images in every Pillow mode family with their expected resized pixels, input tensors and graph outputs,
    plus a README saying how to check an implementation against them (torch-free)."""
    document = write_conformance(model_dir, out_dir, force=force)
    click.echo(f"Wrote {len(document['vectors'])} conformance vectors to {out_dir}")
