"""What ``pvt-deploy info`` reports about an exported folder, as data: Python callers and services reuse it.

It validates exactly what ``Runtime`` validates (the typed manifest, the checksums, and each graph loaded and
compared with the manifest), so ``info`` says OK only for folders the runtime accepts."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from pvt_deploy.errors import ModelDirError
from pvt_deploy.format.manifest import GraphEntry, Manifest, TensorSpec, file_problems, load_manifest


def graph_problems(manifest: Manifest) -> dict[str, str]:
    """Each graph file (image-input graphs too) that fails to load or disagrees with the manifest, with the reason
    (CPU sessions)."""
    from pvt_deploy.runtime.runtime import Runtime

    problems: dict[str, str] = {}
    runtimes = [(precision, "python") for precision in manifest.precisions]
    if manifest.image_graphs:
        runtimes.append(("fp32", "graph"))
    for precision, mode in runtimes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            runtime = Runtime(manifest.model_dir, device="cpu", precision=precision, preprocess=mode)
        entries = manifest.image_graphs if mode == "graph" else {g: runtime.graph_entry(g) for g in runtime.graphs}
        for graph, entry in entries.items():
            try:
                runtime.load([graph])
            except ModelDirError as exc:
                problems[entry.file] = str(exc).removeprefix(f"{manifest.model_dir}/")
    return problems


def _entry_json(entry: GraphEntry) -> dict[str, Any]:
    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs]

    return {"file": entry.file, "inputs": tensors(entry.inputs), "outputs": tensors(entry.outputs)}


def folder_summary(model_dir: str | os.PathLike[str], *, check_graphs: bool = True) -> dict[str, Any]:
    """Model, input, classes, graphs and a check of every file; ``problems`` maps a file to what is wrong with it.

    Raises ``ModelDirError`` when the manifest itself is unusable (the runtime would refuse it the same way)."""
    manifest = load_manifest(Path(model_dir))
    problems = file_problems(manifest)
    if not problems and check_graphs:
        problems = graph_problems(manifest)
    spec = manifest.input
    labels = manifest.labels
    return {
        "model_dir": str(model_dir),
        "model_name": manifest.model_name,
        "network": manifest.network,
        "random_weights": manifest.random_weights,
        "input": {
            "name": spec.name,
            "size": list(spec.size),
            "dynamic_size": spec.dynamic_size,
            "rgb_stats": spec.rgb_stats.as_dict(),
        },
        "num_classes": manifest.num_classes if manifest.num_classes is not None else (len(labels) if labels else None),
        "labels": len(labels) if labels is not None else None,
        "precisions": sorted(manifest.precisions),
        "graphs": {
            graph: {precision: _entry_json(entry) for precision, entry in variants.items()}
            for graph, variants in manifest.graphs.items()
        },
        "image_graphs": {graph: _entry_json(entry) for graph, entry in manifest.image_graphs.items()},
        "files": len(manifest.files),
        "checksums_ok": not problems,
        "problems": problems,
    }
