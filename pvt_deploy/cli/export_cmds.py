"""``pvt-deploy export`` and ``pvt-deploy verify`` (need torch and onnx; imported only when invoked)."""

from __future__ import annotations

from pathlib import Path

import click

from pvt_deploy import hub
from pvt_deploy.errors import DownloadError


def _echo(message: str) -> None:
    click.echo(message)


def _precision_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@click.command("export")
@click.argument("source")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output folder [exported/<model-name>/].")
@click.option(
    "--random-weights",
    is_flag=True,
    help="Offline try-out: untrained seeded weights; SOURCE is a network or published name.",
)
@click.option("--network", help="PVT v2 size, when it cannot be inferred from the weights.")
@click.option("--dynamic-size", is_flag=True, help="Make height and width dynamic too (multiples of 32).")
@click.option("--opset", type=int, help="ONNX opset [the measured default, see docs/export.md].")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), help="torch.onnx exporter [measured].")
@click.option("--precision", "precisions", default="fp32", show_default=True, help="Comma list: fp32,int8,fp16.")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path), help="Folder of images for int8 calibration.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--layer-norm-eps",
    type=float,
    help="LayerNorm eps [birder 0.8.4's 1e-6; the published weights were trained with 1e-5].",
)
def export(
    source: str,
    out_dir: Path | None,
    random_weights: bool,
    network: str | None,
    dynamic_size: bool,
    opset: int | None,
    exporter: str | None,
    precisions: str,
    calib_dir: Path | None,
    force: bool,
    layer_norm_eps: float | None,
) -> None:
    """Export SOURCE (a checkpoint path or published name) to classify/embed/features ONNX graphs.

    Every graph is run at batches 1, 2, 3 and 7 (and other sizes with --dynamic-size) and compared with PyTorch
    before the folder appears; a failure leaves nothing behind."""
    from pvt_deploy.export.exporter import export_model

    options = {} if layer_norm_eps is None else {"layer_norm_eps": layer_norm_eps}
    try:
        manifest = export_model(
            source,
            out_dir,
            random_weights=random_weights,
            network=network,
            dynamic_size=dynamic_size,
            opset=opset,
            exporter=exporter,
            precisions=_precision_list(precisions),
            calib_dir=calib_dir,
            force=force,
            progress=_echo,
            **options,
        )
    except DownloadError as exc:
        raise DownloadError(f"{exc}{_offline_hint(source)}") from None
    for name, record in manifest.files.items():
        click.echo(f"  {name:24s} {record.size / 1e6:8.2f} MB  sha256 {record.sha256[:16]}")
    if manifest.random_weights:
        click.echo("NOTE: random weights (untrained); the labels class_000.. are placeholders.")
    click.echo(f"Next: pvt-deploy predict {manifest.model_dir} IMAGE")


def _offline_hint(source: str) -> str:
    """What to do when the hub cannot be reached: the same network offline, or a checkpoint already on disk."""
    if source not in hub.PUBLISHED:
        return ""
    return (
        f". Offline? Try `pvt-deploy export {source} --random-weights` (untrained, same network) "
        "or pass a local checkpoint path"
    )


@click.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Source checkpoint [the manifest's source.path].")
@click.option(
    "--images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image files or folders (repeatable) [the repository's test photos].",
)
def verify(folder: Path, checkpoint: Path | None, images: tuple[Path, ...]) -> None:
    """Compare every graph and precision in FOLDER with PyTorch on real photos and random inputs.

    Prints max abs difference, cosine and top-1/top-5 agreement, records them in the manifest, and exits 7 if a
    parity threshold fails."""
    from pvt_deploy.export.verify import format_table, raise_on_failure, verify_export

    results = verify_export(folder, checkpoint=checkpoint, images=list(images) or None, progress=_echo)
    click.echo(format_table(results))
    raise_on_failure(results)
    click.echo(f"All parity checks passed; results written to {folder / 'manifest.json'}")
