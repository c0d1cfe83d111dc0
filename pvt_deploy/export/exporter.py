"""``export_model``: checkpoint -> classify/embed/features ONNX graphs + manifest, verified before it returns.

Everything is written into a hidden sibling folder and renamed into place only after every graph has passed
its batch (and size) sweep against PyTorch, so an interrupted or failed export never leaves a partial folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pvt_deploy import __version__
from pvt_deploy.errors import ExportError, ModelDirError, OutputError, PvtDeployError
from pvt_deploy.export import onnx_io, precision, preprocess_graph
from pvt_deploy.export.graphs import reference_all, wrap
from pvt_deploy.export.parity import GraphParity, output_metrics
from pvt_deploy.export.source import ExportSource, resolve_export_source
from pvt_deploy.files import OutputLock, atomic_write_text
from pvt_deploy.format.codec import read_dataclass, to_json
from pvt_deploy.format.contract import METADATA_KEY as PREPROCESS_KEY
from pvt_deploy.format.contract import PreprocessContract
from pvt_deploy.format.manifest import (
    GRAPH_NAMES,
    GRAPH_OUTPUTS,
    IMAGE_INPUT_NAME,
    INPUT_NAME,
    MANIFEST_NAME,
    PRECISIONS,
    ExportRecord,
    FileRecord,
    GraphEntry,
    InputSpec,
    Manifest,
    MetadataKey,
    ResizeRule,
    RgbStats,
    SharedWeights,
    SourceRecord,
    TensorSpec,
    graph_filename,
    image_graph_filename,
    write_manifest,
)
from pvt_deploy.model.checkpoint import LoadedCheckpoint
from pvt_deploy.model.pvt_v2 import BIRDER_LAYER_NORM_EPS
from pvt_deploy.staging import (
    clean_stale_staging,
    describe_removed,
    raise_if_interrupted,
    staging_path,
    sticky_interrupts,
)

BATCH_SWEEP = (1, 2, 3, 7)
"""Batches every graph runs at after export; 2+ catches a batch size baked into a Reshape."""
DYNAMIC_SIZE_STEPS = (-4, -2, 0, 2)
"""--dynamic-size checks the export size plus these multiples of 32 (384 -> 256, 320, 384, 448)."""
SHARED_WEIGHTS_NAME = "weights.bin"
SHARE_WEIGHTS = True
"""One external-data file for the three fp32 graphs (measured in docs/export.md)."""
RESIZE_RULE = ResizeRule(interpolation="bicubic", center_crop=1.0, rule="see input.preprocess")
"""birder's inference_preset (center crop 1.0); the rules themselves are the contract at ``input.preprocess``."""
SWEEP_SEED = 1234
LABELS_NAME = "labels.txt"

Progress = Callable[[str], None]


def dynamic_check_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    """Sizes the --dynamic-size sweep runs: the export size and 32-multiples around it (never below 32)."""
    sizes = {(max(32, size[0] + 32 * step), max(32, size[1] + 32 * step)) for step in DYNAMIC_SIZE_STEPS}
    return sorted(sizes)


def default_out_dir(source: ExportSource) -> Path:
    suffix = "-random-weights" if source.random_weights else ""
    return Path("exported") / f"{source.model_name}{suffix}"


def ort_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session through the runtime's one session seam; a load failure is an ``ExportError``."""
    from pvt_deploy.runtime.sessions import create_session

    try:
        return create_session(path, threads=threads or None)
    except ModelDirError as exc:
        raise ExportError(f"{path.name}: {str(exc).removeprefix(f'{path}: ')}") from None


