"""``pvt-deploy bench``: PyTorch against onnxruntime variants in one interleaved run (needs torch)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from pvt_deploy.errors import BenchError

QUICK_NETWORK = "pvt_v2_tiny"
QUICK_SIZE = (64, 64)


def _int_list(option: str, value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"{option} {value!r}: expected comma-separated integers") from None
    if not numbers or any(n < 1 for n in numbers):
        raise BenchError(f"{option} {value!r}: expected positive integers")
    return numbers


def _quick_export(folder: Path) -> Path:
    """A seeded tiny random-weights export with an int8 variant: the small config CI benches."""
    from pvt_deploy.export.exporter import export_model

    out = folder / QUICK_NETWORK
    export_model(
        QUICK_NETWORK,
        out,
        random_weights=True,
        size=QUICK_SIZE,
        precisions=("fp32", "int8"),
        calib_dir=_default_images(),
    )
    return out


def _default_images() -> Path | None:
    """The repository's real photos when run from a checkout; otherwise bench uses seeded noise."""
    for candidate in (Path("tests/data/photos"), Path(__file__).resolve().parents[2] / "tests" / "data" / "photos"):
        if candidate.is_dir():
            return candidate
    return None


@click.command("bench")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma list of batch sizes.")
@click.option("--threads", "threads", default=None, help="Comma list of thread counts [all logical CPUs].")
@click.option("--precision", "precisions", default=None, help="Comma list of exported precisions [all exported].")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)
@click.option("--images", type=click.Path(path_type=Path), help="Images for inputs and fidelity [tests/data/photos].")
@click.option("--eager/--no-eager", default=True, show_default=True, help="Time PyTorch eager (the reference).")
@click.option("--compile/--no-compile", "use_compile", default=None, help="Time torch.compile [on; off with --quick].")
@click.option("--compile-timeout", default=240.0, show_default=True, help="Seconds torch.compile may take.")
@click.option("--warmup", default=1, show_default=True, help="Untimed calls per variant and batch size.")
@click.option("--rounds", type=int, help="Timed interleaved rounds per batch size [from --budget].")
@click.option("--budget", "budget_s", default=360.0, show_default=True, help="Steady-state seconds per thread setting.")
@click.option("--micro-batch", type=int, help="Runtime micro-batch size [the runtime's choice].")
@click.option("--spin-wait", is_flag=True, help="Also time each CPU precision with spin-waiting threads ('-spin').")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="PyTorch weights, if not the manifest's source.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), help="JSON result [bench-<model>.json].")
@click.option("--plot", "out_png", type=click.Path(path_type=Path), help="PNG plot [next to the JSON].")
@click.option("--quick", is_flag=True, help="Tiny config, batches 1,2, 2 rounds, no compile: checks bench works.")
def bench(
    model_dir: Path | None,
    batch_sizes: str,
    threads: str | None,
    precisions: str | None,
    device: str,
    images: Path | None,
    eager: bool,
    use_compile: bool | None,
    compile_timeout: float,
    warmup: int,
    rounds: int | None,
    budget_s: float,
    micro_batch: int | None,
    spin_wait: bool,
    checkpoint: Path | None,
    out_json: Path | None,
    out_png: Path | None,
    quick: bool,
) -> None:
    """Time MODEL_DIR (an exported folder) against PyTorch; with --quick and no MODEL_DIR, a tiny seeded export.

    Variants run interleaved call by call, warm-up apart from the steady state; prints a table and writes JSON
    and a PNG plot. Speeds are only comparable within one run (the ratios are what carry over)."""
    from tqdm import tqdm

    from pvt_deploy.bench.report import format_table, write_json, write_plot
    from pvt_deploy.bench.run import BenchConfig, run_bench

    if quick:
        batch_sizes = batch_sizes if batch_sizes != "1,8,32" else "1,2"
        rounds = rounds or 2
        use_compile = bool(use_compile)
        budget_s = min(budget_s, 10.0)
    if use_compile is None:
        use_compile = True
    batch_list = _int_list("--batch-sizes", batch_sizes)
    thread_list = _int_list("--threads", threads) if threads else None
    if rounds is not None and rounds < 1:
        raise BenchError("--rounds must be >= 1")
    if micro_batch is not None and micro_batch < 1:
        raise BenchError("--micro-batch must be >= 1")
    images = images if images is not None else _default_images()
    if images is not None and not Path(images).is_dir():
        raise BenchError(f"--images {images}: not a folder")

    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            if not quick:
                raise BenchError("give an exported MODEL_DIR (or --quick for a tiny seeded one)")
            click.echo(f"--quick: exporting a seeded {QUICK_NETWORK} at {QUICK_SIZE[0]}x{QUICK_SIZE[1]} ...")
            model_dir = _quick_export(Path(tmp))
        if not Path(model_dir).is_dir():
            raise BenchError(f"{model_dir}: not an exported folder")
        config = BenchConfig(
            model_dir=Path(model_dir),
            batch_sizes=batch_list,
            threads=thread_list or BenchConfig(Path(".")).threads,
            precisions=[p.strip() for p in precisions.split(",") if p.strip()] if precisions else None,
            device=device,
            eager=eager,
            compile=use_compile,
            compile_timeout_s=compile_timeout,
            images=images,
            warmup=warmup,
            rounds=rounds,
            budget_s=budget_s,
            micro_batch=micro_batch,
            spin_wait=spin_wait,
            checkpoint=checkpoint,
        )
        with tqdm(total=0, unit="call", leave=False, disable=None) as bar:
            result = run_bench(config, progress=lambda m: bar.write(m), bar=bar)
        name = result["model"]["name"] or Path(model_dir).name
        out_json = out_json or Path(f"bench-{name}.json")
        out_png = out_png or out_json.with_suffix(".png")
        write_json(result, out_json)
        write_plot(result, out_png)
    click.echo(format_table(result))
    click.echo(f"wrote {out_json} and {out_png} ({result['wall_s']:.0f} s)")
