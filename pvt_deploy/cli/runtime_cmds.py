"""``predict``, ``embed`` and ``features``: the torch-free commands over an exported folder, for one image or
millions. Argument parsing and printing only; the job itself is ``pvt_deploy.jobs``.

Exit codes: 0 all good (or a ``--resume`` of a finished job); 4 (``ImageError``) some inputs failed, each named on
stderr and kept as a row with its error; 5 (``ModelDirError``) the folder is missing, invalid or fails its
checksums; 10 (``DeviceError``) CUDA was asked for and is not usable; 1 an output in the way (exists, locked by
another run, or an unfinished run without ``--resume``) or a write that failed (a full disk: the rows are kept for
``--resume``); 2 bad usage (click, or ``UsageError``: no images given, a glob that matches nothing, a list that is
not text, ``--threads`` above the CPUs' bound); 130 interrupted (resume with ``--resume``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from pvt_deploy.cli import runtime_config
from pvt_deploy.decode_budget import DEFAULT_DECODE_BUDGET_BYTES, MB, process_decode_budget
from pvt_deploy.errors import ImageError, OutputError
from pvt_deploy.files import atomic_write_bytes
from pvt_deploy.jobs import (
    DEFAULT_CHUNK_SIZE,
    ENGINES,
    JobEvents,
    JobPlan,
    JobSpec,
    Part,
    collect_inputs,
    engine_named,
    iter_parts,
    label_indexes,
    prediction_lines,
    prediction_record,
    run_job,
)
from pvt_deploy.runtime.runtime import Runtime
from pvt_deploy.runtime.sessions import DEVICES


def _runtime_options(func: Any) -> Any:
    options = [
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--precision", default="fp32", show_default=True, help="An exported precision (fp32, int8...)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Micro-batch size."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads."),
        click.option(
            "--spin-wait",
            is_flag=True,
            help="Pool threads spin between ops: lower latency on a machine left to this job (docs/speed.md).",
        ),
        click.option(
            "--exif-transpose",
            is_flag=True,
            help="Rotate images per their EXIF orientation first (phone photos; birder does not). Recorded.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _input_options(func: Any) -> Any:
    options = [
        click.option(
            "--from-list",
            "from_list",
            multiple=True,
            metavar="FILE",
            help="Also read paths from FILE, one a line ('-' for standard input). Repeatable.",
        ),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or notices (errors still print)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _job_options(func: Any) -> Any:
    options = [
        click.option("--resume", is_flag=True, help="Continue the interrupted run in OUT.partial (done work is kept)."),
        click.option("--overwrite", is_flag=True, help="Replace OUT (or an interrupted run) if there is one."),
        click.option(
            "--chunk-size",
            type=click.IntRange(min=1),
            default=DEFAULT_CHUNK_SIZE,
            show_default=True,
            help="Inputs per saved part (the most work an interruption can lose).",
        ),
        click.option(
            "--engine",
            type=click.Choice(ENGINES),
            default="local",
            show_default=True,
            help="'ray': a Ray Data pipeline (decode tasks + an actor pool), on ADDRESS or a local Ray.",
        ),  # fmt: skip
        click.option("--address", default=None, help="With --engine ray: the Ray cluster to join."),
        click.option(
            "--actors",
            type=click.IntRange(min=1),
            default=None,
            help="With --engine ray: Runtime actors [one per CPU].",
        ),  # fmt: skip
        click.option(
            "--max-decode-mb",
            type=click.FloatRange(min=1),
            default=DEFAULT_DECODE_BUDGET_BYTES / MB,
            show_default=True,
            help="Decoded image memory in flight per process; decodes wait for room, a larger image is an error row.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _pop_job_options(options: dict[str, Any]) -> dict[str, Any]:
    """Split ``_job_options``' values from the runtime options click passed in the same ``**options``."""
    keys = ("resume", "overwrite", "chunk_size", "engine", "address", "actors", "max_decode_mb")
    return {key: options.pop(key) for key in keys}


