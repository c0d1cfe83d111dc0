"""Writing one ONNX graph: run an exporter, simplify, stamp metadata, check, describe its I/O, share weights.

Each step takes and returns paths so the exporter can re-verify the file it will actually ship after every
rewrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, numpy_helper

from pvt_deploy.errors import ExportError
from pvt_deploy.format.manifest import GRAPH_OUTPUTS, INPUT_NAME

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
DEFAULT_OPSET = 17
EXPORTER_CHOICE = {
    "measured_by": "benchmarks/export_exporters.py + benchmarks/export_time_graphs.py (docs/export.md)",
    "case": "pvt_v2_b2 classify, 384x384, batch 1, onnxruntime 1.31.1 CPU, 2 threads, interleaved medians",
    "median_ms": {
        "torchscript-op17-onnxsim": 2171.4,
        "torchscript-op17-onnxslim": 2163.6,
        "dynamo-op23-onnxsim": 2280.7,
        "dynamo-op23-onnxslim": 2110.8,
        "dynamo-op18-onnxsim": 2440.6,
    },
    "export_s_per_graph": {"torchscript": "11-22", "dynamo": "75-114"},
    "why": "no candidate ran measurably faster (paired ratios within +-9%, the noise of a shared 2-core machine); "
    "TorchScript exports 5-7x faster, and optimize_fp32's channels-last rewrite targets its graph",
}
"""Every exporter/opset/simplifier candidate was correct (max abs <= 5e-7); the choice rests on the numbers above."""

SIMPLIFIERS = ("onnxsim", "onnxslim", "none")
DEFAULT_SIMPLIFIER = "onnxsim"

_MAX_SIDE_MULTIPLE = 64  # dynamic H/W bound for the dynamo exporter: 32 * 64 = 2048 px


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and deprecation chatter; keep the CLI output ours."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """Exporter and checker errors span pages; the CLI promises one line."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _dynamic_axes(graph: str, dynamic_size: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch"}}
    if dynamic_size:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
    for name in GRAPH_OUTPUTS[graph]:
        axes[name] = {0: "batch"}
        if dynamic_size and name.startswith("stage"):
            axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
    return axes


def export_graph(
    wrapper: torch.nn.Module,
    graph: str,
    path: Path,
    *,
    size: tuple[int, int],
    dynamic_size: bool,
    exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export one wrapper with a symbolic batch (and H, W when ``dynamic_size``) to a self-contained file.

    The trace input has batch 2, so any size baked into a Reshape would be 2, never the legal-looking 1; the
    exporter still gets symbolic dims, and the batch sweep afterwards proves it."""
    sample = torch.randn(2, 3, *size)
    names = list(GRAPH_OUTPUTS[graph])
    try:
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            if exporter == "torchscript":
                torch.onnx.export(
                    wrapper,
                    (sample,),
                    str(path),
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_axes=_dynamic_axes(graph, dynamic_size),
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
            elif exporter == "dynamo":
                dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
                if dynamic_size:
                    dims[2] = 32 * torch.export.Dim("height_32", min=1, max=_MAX_SIDE_MULTIPLE)
                    dims[3] = 32 * torch.export.Dim("width_32", min=1, max=_MAX_SIDE_MULTIPLE)
                program = torch.onnx.export(
                    wrapper,
                    (sample,),
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_shapes=({**dims},),
                    opset_version=opset,
                    dynamo=True,
                    optimize=True,
                    verbose=False,
                )
                program.save(str(path), external_data=False)
            else:
                raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"{graph}: {exporter} export at opset {opset} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return path


def simplify_graph(path: Path, tool: str = DEFAULT_SIMPLIFIER) -> dict[str, Any]:
    """Simplify in place; returns what was done. onnxsim runs its own numeric check and we re-verify anyway."""
    model = onnx.load(str(path))
    before = len(model.graph.node)
    if tool == "none":
        return {"tool": "none", "nodes_before": before, "nodes_after": before}
    try:
        with _quiet():
            if tool == "onnxsim":
                import onnxsim

                simplified, ok = onnxsim.simplify(model)
                if not ok:
                    raise ExportError(f"{path.name}: onnxsim could not validate its simplified graph")
            elif tool == "onnxslim":
                import onnxslim

                simplified = onnxslim.slim(model)
            else:
                raise ExportError(f"unknown simplifier {tool!r}; choose one of {', '.join(SIMPLIFIERS)}")
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path.name}: {tool} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    onnx.save(simplified, str(path))
    version = getattr(onnxsim if tool == "onnxsim" else onnxslim, "__version__", "unknown")
    return {"tool": tool, "version": str(version), "nodes_before": before, "nodes_after": len(simplified.graph.node)}


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the graph's ``metadata_props`` with ``metadata`` (all values strings)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=str(value))
    stamp_hygiene(model)
    onnx.save(model, str(path))


PRODUCER_NAME = "pvt-deploy"


def used_domains(model: onnx.ModelProto) -> set[str]:
    """Operator domains the nodes use, subgraphs and local functions included (``""`` is the default domain)."""
    domains: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domains.add(node.domain or "")
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(model.graph)
    for function in model.functions:
        domains.add(function.domain or "")
        for node in function.node:
            domains.add(node.domain or "")
    return domains


def stamp_hygiene(model: onnx.ModelProto) -> None:
    """One producer name and version for every graph this package writes, and only the opset domains that its
    nodes use (exporters and quantizers leave unused imports such as com.microsoft.nchwc behind)."""
    from pvt_deploy import __version__

    model.producer_name = PRODUCER_NAME
    model.producer_version = __version__
    used = used_domains(model)
    keep: dict[str, onnx.OperatorSetIdProto] = {}
    for opset in model.opset_import:
        domain = opset.domain or ""
        if (domain in used or domain == "") and domain not in keep:
            keep[domain] = opset
    del model.opset_import[:]
    model.opset_import.extend(keep.values())


def check_graph(path: Path) -> None:
    """``onnx.checker`` with ``full_check`` (strict shape inference) on the file as shipped."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name}: onnx.checker failed: {first_line(exc)}") from exc


