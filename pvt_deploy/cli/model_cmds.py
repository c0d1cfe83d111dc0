"""``pvt-deploy download``: fetch a published checkpoint into the cache (torch-free)."""

from __future__ import annotations

import click

from pvt_deploy import hub

_HELP = (
    "Download published weights NAME (sha256-verified, atomic) into the cache and print the local path. "
    f"NAME is one of: {', '.join(sorted(hub.PUBLISHED))}. A verified cached copy is reused."
)


@click.command("download", help=_HELP)
@click.argument("name", type=click.Choice(sorted(hub.PUBLISHED)), metavar="NAME")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help=f"Cache folder (default: ${hub.CACHE_ENV} or ~/.cache/pvt-deploy).",
)
@click.option("--base-url", default=None, help=f"Download from this base URL instead (also ${hub.BASE_URL_ENV}).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=hub.DEFAULT_TIMEOUT,
    show_default=True,
    help=f"Seconds the whole download may take; any single read gives up after {hub.READ_TIMEOUT:g} s of silence.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def download(name: str, cache_dir: str | None, base_url: str | None, timeout: float, quiet: bool) -> None:
    path = hub.download(name, cache_dir=cache_dir, base_url=base_url, progress=not quiet, timeout=timeout)
    click.echo(str(path))
