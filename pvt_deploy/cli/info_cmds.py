"""``info``: describe an exported folder and check it the way the runtime does (exit 5 when it would refuse it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pvt_deploy.errors import ModelDirError
from pvt_deploy.runtime.info import folder_summary


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def info(model_dir: Path, as_json: bool) -> None:
    """Graphs, inputs/outputs, labels, precisions and a sha256 check of every file of an exported folder, each
    graph loaded and compared with the manifest (exit 5 when a file is missing, changed or not what the manifest
    says)."""
    summary = folder_summary(model_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        _print_info(summary)
    problems = summary["problems"]
    if problems:
        first = next(iter(problems.items()))
        raise ModelDirError(f"{model_dir}: {len(problems)} file(s) fail the manifest check ({first[0]}: {first[1]})")


def _format_io(values: list[dict[str, Any]]) -> str:
    return ", ".join(f"{v['name']}[{'x'.join(str(d) for d in v['shape'])}] {v['dtype']}" for v in values)


def _print_info(summary: dict[str, Any]) -> None:
    echo = click.echo
    echo(f"model:      {summary['model_name']} ({summary['network']})")
    if summary["random_weights"]:
        echo("weights:    RANDOM (exported with --random-weights; answers are meaningless)")
    size = summary["input"]["size"]
    dynamic = " (dynamic size)" if summary["input"]["dynamic_size"] else ""
    echo(f"input:      {summary['input']['name']} float32 NCHW, {size[0]}x{size[1]}{dynamic}")
    echo(f"classes:    {summary['num_classes']} (labels: {summary['labels']})")
    echo(f"precisions: {', '.join(summary['precisions'])}")
    for graph, variants in summary["graphs"].items():
        for precision, entry in variants.items():
            echo(f"graph:      {graph} [{precision}] {entry['file']}")
            echo(f"              in:  {_format_io(entry['inputs'])}")
            echo(f"              out: {_format_io(entry['outputs'])}")
    for graph, entry in summary["image_graphs"].items():
        echo(f"graph:      {graph} [image input] {entry['file']}")
        echo(f"              in:  {_format_io(entry['inputs'])}")
    if summary["checksums_ok"]:
        echo(f"checksums:  OK ({summary['files']} files)")
    else:
        for name, problem in summary["problems"].items():
            echo(f"checksums:  FAILED {name}: {problem}")


__all__ = ["info"]
