"""``verify_export``: run PyTorch and onnxruntime side by side on an exported folder and judge the difference.

It rebuilds the PyTorch model from the checkpoint the manifest names (checked by sha256) or, for a
random-weights export, from the recorded seed; feeds both real photos and seeded random inputs to every graph at
every precision present; and records the results in the manifest.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvt_deploy.errors import CheckpointError, ImageError, ModelDirError, VerificationError
from pvt_deploy.export.exporter import dynamic_check_sizes
from pvt_deploy.export.graphs import reference_all
from pvt_deploy.export.parity import GraphParity, output_metrics
from pvt_deploy.export.source import random_weights_model
from pvt_deploy.files import sha256_file
from pvt_deploy.format.manifest import Manifest, load_manifest, verify_files, write_manifest
from pvt_deploy.model.pvt_v2 import PVTv2
from pvt_deploy.preprocess import is_image_file
from pvt_deploy.runtime import Runtime

DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "tests" / "data" / "photos"
"""The six public-domain photos shipped with the repository (used when ``--images`` is not given)."""
RANDOM_BATCH = 3
RANDOM_SEED = 4321
PHOTO_BATCH = 8

Progress = Callable[[str], None]


@dataclass
class InputSet:
    """One named batch of model inputs with PyTorch's answers for it."""

    name: str
    array: np.ndarray
    reference: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class VerifyResults:
    folder: Path
    results: list[GraphParity]
    inputs: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        return [line for r in self.results for line in r.failures()]

    def to_json(self) -> dict[str, Any]:
        return {
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "passed": self.passed,
            "inputs": self.inputs,
            "results": {f"{r.graph}/{r.precision}": r.to_json() for r in self.results},
        }


def reference_model(manifest: Manifest, folder: Path, checkpoint: str | Path | None) -> tuple[PVTv2, str]:
    """The PyTorch model the folder was exported from, and a line saying where it came from."""
    eps = manifest.layer_norm_eps if manifest.layer_norm_eps is not None else 1e-6
    source = manifest.source
    if manifest.random_weights and checkpoint is None:
        spec = source.random_weights
        if spec is None:
            raise ModelDirError(f"{folder}: random-weights export without its seed in the manifest")
        model = random_weights_model(spec.network, spec.num_classes, spec.size, eps, spec.seed)
        return model, f"random weights regenerated from seed {spec.seed}"
    from pvt_deploy.model.checkpoint import load_checkpoint

    if checkpoint is None:
        recorded = source.path
        if not recorded:
            raise CheckpointError(f"{folder}: the manifest records no source checkpoint; pass --checkpoint")
        path = Path(recorded)
        if not path.is_file():
            raise CheckpointError(f"source checkpoint {path} (from the manifest) is missing; pass --checkpoint")
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"--checkpoint {path}: no such file")
    expected = source.sha256
    if expected and sha256_file(path) != expected:
        raise CheckpointError(f"{path} is not the checkpoint {folder} was exported from (sha256 differs)")
    loaded = load_checkpoint(path, network=manifest.network, layer_norm_eps=eps)
    return loaded.model, f"checkpoint {path}"


