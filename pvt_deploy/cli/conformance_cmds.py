"""``conformance``: write test vectors for implementations of the preprocessing contract in other languages, or
check such an implementation (any program) against them."""

from __future__ import annotations

from pathlib import Path

import click

from pvt_deploy.errors import VerificationError
from pvt_deploy.runtime.conformance import CLIENT_OUTPUT, check_client, format_checks, read_vectors, write_conformance


@click.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Write the vectors of MODEL_DIR here.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--check",
    "vectors_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Check --client against the vectors in this folder (written by --out).",
)
@click.option(
    "--client",
    help="With --check: the command to run per vector, '{image}' where the image path goes. It prints "
    + CLIENT_OUTPUT
    + ", as its last line.",
)
@click.option("--timeout", default=120.0, show_default=True, help="With --check: seconds per client run.")
def conformance(
    model_dir: Path | None,
    out_dir: Path | None,
    force: bool,
    vectors_dir: Path | None,
    client: str | None,
    timeout: float,
) -> None:
    """Write conformance vectors (MODEL_DIR --out DIR) or check a client against them (--check DIR --client CMD).

    Writing: images in every Pillow mode family with their expected resized pixels, input tensors and graph
    outputs, plus a README saying how to check an implementation against them (torch-free).

    Checking: runs CMD on every vector image, compares its probabilities (and embedding, if it prints one) with the
    expected outputs within the folder's tolerances, prints a pass/fail table and exits 7 if any vector fails.

    \b
    pvt-deploy conformance exported/MODEL --out vectors/
    pvt-deploy conformance --check vectors/ --client 'node clients/node/pvt_client.mjs exported/MODEL {image} --json'
    """
    if vectors_dir is not None:
        if model_dir is not None or out_dir is not None or force:
            raise click.UsageError("--check takes no MODEL_DIR, --out or --force")
        if not client:
            raise click.UsageError("--check needs --client 'COMMAND {image}'")
        _check(vectors_dir, client, timeout)
        return
    if client is not None:
        raise click.UsageError("--client needs --check VECTORS_DIR")
    if model_dir is None or out_dir is None:
        raise click.UsageError("write vectors (MODEL_DIR --out DIR) or check a client (--check DIR --client CMD)")
    document = write_conformance(model_dir, out_dir, force=force)
    click.echo(f"Wrote {len(document['vectors'])} conformance vectors to {out_dir}")


def _check(vectors_dir: Path, client: str, timeout: float) -> None:
    try:
        tolerances = read_vectors(vectors_dir)["tolerances"]
        checks = check_client(vectors_dir, client, timeout=timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(format_checks(checks, tolerances))
    failed = [check.name for check in checks if not check.passed]
    if failed:
        raise VerificationError(f"{len(failed)} of {len(checks)} conformance vectors failed: {', '.join(failed)}")
    click.echo(f"All {len(checks)} conformance vectors passed")