def _limit_decoded_memory(job: dict[str, Any]) -> None:
    """``--max-decode-mb`` bounds this process's decoded-memory budget (and the Ray decode tasks', which take it)."""
    process_decode_budget().set_limit(int(job["max_decode_mb"] * MB))


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Runtime warnings become one ``Warning: ...`` line instead of a Python warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            click.echo(f"Warning: {str(message).removeprefix('pvt-deploy: ')}", err=True)

        warnings.showwarning = show
        yield


def _open_runtime(model_dir: Path, options: dict[str, Any]) -> Runtime:
    """A Runtime from the ``_runtime_options``, each named as its ``RuntimeConfig`` field (what every Ray actor is
    built from too)."""
    return Runtime(model_dir, runtime_config(**options))


class _Progress:
    """Per-image counts, rate and ETA on stderr (tqdm), only on a terminal and without --quiet."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty()
        self.quiet = quiet
        self.bar: Any = None

    def start(self, total: int, done: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=self.label, unit="img", file=sys.stderr, dynamic_ncols=True)

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            click.echo(text, err=True)

    def stdout(self, text: str) -> None:
        """Answers go to stdout; the bar (on stderr) is cleared around them so the two never interleave."""
        if self.bar is not None:
            self.bar.clear()
        click.echo(text)
        if self.bar is not None:
            self.bar.refresh()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.echo(text)

    def report_failures(self, part: Part) -> None:
        for row in part.failed:
            self.echo(f"Error: {row['error']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def events(self, on_part: Callable[[Part], None] | None = None) -> JobEvents:
        def part_done(part: Part) -> None:
            self.report_failures(part)
            if on_part is not None:
                on_part(part)

        return JobEvents(start=self.start, advance=self.advance, part=part_done, note=self.note)


def _fail_if_any(failed: int, total: int) -> None:
    if failed:
        raise ImageError(f"{failed} of {total} inputs failed (listed above)")


def _run_to_file(
    runtime: Runtime, spec: JobSpec, inputs: list[str], out: Path, label: str, quiet: bool, job: dict[str, Any]
) -> None:
    progress = _Progress(label, quiet)
    plan = JobPlan(spec, inputs, out, job["chunk_size"], resume=job["resume"], overwrite=job["overwrite"])
    engine = engine_named(job["engine"], job["address"], job["actors"])
    try:
        result = run_job(runtime, plan, engine, progress.events())
    finally:
        progress.close()
    if result.already_complete:
        click.echo(f"{out} is already complete ({result.rows} rows); nothing to do", err=True)
        return
    untrained = " (RANDOM WEIGHTS: untrained, answers are meaningless)" if runtime.manifest.random_weights else ""
    failed = f"; {len(result.failed)} failed" if result.failed else ""
    click.echo(f"Wrote {result.rows} rows to {out}{failed}{untrained}", err=True)
    _fail_if_any(len(result.failed), result.rows)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1)
@click.option("--top-k", "-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout (without --out).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Write rows to .jsonl, .csv or .parquet instead.")
@_input_options
@_job_options
@_runtime_options
def predict(model_dir: Path, images: tuple[str, ...], top_k: int, as_json: bool, out: Path | None,
            from_list: tuple[str, ...], quiet: bool, **options: Any) -> None:  # fmt: skip
    """Top-k labels for each IMAGE (files, folders, globs, --from-list), in order. Without --out, answers print
    as each chunk finishes; bad images are named on stderr (exit 4) and the rest are still answered."""
    job = _pop_job_options(options)
    _limit_decoded_memory(job)
    with _warnings_as_lines():
        inputs = collect_inputs(images, from_list)
        runtime = _open_runtime(model_dir, options)
        spec = JobSpec("predict", top_k=top_k)
        if out is not None:
            _run_to_file(runtime, spec, inputs, out, "predict", quiet, job)
            return
        if job["engine"] != "local" or job["resume"]:
            raise click.UsageError("--engine ray and --resume need --out")
        _predict_to_stdout(runtime, spec, inputs, as_json, quiet, job["chunk_size"])


def _predict_to_stdout(runtime: Runtime, spec: JobSpec, inputs: list[str], as_json: bool, quiet: bool,
                       chunk_size: int) -> None:  # fmt: skip
    untrained = runtime.manifest.random_weights
    label_index = label_indexes(runtime.labels)
    progress = _Progress("predict", quiet)
    progress.start(len(inputs), 0)
    records, failed = [], 0
    try:
        if untrained and not as_json:
            click.echo("# RANDOM WEIGHTS (untrained): these answers are meaningless")
        for part in iter_parts(runtime, spec, inputs, chunk_size, progress.advance):
            progress.report_failures(part)
            failed += len(part.failed)
            if as_json:
                records.extend(prediction_record(row, untrained, label_index=label_index) for row in part.rows)
                continue
            lines = [line for row in part.rows if row["status"] == "ok" for line in prediction_lines(row)]
            if lines:
                progress.stdout("\n".join(lines))
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(records, indent=1))
    _fail_if_any(failed, len(inputs))


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="embeddings.parquet, .jsonl, or a folder (embeddings.npy + paths.txt + errors.json + run.json).",
)
@click.option("--normalize", is_flag=True, help="L2-normalise the embeddings (default: birder's raw embedding).")
@click.option("--top-k", "-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also store the top-k labels and probabilities of each image (Parquet / JSONL).")  # fmt: skip
@_input_options
@_job_options
@_runtime_options
def embed(model_dir: Path, paths: tuple[str, ...], out: Path, normalize: bool, top_k: int,
          from_list: tuple[str, ...], quiet: bool, **options: Any) -> None:  # fmt: skip
    """Embeddings of files, folders (recursively), globs and --from-list paths into OUT, written part by part;
    every input is a row, failed ones with their error. Interrupted runs continue with --resume."""
    job = _pop_job_options(options)
    _limit_decoded_memory(job)
    with _warnings_as_lines():
        inputs = collect_inputs(paths, from_list)
        runtime = _open_runtime(model_dir, options)
        if top_k and out.suffix.lower() not in (".parquet", ".jsonl"):
            raise click.UsageError("--top-k needs --out *.parquet or *.jsonl")
        spec = JobSpec("embed", top_k=top_k, normalize=normalize)
        _run_to_file(runtime, spec, inputs, out, "embed", quiet, job)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1)
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="A .npz file for one image, or a folder: an .npz per image, index.jsonl, run.json.")  # fmt: skip
@_input_options
@_job_options
@_runtime_options
def features(model_dir: Path, images: tuple[str, ...], out: Path, from_list: tuple[str, ...], quiet: bool,
             **options: Any) -> None:  # fmt: skip
    """stage1..stage4 feature maps (float32, NCHW with N=1 per image): one IMAGE into OUT.npz, or many into a
    folder, written part by part and resumable."""
    job = _pop_job_options(options)
    _limit_decoded_memory(job)
    with _warnings_as_lines():
        inputs = collect_inputs(images, from_list)
        runtime = _open_runtime(model_dir, options)
        if out.suffix.lower() == ".npz":
            _features_one(runtime, inputs, out, job["overwrite"])
            return
        _run_to_file(runtime, JobSpec("features"), inputs, out, "features", quiet, job)


def _features_one(runtime: Runtime, inputs: list[str], out: Path, overwrite: bool) -> None:
    if len(inputs) != 1:
        raise click.UsageError(f"a .npz --out holds one image's maps, got {len(inputs)} inputs; give a folder")
    if out.is_dir():
        raise OutputError(f"{out} is a folder; --out needs a file name such as features.npz")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such folder")
    result = runtime.features(inputs, on_error="collect")
    if result.errors:
        raise ImageError(str(result.errors[0]))
    maps = result.value
    buffer = io.BytesIO()
    np.savez(buffer, **maps)
    atomic_write_bytes(out, buffer.getvalue())
    shapes = ", ".join(f"{name} {tuple(array.shape)}" for name, array in maps.items())
    click.echo(f"Wrote {out}: {shapes}", err=True)


__all__ = ["embed", "features", "predict"]