class ReferenceCache:
    """PyTorch outputs per (batch, size) input, computed once and shared by the three graphs."""

    def __init__(self, source: ExportSource) -> None:
        self.model = source.model
        self._cache: dict[tuple[int, int, int], tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        self._images: dict[str, dict[str, np.ndarray]] = {}

    def get(self, batch: int, size: tuple[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        key = (batch, *size)
        if key not in self._cache:
            generator = torch.Generator().manual_seed(SWEEP_SEED + 1000 * batch + size[0] + 7 * size[1])
            x = torch.randn(batch, 3, *size, generator=generator)
            outputs = {name: t.numpy() for name, t in reference_all(self.model, x).items()}
            self._cache[key] = (x.numpy(), outputs)
        return self._cache[key]

    def of_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """PyTorch outputs of given inputs (int8's photo check), computed once per distinct array."""
        import hashlib

        key = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        if key not in self._images:
            with torch.inference_mode():
                outputs = reference_all(self.model, torch.from_numpy(np.ascontiguousarray(images)))
            self._images[key] = {name: t.numpy() for name, t in outputs.items()}
        return self._images[key]


def sweep_cases(size: tuple[int, int], dynamic_size: bool) -> list[tuple[int, tuple[int, int]]]:
    cases = [(batch, size) for batch in BATCH_SWEEP]
    if dynamic_size:
        cases += [(2, other) for other in dynamic_check_sizes(size) if other != size]
    return cases


def sweep_parity(
    path: Path, graph: str, precision_name: str, cache: ReferenceCache, cases: Sequence[tuple[int, tuple[int, int]]]
) -> GraphParity:
    """Run the graph at every (batch, size) case and compare each output with PyTorch."""
    session = ort_session(path)
    result = GraphParity(graph, precision_name)
    for batch, size in cases:
        x, reference = cache.get(batch, size)
        try:
            got = session.run(list(GRAPH_OUTPUTS[graph]), {INPUT_NAME: x})
        except Exception as exc:
            raise ExportError(
                f"{path.name}: onnxruntime failed at batch {batch}, {size[0]}x{size[1]}: {onnx_io.first_line(exc)}"
            ) from exc
        for name, value in zip(GRAPH_OUTPUTS[graph], got, strict=True):
            try:
                result.add(name, output_metrics(name, reference[name], value))
            except ValueError as exc:
                raise ExportError(f"{path.name} at batch {batch}, {size[0]}x{size[1]}: {exc}") from None
        result.runs.append([batch, size[0], size[1]])
    return result.judge()


def graph_metadata(source: ExportSource, graph: str, precision_name: str, dynamic_size: bool) -> dict[str, str]:
    return {
        MetadataKey.LABELS: json.dumps(source.labels),
        MetadataKey.RGB_STATS: json.dumps(source.rgb_stats),
        MetadataKey.INPUT_SIZE: json.dumps(list(source.size)),
        MetadataKey.DYNAMIC_SIZE: "true" if dynamic_size else "false",
        MetadataKey.RESIZE: json.dumps(to_json(RESIZE_RULE)),
        PREPROCESS_KEY: json.dumps(to_json(preprocess_contract_for(source))),
        MetadataKey.LAYER_NORM_EPS: repr(float(source.layer_norm_eps)),
        MetadataKey.NETWORK: source.network,
        MetadataKey.GRAPH: graph,
        MetadataKey.PRECISION: precision_name,
        MetadataKey.SOURCE_SHA256: source.sha256,
        MetadataKey.BIRDER_VERSION: source.birder_version,
        MetadataKey.PVT_DEPLOY_VERSION: __version__,
        MetadataKey.RANDOM_WEIGHTS: "true" if source.random_weights else "false",
    }


def _parse_precisions(precisions: Iterable[str]) -> list[str]:
    wanted = [p.strip().lower() for p in precisions if p.strip()]
    unknown = [p for p in wanted if p not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    ordered = ["fp32"] + [p for p in PRECISIONS if p in wanted and p != "fp32"]
    return ordered


def _calibration_batches(calib_dir: Path | None, source: ExportSource, batch: int = 8) -> list[np.ndarray] | None:
    """Preprocessed real photos for int8 calibration; None without --calib (the variant maker then picks its
    calibration-free method)."""
    if calib_dir is None:
        return None
    from pvt_deploy.preprocess import Preprocessor, is_image_file

    calib_dir = Path(calib_dir)
    if not calib_dir.is_dir():
        raise ExportError(f"--calib {calib_dir}: not a folder")
    files = sorted(p for p in calib_dir.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise ExportError(f"--calib {calib_dir}: no images found")
    tensors = Preprocessor(tuple(source.size), dict(source.rgb_stats)).batch(files)  # the runtime's pipeline
    return [tensors[i : i + batch] for i in range(0, len(tensors), batch)]


def _try_optimize_fp32(path: Path, graph: str, log: Progress) -> tuple[dict[str, Any], Path | None]:
    """Apply the speed work's fp32 rewrite when it exists. Returns what happened and a backup of the simplified
    graph to fall back to if the rewritten one then fails its parity sweep (None when nothing changed)."""
    candidate = path.with_name(path.stem + ".optimized.onnx")
    try:
        description = precision.optimize_fp32(path, candidate)
    except Exception as exc:  # an optional speed-up must never break an export
        candidate.unlink(missing_ok=True)
        log(f"  {graph}: fp32 optimization skipped ({onnx_io.first_line(exc)})")
        return {"applied": False, "reason": f"optimize_fp32 failed: {onnx_io.first_line(exc)}"}, None
    backup = path.with_name(path.stem + ".simplified.onnx")
    path.replace(backup)
    candidate.replace(path)
    return {"applied": True, **(description or {})}, backup


def _finish_fp32_graph(
    path: Path, graph: str, metadata: dict[str, str], cache: ReferenceCache, cases: Sequence, backup: Path | None
) -> tuple[GraphParity, str | None]:
    """Stamp metadata, full-check and sweep the file as shipped; if an optimized graph fails, ship the simplified
    one instead (and say why). Raises ``ExportError`` when the graph to ship fails."""
    rejected = None
    for attempt in ("optimized", "simplified") if backup is not None else ("simplified",):
        if attempt == "simplified" and backup is not None:
            backup.replace(path)
            backup = None
        onnx_io.set_metadata(path, metadata)
        try:
            onnx_io.check_graph(path)
            result = sweep_parity(path, graph, "fp32", cache, cases)
        except ExportError as exc:
            if attempt == "optimized":
                rejected = str(exc)
                continue
            raise
        if result.passed:
            if backup is not None:
                backup.unlink()
            return result, rejected
        if attempt == "optimized":
            rejected = "parity: " + "; ".join(result.failures())
            continue
        raise ExportError(f"{graph}.onnx failed parity with PyTorch: {'; '.join(result.failures())}")
    raise AssertionError("unreachable")


def _versions() -> dict[str, str]:
    import onnxsim

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxsim": str(getattr(onnxsim, "__version__", "unknown")),
        "numpy": np.__version__,
        "pvt_deploy": __version__,
    }


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder")


def _move_into_place(tmp_dir: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished folder into place; with --force the old folder goes only after the new one is in."""
    raise_if_interrupted()  # a Ctrl-C that a library swallowed still stops the export before anything is replaced
    _check_destination(out_dir, force)
    old = None
    if out_dir.exists():
        old = staging_path(out_dir, "old")
        out_dir.rename(old)
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _staging_dir(out_dir: Path, log: Progress):
    """A hidden sibling folder that is removed on any failure, KeyboardInterrupt included, while ``out_dir`` is
    locked against a second run. Its name carries this process's pid and start time, so the next run removes the
    folder of a run that was killed (SIGKILL) and says so."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(out_dir):
        removed = clean_stale_staging(out_dir.parent, out_dir.name)
        if removed:
            log(f"{out_dir.parent}: {describe_removed(removed)}")
        tmp_dir = staging_path(out_dir, "partial")
        tmp_dir.mkdir()
        try:
            yield tmp_dir
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        finally:
            if tmp_dir.exists() and not out_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)


@dataclass
class ExportOptions:
    """The validated options of one export."""

    exporter: str
    opset: int
    simplifier: str
    dynamic_size: bool
    precisions: list[str]
    share_weights: bool
    image_graphs: bool
    calib_dir: Path | None


def _export_options(
    *,
    exporter: str | None,
    opset: int | None,
    simplifier: str | None,
    dynamic_size: bool,
    precisions: Iterable[str],
    share_weights: bool | None,
    image_graphs: bool,
    calib_dir: str | Path | None,
) -> ExportOptions:
    """Defaults filled in and every option checked before anything heavy is loaded."""
    options = ExportOptions(
        exporter=exporter or onnx_io.DEFAULT_EXPORTER,
        opset=opset or onnx_io.DEFAULT_OPSET,
        simplifier=simplifier or onnx_io.DEFAULT_SIMPLIFIER,
        dynamic_size=dynamic_size,
        precisions=_parse_precisions(precisions),
        share_weights=SHARE_WEIGHTS if share_weights is None else share_weights,
        image_graphs=image_graphs,
        calib_dir=Path(calib_dir) if calib_dir is not None else None,
    )
    if options.exporter not in onnx_io.EXPORTERS:
        raise ExportError(f"unknown exporter {options.exporter!r}; choose one of {', '.join(onnx_io.EXPORTERS)}")
    if not 7 <= options.opset <= 25:
        raise ExportError(f"--opset {options.opset} is outside the range torch can export (7..25)")
    if options.calib_dir is not None and not options.calib_dir.is_dir():
        raise ExportError(f"--calib {options.calib_dir}: not a folder")
    return options


def _export_fp32_graph(
    source: ExportSource,
    graph: str,
    tmp_dir: Path,
    options: ExportOptions,
    cache: ReferenceCache,
    cases: Sequence,
    log: Progress,
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Export, simplify, optimize and sweep one fp32 graph; returns its path, parity and steps record."""
    path = tmp_dir / graph_filename(graph)
    t0 = time.perf_counter()
    onnx_io.export_graph(
        wrap(source.model, graph),
        graph,
        path,
        size=source.size,
        dynamic_size=options.dynamic_size,
        exporter=options.exporter,
        opset=options.opset,
    )
    simplified = onnx_io.simplify_graph(path, options.simplifier)
    raise_if_interrupted()  # onnxsim's C++ swallows a KeyboardInterrupt raised in its Python callbacks
    optimized, backup = _try_optimize_fp32(path, graph, log)
    metadata = graph_metadata(source, graph, "fp32", options.dynamic_size)
    result, rejected = _finish_fp32_graph(path, graph, metadata, cache, cases, backup)
    if rejected:
        optimized = {"applied": False, "reason": f"rejected: {rejected}"}
        log(f"  {graph}: optimized fp32 graph rejected ({rejected}); shipping the simplified one")
    done = "exported, simplified, optimized" if optimized.get("applied") else "exported, simplified"
    log(f"  {graph}.onnx: {done} and matched PyTorch at {len(cases)} shapes ({time.perf_counter() - t0:.1f}s)")
    return path, result.to_json(), {"simplify": simplified, "optimize_fp32": optimized}


def _share_weights(
    paths: list[Path], fp32_graphs: dict[str, Path], source: ExportSource, cache: ReferenceCache, log: Progress
) -> dict[str, Any]:
    """One external-data file for ``paths``; every fp32 tensor graph is re-swept after the move."""
    sharing = onnx_io.share_external_weights(paths, SHARED_WEIGHTS_NAME)
    for graph, path in fp32_graphs.items():
        onnx_io.check_graph(path)
        reloaded = sweep_parity(path, graph, "fp32", cache, [(2, source.size)])
        if not reloaded.passed:
            raise ExportError(f"{path.name} changed after moving weights to {SHARED_WEIGHTS_NAME}")
    log(
        f"  weights shared in {SHARED_WEIGHTS_NAME}: {sharing['bytes_before'] / 1e6:.1f} MB -> "
        f"{sharing['bytes_after'] / 1e6:.1f} MB on disk"
    )
    return sharing


def _export_variants(
    source: ExportSource,
    fp32_graphs: dict[str, Path],
    options: ExportOptions,
    cache: ReferenceCache,
    cases: Sequence,
    parity: dict[str, Any],
    log: Progress,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every requested non-fp32 precision of every graph, each swept against its own thresholds."""
    variants: dict[tuple[str, str], dict[str, Any]] = {}
    if len(options.precisions) == 1:
        return variants
    calibration = _calibration_batches(options.calib_dir, source)
    for precision_name in options.precisions[1:]:
        choice = _int8_method_choice(fp32_graphs, calibration, log) if precision_name == "int8" else None
        for graph, fp32_path in fp32_graphs.items():
            variants[(graph, precision_name)] = _make_variant(
                fp32_path,
                graph,
                precision_name,
                source,
                options.dynamic_size,
                calibration,
                cache,
                cases,
                parity,
                log,
                choice,
            )
    return variants


def graph_entry(path: Path, variant: dict[str, Any] | None = None) -> GraphEntry:
    """The manifest entry of one written graph file: its inputs and outputs as the file declares them."""
    described = onnx_io.describe_io(path)

    def tensors(values: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name=v["name"], shape=tuple(v["shape"]), dtype=v["dtype"]) for v in values)

    return GraphEntry(
        file=path.name, inputs=tensors(described["inputs"]), outputs=tensors(described["outputs"]), variant=variant
    )


INT8_PHOTO_CHECK_IMAGES = 16
"""Calibration photos an int8 variant is also compared on: noise inputs rarely give a trained head the clear
margins at which a class must be kept (logits_flip_margin_max), real photos do."""


def _photo_parity(
    path: Path, graph: str, result: GraphParity, cache: ReferenceCache, batches: list[np.ndarray]
) -> GraphParity:
    """Add the calibration photos (one call per photo, as the runtime runs dynamic int8) to an int8 sweep and
    judge again."""
    photos = np.concatenate(batches)[:INT8_PHOTO_CHECK_IMAGES]
    reference = cache.of_images(photos)
    session = ort_session(path)
    names = list(GRAPH_OUTPUTS[graph])
    rows = [session.run(names, {INPUT_NAME: photos[i : i + 1]}) for i in range(len(photos))]
    for index, name in enumerate(names):
        got = np.concatenate([row[index] for row in rows])
        result.add(name, output_metrics(name, reference[name], got))
    result.runs.append([len(photos), *photos.shape[2:]])
    return result.judge()


def _int8_method_choice(
    fp32_graphs: dict[str, Path], calibration: list[np.ndarray] | None, log: Progress
) -> dict[str, Any]:
    """Time static against dynamic int8 on this machine (when calibration images allow static) on the classify
    graph; every graph then keeps the fastest method that passes its fidelity thresholds."""
    graph = "classify" if "classify" in fp32_graphs else next(iter(fp32_graphs))
    try:
        choice = precision.choose_int8_method(fp32_graphs[graph], calibration)
    except PvtDeployError as exc:
        raise type(exc)(f"{graph}: timing the int8 methods failed: {onnx_io.first_line(exc)}") from exc
    except Exception as exc:
        raise ExportError(
            f"{graph}: timing the int8 methods failed: {type(exc).__name__}: {onnx_io.first_line(exc)}"
        ) from exc
    log(f"  int8 method: {' before '.join(choice['order'])} ({choice['why']})")
    return choice


def _graph_entries(
    tmp_dir: Path, fp32_graphs: dict[str, Path], variants: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, dict[str, GraphEntry]]:
    graphs: dict[str, dict[str, GraphEntry]] = {}
    for graph, path in fp32_graphs.items():
        graphs.setdefault(graph, {})["fp32"] = graph_entry(path)
    for (graph, precision_name), description in variants.items():
        graphs[graph][precision_name] = graph_entry(tmp_dir / graph_filename(graph, precision_name), description)
    return graphs


def build_manifest(
    source: ExportSource,
    tmp_dir: Path,
    options: ExportOptions,
    graphs: dict[str, dict[str, GraphEntry]],
    image_graphs: dict[str, GraphEntry],
    parity: dict[str, Any],
    steps: dict[str, Any],
    sharing: dict[str, Any] | None,
    seconds: float,
) -> Manifest:
    """The manifest of a finished export folder (every file in ``tmp_dir`` is checksummed)."""
    stats = RgbStats(mean=tuple(source.rgb_stats["mean"]), std=tuple(source.rgb_stats["std"]))  # type: ignore[arg-type]
    default_choice = (options.exporter, options.opset) == (onnx_io.DEFAULT_EXPORTER, onnx_io.DEFAULT_OPSET)
    return Manifest(
        model_name=source.model_name,
        network=source.network,
        random_weights=source.random_weights,
        source=read_dataclass(SourceRecord, source.record, "source"),
        input=InputSpec(
            name=INPUT_NAME,
            size=tuple(source.size),  # type: ignore[arg-type]
            dynamic_size=options.dynamic_size,
            rgb_stats=stats,
            resize=RESIZE_RULE,
            preprocess=preprocess_contract_for(source),
        ),
        layer_norm_eps=float(source.layer_norm_eps),
        num_classes=len(source.labels),
        labels=tuple(source.labels),
        labels_file=LABELS_NAME,
        files={p.name: FileRecord.of(p) for p in sorted(tmp_dir.iterdir()) if p.is_file() and p.name != MANIFEST_NAME},
        graphs=graphs,
        image_graphs=image_graphs,
        export=ExportRecord(
            exporter=options.exporter,
            opset=options.opset,
            simplifier=options.simplifier,
            steps=steps,
            shared_weights=read_dataclass(SharedWeights, sharing, "export.shared_weights") if sharing else None,
            choice=onnx_io.EXPORTER_CHOICE if default_choice else {"why": "overridden with --exporter/--opset"},
            versions=_versions(),
            seconds=round(seconds, 1),
        ),
        parity=parity,
    )


def write_labels(folder: Path, labels: Sequence[str]) -> Path:
    """``labels.txt``: one class name per line, in class-index order (for clients that cannot read metadata)."""
    if any("\n" in label or "\r" in label for label in labels):
        raise ExportError("a class label contains a line break; labels.txt needs one label per line")
    return atomic_write_text(folder / LABELS_NAME, "".join(f"{label}\n" for label in labels), durable=False)


@sticky_interrupts()
def export_model(
    source_or_loaded: str | Path | LoadedCheckpoint,
    out_dir: str | Path | None = None,
    *,
    random_weights: bool = False,
    network: str | None = None,
    dynamic_size: bool = False,
    opset: int | None = None,
    exporter: str | None = None,
    simplifier: str | None = None,
    precisions: Iterable[str] = ("fp32",),
    calib_dir: str | Path | None = None,
    force: bool = False,
    layer_norm_eps: float = BIRDER_LAYER_NORM_EPS,
    size: tuple[int, int] | None = None,
    share_weights: bool | None = None,
    image_graphs: bool = True,
    progress: Progress | None = None,
) -> Manifest:
    """Export, check and verify; returns the manifest written to ``out_dir/manifest.json``.

    ``size`` only applies to random weights (a checkpoint exports at its signature's size). ``image_graphs``
    also writes ``classify.image.onnx`` and ``embed.image.onnx`` (uint8 image in, preprocessing inside)."""
    log = progress or (lambda message: None)
    options = _export_options(
        exporter=exporter,
        opset=opset,
        simplifier=simplifier,
        dynamic_size=dynamic_size,
        precisions=precisions,
        share_weights=share_weights,
        image_graphs=image_graphs,
        calib_dir=calib_dir,
    )
    if out_dir is not None:
        _check_destination(Path(out_dir), force)  # fail before loading anything heavy

    source = resolve_export_source(
        source_or_loaded, random_weights=random_weights, network=network, layer_norm_eps=layer_norm_eps, size=size
    )
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(source)
    _check_destination(out_dir, force)
    if source.random_weights:
        seed = source.record["random_weights"]["seed"]
        log(f"RANDOM WEIGHTS: {source.model_name} is exported untrained (seed {seed}); not a usable classifier")
    log(f"Exporting {source.network} ({len(source.labels)} classes, {source.size[0]}x{source.size[1]}) to {out_dir}")

    cache = ReferenceCache(source)
    cases = sweep_cases(source.size, options.dynamic_size)
    started = time.perf_counter()
    parity: dict[str, Any] = {"export": {}}
    steps: dict[str, Any] = {}

    with _staging_dir(out_dir, log) as tmp_dir:
        fp32_graphs: dict[str, Path] = {}
        for graph in GRAPH_NAMES:
            path, result, graph_steps = _export_fp32_graph(source, graph, tmp_dir, options, cache, cases, log)
            fp32_graphs[graph] = path
            parity["export"][f"{graph}/fp32"] = result
            steps[graph] = graph_steps

        variants = _export_variants(source, fp32_graphs, options, cache, cases, parity, log)
        image_paths = _write_image_graphs(source, fp32_graphs, options, log) if options.image_graphs else {}
        sharing = None
        if options.share_weights:
            sharing = _share_weights([*fp32_graphs.values(), *image_paths.values()], fp32_graphs, source, cache, log)
        image_entries = {}
        for graph, path in image_paths.items():
            parity["export"][f"{graph}/image"] = check_image_graph(path, fp32_graphs[graph], graph, source)
            image_entries[graph] = graph_entry(path)

        write_labels(tmp_dir, source.labels)
        manifest = build_manifest(
            source,
            tmp_dir,
            options,
            _graph_entries(tmp_dir, fp32_graphs, variants),
            image_entries,
            parity,
            steps,
            sharing,
            time.perf_counter() - started,
        )
        write_manifest(tmp_dir, manifest)
        _move_into_place(tmp_dir, out_dir, force)
    log(f"Done: {out_dir} ({len(manifest.files)} files, every graph matched PyTorch)")
    return replace(manifest, model_dir=out_dir)


def preprocess_contract_for(source: ExportSource) -> PreprocessContract:
    return PreprocessContract(
        size=tuple(source.size),  # type: ignore[arg-type]
        mean=tuple(source.rgb_stats["mean"]),  # type: ignore[arg-type]
        std=tuple(source.rgb_stats["std"]),  # type: ignore[arg-type]
        center_crop=RESIZE_RULE.center_crop,
        input_name=INPUT_NAME,
    )


IMAGE_GRAPHS = ("classify", "embed")
"""Tensor graphs that also ship an image-input variant (``<graph>.image.onnx``)."""
IMAGE_CHECK_SHAPES = ((300, 451, 3), (500, 500, 4), (97, 61, 1))
"""Synthetic images each image graph is checked on: downscale and upscale, RGB, RGBA and gray."""


def _write_image_graphs(
    source: ExportSource, fp32_graphs: dict[str, Path], options: ExportOptions, log: Progress
) -> dict[str, Path]:
    """``<graph>.image.onnx``: the preprocessing graph composed with each of ``IMAGE_GRAPHS``."""
    if options.opset < preprocess_graph.MIN_OPSET:
        log(f"  image-input graphs skipped: they need opset >= {preprocess_graph.MIN_OPSET}")
        return {}
    pre = preprocess_graph.preprocess_graph(source.size, source.rgb_stats, RESIZE_RULE.center_crop, opset=options.opset)
    written = {}
    for graph in IMAGE_GRAPHS:
        tensor_path = fp32_graphs[graph]
        path = preprocess_graph.image_graph(tensor_path, pre, tensor_path.with_name(image_graph_filename(graph)))
        metadata = graph_metadata(source, graph, "fp32", options.dynamic_size)
        metadata[MetadataKey.GRAPH] = f"{graph}.image"
        onnx_io.set_metadata(path, metadata)
        onnx_io.check_graph(path)
        written[graph] = path
        log(f"  {path.name}: uint8 image in, preprocessing inside")
    return written


def check_image_graph(path: Path, tensor_path: Path, graph: str, source: ExportSource) -> dict[str, Any]:
    """The image graph's outputs against the tensor graph's on the Python-preprocessed image (synthetic images
    of ``IMAGE_CHECK_SHAPES``); raises ``ExportError`` beyond float32 noise."""
    from pvt_deploy.preprocess import Preprocessor

    image_session = ort_session(path)
    tensor_session = ort_session(tensor_path)
    preprocessor = Preprocessor(tuple(source.size), dict(source.rgb_stats), RESIZE_RULE.center_crop)
    rng = np.random.default_rng(SWEEP_SEED)
    worst = 0.0
    for shape in IMAGE_CHECK_SHAPES:
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        row = preprocessor(pixels)
        expected = tensor_session.run(None, {INPUT_NAME: row[None]})
        got = image_session.run(None, {IMAGE_INPUT_NAME: pixels})
        for name, want, have in zip(GRAPH_OUTPUTS[graph], expected, got, strict=True):
            difference = float(np.abs(want.astype(np.float64) - have).max())
            worst = max(worst, difference)
            if difference > IMAGE_GRAPH_MAX_ABS:
                raise ExportError(
                    f"{path.name}: {name} differs from {tensor_path.name} on the Python-preprocessed "
                    f"{shape} image by {difference:.3g} (limit {IMAGE_GRAPH_MAX_ABS})"
                )
    return {
        "graph": f"{graph}.image",
        "shapes": [list(s) for s in IMAGE_CHECK_SHAPES],
        "max_abs": worst,
        "passed": True,
    }


IMAGE_GRAPH_MAX_ABS = 1e-5
"""Image graph vs tensor graph on the same pixels: the preprocessing is bit-exact, so only kernel-order noise."""


def _make_variant(
    fp32_path: Path,
    graph: str,
    precision_name: str,
    source: ExportSource,
    dynamic_size: bool,
    calibration: list[np.ndarray] | None,
    cache: ReferenceCache,
    cases: Sequence,
    parity: dict[str, Any],
    log: Progress,
    int8_choice: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The variant as shipped: for int8, the first method of ``int8_choice["order"]`` that passes its thresholds
    (recorded as the description's ``method_choice``); a variant no method makes pass fails the export."""
    out_path = fp32_path.with_name(graph_filename(graph, precision_name))
    batches = calibration if precision_name == "int8" else None
    methods: list[str | None] = list(int8_choice["order"]) if int8_choice else [None]
    rejected: dict[str, str] = {}
    for method in methods:
        try:
            description = precision.make_variant(
                fp32_path, precision_name, out_path, calibration_batches=batches, int8_method=method
            )
        except PvtDeployError as exc:
            raise type(exc)(onnx_io.first_line(exc)) from exc
        except Exception as exc:
            raise ExportError(
                f"{graph}: making the {precision_name} variant failed: {type(exc).__name__}: {onnx_io.first_line(exc)}"
            ) from exc
        metadata = graph_metadata(source, graph, precision_name, dynamic_size)
        metadata[MetadataKey.BATCH_INVARIANT] = json.dumps(bool((description or {}).get("batch_invariant", True)))
        onnx_io.set_metadata(out_path, metadata)
        onnx_io.check_graph(out_path)
        result = sweep_parity(out_path, graph, precision_name, cache, cases)
        if precision_name == "int8" and batches:
            result = _photo_parity(out_path, graph, result, cache, batches)
        if result.passed:
            break
        rejected[str(method)] = "; ".join(result.failures())
    else:
        raise ExportError(f"{out_path.name} failed its {precision_name} parity: {'; '.join(rejected.values())}")
    parity["export"][f"{graph}/{precision_name}"] = result.to_json()
    log(f"  {out_path.name}: {precision_name} variant matched PyTorch within its thresholds")
    description = dict(description or {})
    if int8_choice:
        description["method_choice"] = {**int8_choice, "chosen": description.get("method"), "rejected": rejected}
    return description
