"""``predict``, ``embed``, ``features`` and ``info``: the torch-free commands over an exported folder.

Exit codes: 0 all good; 4 (``ImageError``) some inputs failed, each named on stderr, the good ones still answered or
written; 5 (``ModelDirError``) the folder is missing, incomplete or fails its checksums; 10 (``DeviceError``) CUDA
was asked for and is not usable; 1 an output location in the way; 2 bad options (click).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from pvt_deploy import __version__
from pvt_deploy.errors import ImageError, ModelDirError, OutputError
from pvt_deploy.manifest import read_manifest, sha256_file
from pvt_deploy.runtime.embed_store import Chunk, EmbedStore, atomic_write_bytes
from pvt_deploy.runtime.results import BatchResult
from pvt_deploy.runtime.runtime import Runtime
from pvt_deploy.runtime.sessions import DEVICES
from pvt_deploy.staging import OutputLock, clean_stale_staging, describe_removed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""What ``embed`` picks up when walking a folder (case-insensitive). Files named directly are always tried."""

DEFAULT_CHUNK_SIZE = 256


def _runtime_options(func: Any) -> Any:
    options = [
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--precision", default="fp32", show_default=True, help="An exported precision (fp32, int8...)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Micro-batch size."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Runtime warnings (e.g. the CPU fallback) become one ``Warning: ...`` line instead of a Python warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            click.echo(f"Warning: {str(message).removeprefix('pvt-deploy: ')}", err=True)

        warnings.showwarning = show
        yield


def _open_runtime(model_dir: Path, device: str, precision: str, batch_size: int | None, threads: int | None) -> Runtime:
    return Runtime(model_dir, device=device, precision=precision, threads=threads, batch_size=batch_size)


def _report_errors(result: BatchResult[Any]) -> None:
    for error in result.errors:
        click.echo(f"Error: {error}", err=True)


def _fail_if_any(failed: int, total: int) -> None:
    if failed:
        raise ImageError(f"{failed} of {total} inputs failed (listed above)")


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", "-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@_runtime_options
def predict(
    model_dir: Path,
    images: tuple[str, ...],
    top_k: int,
    as_json: bool,
    device: str,
    precision: str,
    batch_size: int | None,
    threads: int | None,
) -> None:
    """Top-k labels for each IMAGE, in the order given. Bad images are named on stderr (exit 4); the rest are
    still answered."""
    with _warnings_as_lines():
        runtime = _open_runtime(model_dir, device, precision, batch_size, threads)
        top_k = min(top_k, len(runtime.labels))
        result = runtime.predict(list(images), top_k=top_k, on_error="collect")
    assert isinstance(result, BatchResult)
    errors = {error.index: str(error) for error in result.errors}
    if as_json:
        records = []
        for index, (path, answer) in enumerate(zip(images, result.value, strict=True)):
            if answer is None:
                records.append({"image": path, "error": errors[index]})
            else:
                records.append(
                    {"image": path, "predictions": [{"label": label, "probability": p} for label, p in answer]}
                )
        click.echo(json.dumps(records, indent=1))
    else:
        for path, answer in zip(images, result.value, strict=True):
            if answer is None:
                continue
            click.echo(path)
            for label, probability in answer:
                click.echo(f"  {probability:.6f}  {label}")
    _report_errors(result)
    _fail_if_any(len(result.errors), len(images))


def collect_inputs(paths: tuple[str, ...]) -> list[str]:
    """Files as given; folders walked recursively (sorted, image extensions only). A missing path stays in the
    list so it is reported as a failed input, not dropped."""
    found: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
            found.extend(str(p) for p in sorted(files, key=lambda p: p.as_posix()))
        else:
            found.append(given)
    return found


def _model_identity(runtime: Runtime) -> dict[str, Any]:
    graph = "embed" if "embed" in runtime.graphs else "classify"
    entry = runtime.manifest["graphs"][graph][runtime.precision]
    graph_file = entry["file"] if isinstance(entry, dict) else str(entry)
    return {
        "model_dir": str(runtime.model_dir.resolve()),
        "model_name": runtime.manifest.get("model_name"),
        "graph": graph_file,
        "graph_sha256": runtime.manifest["files"][graph_file]["sha256"],
        "precision": runtime.precision,
    }


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder (refused if it exists, unless --overwrite).",
)
@click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT.partial without redoing work.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already exists.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Inputs per saved chunk (the most work an interruption can lose).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@_runtime_options
def embed(
    model_dir: Path,
    paths: tuple[str, ...],
    out: Path,
    resume: bool,
    overwrite: bool,
    chunk_size: int,
    progress: bool | None,
    device: str,
    precision: str,
    batch_size: int | None,
    threads: int | None,
) -> None:
    """Embeddings for files and folders (recursively) into OUT/: embeddings.npy (N, D) float32, paths.txt (row i's
    source), errors.json (inputs that failed) and run.json. Interrupted runs resume with --resume."""
    with _warnings_as_lines(), OutputLock(out):  # a second run on OUT fails with one line naming this one's pid
        removed = clean_stale_staging(out.parent, out.name)
        if removed:
            click.echo(f"{out.parent}: {describe_removed(removed)}", err=True)
        runtime = _open_runtime(model_dir, device, precision, batch_size, threads)
        _embed_run(runtime, paths, out, resume, overwrite, chunk_size, progress)