def _image_files(images: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if images is None:
        return sorted(p for p in DEFAULT_PHOTOS.glob("*") if is_image_file(p))
    items = [images] if isinstance(images, (str, Path)) else list(images)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise ImageError(f"--images {path}: no images found")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ImageError(f"--images {path}: no such file or folder")
    return files


def input_sets(runtime: Runtime, files: list[Path]) -> list[InputSet]:
    """The photos through the runtime's own input pipeline (so verify tests it too), plus seeded random inputs."""
    spec = runtime.manifest.input
    sets: list[InputSet] = []
    for start in range(0, len(files), PHOTO_BATCH):
        chunk = files[start : start + PHOTO_BATCH]
        sets.append(InputSet(f"photos[{start}:{start + len(chunk)}]", runtime.preprocess(chunk)))
    rng = np.random.default_rng(RANDOM_SEED)
    sizes = [spec.size]
    if spec.dynamic_size:
        sizes += [s for s in dynamic_check_sizes(spec.size) if s != spec.size]  # type: ignore[arg-type]
    for other in sizes:
        array = rng.standard_normal((RANDOM_BATCH, 3, *other), dtype=np.float32)
        sets.append(InputSet(f"random {RANDOM_BATCH}x3x{other[0]}x{other[1]}", array))
    return sets


def verify_export(
    folder: str | Path,
    *,
    checkpoint: str | Path | None = None,
    images: str | Path | Iterable[str | Path] | None = None,
    progress: Progress | None = None,
    write: bool = True,
) -> VerifyResults:
    """Compare every graph and precision in ``folder`` with PyTorch; raises ``VerificationError`` on a failed
    threshold (after recording the results). A corrupted file raises ``ModelDirError`` before anything runs."""
    log = progress or (lambda message: None)
    folder = Path(folder)
    manifest = load_manifest(folder)
    verify_files(manifest)
    model, origin = reference_model(manifest, folder, checkpoint)
    log(f"PyTorch reference: {origin}")
    files = _image_files(images)  # type: ignore[arg-type]
    runtimes = {precision: Runtime(folder, device="cpu", precision=precision) for precision in manifest.precisions}
    sets = input_sets(runtimes["fp32" if "fp32" in runtimes else manifest.precisions[0]], files)
    log(f"Inputs: {len(files)} photo(s) and {sum(s.name.startswith('random') for s in sets)} random batch(es)")
    with torch.inference_mode():
        for input_set in sets:
            outputs = reference_all(model, torch.from_numpy(input_set.array))
            input_set.reference = {name: value.numpy() for name, value in outputs.items()}
    results: list[GraphParity] = []
    for graph, variants in manifest.graphs.items():
        for precision, entry in variants.items():
            session = runtimes[precision].session(graph)  # checked against the manifest like any runtime load
            names = tuple(name for name in entry.output_names if name in sets[0].reference)
            if not names:
                continue
            result = GraphParity(graph, precision)
            for input_set in sets:
                got = session.run(input_set.array, names)
                for name in names:
                    result.add(name, output_metrics(name, input_set.reference[name], got[name]))
                result.runs.append(list(input_set.array.shape))
            results.append(result.judge())
            log(f"  {entry.file}: {'ok' if result.passed else 'FAILED'}")
    verification = VerifyResults(
        folder,
        results,
        {
            "photos": [p.name for p in files],
            "random": [s.name for s in sets if s.name.startswith("random")],
            "reference": origin,
        },
    )
    if write:
        write_manifest(folder, replace(manifest, parity={**manifest.parity, "verify": verification.to_json()}))
    return verification


def format_table(verification: VerifyResults) -> str:
    """One row per graph, precision and output: max abs diff, worst cosine, top-1/top-5 agreement, verdict
    (``-`` where PARITY_THRESHOLDS holds no limit for that output at that precision)."""
    header = ("graph", "precision", "output", "max abs diff", "min cosine", "top-1", "top-5", "status")
    rows = [header]
    for result in verification.results:
        failed_kinds = {c.key.partition("_")[0] for c in result.checks if not c.passed}
        checked_kinds = {c.key.partition("_")[0] for c in result.checks}
        for name, metrics in result.outputs.items():
            kind = "features" if name.startswith("stage") else name
            top1 = metrics.get("top1_agreement")
            top5 = metrics.get("top5_agreement")
            rows.append(
                (
                    result.graph,
                    result.precision,
                    name,
                    f"{metrics['max_abs']:.2e}",
                    f"{metrics['cosine_min']:.9f}",
                    "" if top1 is None else f"{top1:.0%}",
                    "" if top5 is None else f"{top5:.0%}",
                    "FAIL" if kind in failed_kinds else ("ok" if kind in checked_kinds else "-"),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def raise_on_failure(verification: VerifyResults) -> None:
    if not verification.passed:
        failures = verification.failures()
        raise VerificationError(f"{len(failures)} parity check(s) failed: {'; '.join(failures)}")