_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8"}


def _describe_value(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape: list[int | str] = [
        dim.dim_param if dim.dim_param else (dim.dim_value if dim.HasField("dim_value") else "?")
        for dim in tensor.shape.dim
    ]
    dtype = _DTYPES.get(tensor.elem_type, TensorProto.DataType.Name(tensor.elem_type).lower())
    return {"name": value.name, "shape": shape, "dtype": dtype}


def describe_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs with symbolic dims as strings, e.g. ``["batch", 3, 384, 384]``."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return {
        "inputs": [_describe_value(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_describe_value(v) for v in model.graph.output],
    }


def share_external_weights(paths: list[Path], weights_name: str, min_bytes: int = 1024) -> dict[str, Any]:
    """Move every initializer of ``paths`` of at least ``min_bytes`` into ONE file ``weights_name`` beside them,
    storing identical tensors once; graphs then hold offsets into it. Returns sizes for the manifest."""
    folder = paths[0].parent
    weights_path = folder / weights_name
    offsets: dict[str, tuple[int, int]] = {}
    before = sum(p.stat().st_size for p in paths)
    models = [onnx.load(str(p)) for p in paths]
    with open(weights_path, "wb") as blob:
        for model in models:
            for tensor in model.graph.initializer:
                data = numpy_helper.to_array(tensor).tobytes()
                if len(data) < min_bytes:
                    continue
                digest = hashlib.sha256(data + str(tensor.data_type).encode() + str(list(tensor.dims)).encode())
                key = digest.hexdigest()
                if key not in offsets:
                    pad = (-blob.tell()) % 64  # aligned so onnxruntime can mmap tensors directly
                    blob.write(b"\0" * pad)
                    offsets[key] = (blob.tell(), len(data))
                    blob.write(data)
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field_name)
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", weights_name), ("offset", str(offset)), ("length", str(length))):
                    tensor.external_data.add(key=k, value=v)
    for model, path in zip(models, paths, strict=True):
        onnx.save(model, str(path))
    after = sum(p.stat().st_size for p in paths) + weights_path.stat().st_size
    return {"file": weights_name, "graphs": [p.name for p in paths], "bytes_before": before, "bytes_after": after}