def _embed_run(
    runtime: Runtime,
    paths: tuple[str, ...],
    out: Path,
    resume: bool,
    overwrite: bool,
    chunk_size: int,
    progress: bool | None,
) -> None:
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    store = EmbedStore(out)
    identity = _model_identity(runtime)
    inputs = collect_inputs(paths)
    if not inputs:
        raise ImageError(f"no images found in {', '.join(paths)} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    bad_names = [p for p in inputs if "\n" in p or "\r" in p]
    if bad_names:
        raise OutputError(f"cannot record paths containing line breaks in {out}/paths.txt: {bad_names[0]!r}")
    chunks: list[Chunk] = []
    if store.work.exists() and not resume:
        raise OutputError(f"an interrupted run is in {store.work}; pass --resume to continue it, or delete it")
    if resume and store.has_plan():
        plan = store.plan()
        if plan["model"] != identity:
            raise OutputError(f"{store.work} was started with another model or precision; delete it to start over")
        if plan["inputs"] != inputs:
            raise OutputError(f"the inputs differ from the interrupted run in {store.work}; delete it to start over")
        chunk_size = int(plan["chunk_size"])
        chunks = store.completed_chunks()
        done = chunks[-1].stop if chunks else 0
        click.echo(f"Resuming: {done} of {len(inputs)} inputs already done", err=True)
        for error in (error for chunk in chunks for error in chunk.errors):  # the final report stays complete
            click.echo(f"Error: {error['error']}", err=True)
    else:
        if resume:
            click.echo(f"Nothing to resume in {store.work}; starting a new run", err=True)
        store.start(inputs, identity, chunk_size)
    start = chunks[-1].stop if chunks else 0
    dim = _embedding_dim(runtime, store, chunks)
    show = sys.stderr.isatty() if progress is None else progress
    with click.progressbar(length=len(inputs), label="embed", file=sys.stderr if show else _NullFile()) as bar:
        bar.update(start)
        for chunk_start in range(start, len(inputs), chunk_size):
            chunk_paths = inputs[chunk_start : chunk_start + chunk_size]
            result = runtime.embed(chunk_paths, on_error="collect")
            assert isinstance(result, BatchResult)
            if result.errors and show:
                click.echo("", err=True)
            _report_errors(result)
            good = result.value[result.ok]
            dim = good.shape[1] if good.size else dim
            chunk = Chunk(
                index=len(chunks),
                start=chunk_start,
                stop=chunk_start + len(chunk_paths),
                paths=[p for p, ok in zip(chunk_paths, result.ok, strict=True) if ok],
                errors=[{"path": chunk_paths[e.index], "error": str(e)} for e in result.errors],
            )
            store.write_chunk(chunk, good.reshape(len(chunk.paths), dim))
            chunks.append(chunk)
            bar.update(len(chunk_paths))
    run_info = {**identity, "pvt_deploy_version": __version__, "inputs": len(inputs), "dim": dim}
    store.finalize(chunks, dim, run_info, overwrite)
    failed = sum(len(c.errors) for c in chunks)
    rows = sum(len(c.paths) for c in chunks)
    click.echo(f"Wrote {rows} embeddings ({dim}-d) to {out}" + (f"; {failed} failed" if failed else ""), err=True)
    _fail_if_any(failed, len(inputs))


def _embedding_dim(runtime: Runtime, store: EmbedStore, chunks: list[Chunk]) -> int:
    """The embedding width, known even when every input fails (the graph's static output shape)."""
    graph = "embed" if "embed" in runtime.graphs else "classify"
    for output in runtime.session(graph).session.get_outputs():
        if output.name == "embedding" and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
    for array in store.iter_chunk_arrays(chunks):
        return int(array.shape[1])
    return 0


class _NullFile:
    """A sink for the progress bar when it is off."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("image")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output .npz file.")
@_runtime_options
def features(
    model_dir: Path, image: str, out: Path, device: str, precision: str, batch_size: int | None, threads: int | None
) -> None:
    """stage1..stage4 feature maps (float32, NCHW with N=1) of IMAGE into OUT (.npz, written atomically)."""
    with _warnings_as_lines():
        runtime = _open_runtime(model_dir, device, precision, batch_size, threads)
        maps = runtime.features(image)
    assert isinstance(maps, dict)
    if out.is_dir():
        raise OutputError(f"{out} is a folder; --out needs a file name such as features.npz")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: no such folder")
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **maps)
    atomic_write_bytes(out, buffer.getvalue())
    shapes = ", ".join(f"{name} {tuple(array.shape)}" for name, array in maps.items())
    click.echo(f"Wrote {out}: {shapes}", err=True)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def info(model_dir: Path, as_json: bool) -> None:
    """Graphs, inputs/outputs, labels, precisions and a sha256 check of every file of an exported folder
    (exit 5 when a file is missing or changed)."""
    manifest = read_manifest(model_dir)
    problems: dict[str, str] = {}
    for name, record in (manifest.get("files") or {}).items():
        path = Path(model_dir) / name
        if not path.is_file():
            problems[name] = "missing"
        elif path.stat().st_size != record.get("size") or sha256_file(path) != record.get("sha256"):
            problems[name] = "checksum mismatch"
    labels = manifest.get("labels")
    summary = {
        "model_dir": str(model_dir),
        "model_name": manifest.get("model_name"),
        "network": manifest.get("network"),
        "random_weights": manifest.get("random_weights"),
        "input": {k: manifest.get("input", {}).get(k) for k in ("name", "size", "dynamic_size", "rgb_stats")},
        "num_classes": manifest.get("num_classes", len(labels) if isinstance(labels, list) else None),
        "labels": len(labels) if isinstance(labels, list) else None,
        "precisions": sorted({p for variants in (manifest.get("graphs") or {}).values() for p in variants}),
        "graphs": manifest.get("graphs") or {},
        "files": len(manifest.get("files") or {}),
        "checksums_ok": not problems,
        "problems": problems,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        _print_info(summary)
    if problems:
        first = next(iter(problems.items()))
        raise ModelDirError(f"{model_dir}: {len(problems)} file(s) fail the manifest check ({first[0]}: {first[1]})")


def _format_io(values: Any) -> str:
    if not isinstance(values, list):
        return "?"
    parts = []
    for value in values:
        if isinstance(value, dict):
            shape = "x".join(str(d) for d in value.get("shape", []))
            parts.append(f"{value.get('name')}[{shape}] {value.get('dtype', value.get('type', ''))}".strip())
        else:
            parts.append(str(value))
    return ", ".join(parts)


def _print_info(summary: dict[str, Any]) -> None:
    echo = click.echo
    echo(f"model:      {summary['model_name']} ({summary['network']})")
    if summary["random_weights"]:
        echo("weights:    RANDOM (exported with --random-weights; answers are meaningless)")
    size = summary["input"].get("size") or ["?", "?"]
    dynamic = " (dynamic size)" if summary["input"].get("dynamic_size") else ""
    echo(f"input:      {summary['input'].get('name')} float32 NCHW, {size[0]}x{size[1]}{dynamic}")
    echo(f"classes:    {summary['num_classes']} (labels: {summary['labels']})")
    echo(f"precisions: {', '.join(summary['precisions'])}")
    for graph, variants in summary["graphs"].items():
        for precision, entry in variants.items():
            entry = entry if isinstance(entry, dict) else {"file": entry}
            echo(f"graph:      {graph} [{precision}] {entry.get('file')}")
            echo(f"              in:  {_format_io(entry.get('inputs'))}")
            echo(f"              out: {_format_io(entry.get('outputs'))}")
    if summary["checksums_ok"]:
        echo(f"checksums:  OK ({summary['files']} files)")
    else:
        for name, problem in summary["problems"].items():
            echo(f"checksums:  FAILED {name}: {problem}")


__all__ = ["collect_inputs", "embed", "features", "info", "predict"]
