"""Precision variants (int8, fp16) and the fp32 graph optimizations, applied to an already exported graph.

``export`` calls these; the parity thresholds they are judged by live in ``export/parity.py``. What was tried and
measured (and why each choice below was kept) is in docs/speed.md.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pvt_deploy.errors import ExportError
from pvt_deploy.export.parity import PARITY_THRESHOLDS  # noqa: F401 - importable from here too

OFFLINE_LEVEL = "basic"
"""The onnxruntime level the fp32 graph is saved at. BASIC keeps standard ONNX ops only (constant folding,
redundant-node removal), so the file stays runnable by any EP and any ONNX runtime. EXTENDED would bake in
com.microsoft fused ops assigned to the EP present at export time, and ALL bakes in this CPU's NCHWc block size
(onnxruntime itself warns the result is hardware specific). The runtime applies ALL when it loads the graph, so
nothing is lost at run time (docs/speed.md)."""

INT8_OP_TYPES = ("MatMul", "Gemm")
"""Ops that get int8 kernels. LayerNorm, Softmax and GELU stay float because they are not listed, and so does
Conv: with the convs quantized too (QLinearConv) the static b2 graph ran 0.63x the fp32 speed here, with them
float 1.15x (docs/speed.md)."""


# --------------------------------------------------------------------------------------------------- fp32


def optimize_fp32(model_path: Path, out_path: Path) -> dict[str, Any]:
    """Rewrite a simplified fp32 graph into its fastest parity-preserving form; returns what was done.

    The one rewrite that measured faster (docs/speed.md): every ``Transpose(0,2,1) -> Reshape(NCHW) -> Conv ->
    Reshape -> Transpose(0,2,1)`` sandwich (the depthwise conv of each MLP and the spatial-reduction conv of each
    attention) becomes ``Reshape(NHWC) -> Transpose(0,3,1,2) -> Conv -> Transpose(0,2,3,1) -> Reshape``. The two
    4-D transposes are exactly what onnxruntime's NCHWc layout pass folds into its channels-last reorders, so the
    full-size transposes of the token tensor disappear at run time instead of costing ~15% of the run."""
    model_path, out_path = Path(model_path), Path(out_path)
    model = onnx.load(str(model_path))
    rewritten = _channels_last_convs(model.graph)
    _remove_dead_nodes(model.graph)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "rewritten.onnx"
        onnx.save(model, str(staged))
        _save_offline_optimized(staged, out_path, model.metadata_props)
    return {
        "channels_last_convs": rewritten,
        "offline_level": OFFLINE_LEVEL,
        "nodes_before": _node_count(model_path),
        "nodes_after": _node_count(out_path),
    }


def _node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _channels_last_convs(graph: onnx.GraphProto) -> int:
    """Turn NCHW transposes around each token-tensor Conv into NHWC ones the layout pass can absorb."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    initializers = {init.name: init for init in graph.initializer}
    graph_outputs = {value.name for value in graph.output}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # index of a Conv -> nodes to insert before it
    added: list[onnx.TensorProto] = []
    count = 0
    for index, conv in enumerate(graph.node):
        if conv.op_type != "Conv" or conv.input[1] not in initializers:
            continue
        to_nchw = producers.get(conv.input[0])
        from_tokens = producers.get(to_nchw.input[0]) if to_nchw is not None and to_nchw.op_type == "Reshape" else None
        if from_tokens is None or from_tokens.op_type != "Transpose" or _perm(from_tokens) != [0, 2, 1]:
            continue
        # Other consumers (a Shape feeding the old flatten's target) keep reading the unchanged conv output.
        after = [node for node in consumers.get(conv.output[0], []) if node.op_type == "Reshape"]
        if len(after) != 1 or conv.output[0] in graph_outputs:
            continue
        flatten = after[0]
        back = consumers.get(flatten.output[0], [])
        if len(back) != 1 or back[0].op_type != "Transpose" or _perm(back[0]) != [0, 2, 1]:
            continue
        to_tokens = back[0]
        if flatten.output[0] in graph_outputs:
            continue
        prefix = f"{conv.name or conv.output[0]}/channels_last"
        shape_nhwc = _reordered_shape(to_nchw.input[1], initializers, prefix, new_nodes.setdefault(index, []), added)
        if shape_nhwc is None:
            continue
        out_channels = int(initializers[conv.input[1]].dims[0])
        tokens_shape = numpy_helper.from_array(
            np.array([0, -1, out_channels], dtype=np.int64), f"{prefix}/tokens_shape"
        )
        added.append(tokens_shape)
        nhwc, nchw = f"{prefix}/nhwc_in", f"{prefix}/nchw_in"
        new_nodes[index] += [
            helper.make_node("Reshape", [from_tokens.input[0], shape_nhwc], [nhwc], name=f"{prefix}/reshape_in"),
            helper.make_node("Transpose", [nhwc], [nchw], name=f"{prefix}/to_nchw", perm=[0, 3, 1, 2]),
        ]
        conv.input[0] = nchw
        conv_nhwc = f"{prefix}/nhwc_out"
        # Re-purpose the two nodes after the conv in place: same output names, so their consumers are untouched.
        flatten_out = to_tokens.output[0]
        to_tokens.ClearField("attribute")
        to_tokens.attribute.append(helper.make_attribute("perm", [0, 2, 3, 1]))
        to_tokens.input[0] = conv.output[0]
        to_tokens.output[0] = conv_nhwc
        flatten.input[0] = conv_nhwc
        flatten.input[1] = tokens_shape.name
        flatten.ClearField("attribute")  # the dynamo exporter sets allowzero=1, which would read our 0 literally
        flatten.output[0] = flatten_out
        count += 1
    if count:
        graph.initializer.extend(added)
        nodes: list[onnx.NodeProto] = []
        for index, node in enumerate(graph.node):
            nodes.extend(new_nodes.get(index, []))
            nodes.append(node)
        _topological_sort(graph, nodes)
    return count


def _reordered_shape(
    shape_name: str,
    initializers: dict[str, onnx.TensorProto],
    prefix: str,
    nodes: list[onnx.NodeProto],
    added: list[onnx.TensorProto],
) -> str | None:
    """The NCHW target shape of a Reshape permuted to NHWC: a new constant, or a Gather on a computed shape."""
    init = initializers.get(shape_name)
    if init is not None:
        shape = numpy_helper.to_array(init)
        if shape.shape != (4,) or (shape[1:] == 0).any():
            return None  # a 0 would copy a dim by position, which moves with the permutation
        reordered = numpy_helper.from_array(shape[[0, 2, 3, 1]].astype(np.int64), f"{prefix}/nhwc_shape")
        added.append(reordered)
        return reordered.name
    indices = numpy_helper.from_array(np.array([0, 2, 3, 1], dtype=np.int64), f"{prefix}/nhwc_order")
    added.append(indices)
    out = f"{prefix}/nhwc_shape"
    nodes.append(helper.make_node("Gather", [shape_name, indices.name], [out], name=f"{prefix}/gather_shape", axis=0))
    return out


def _topological_sort(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Re-purposed nodes may now come before their new inputs; reorder so the graph stays valid ONNX."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        still: list[onnx.NodeProto] = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise ExportError("fp32 rewrite produced a cycle or a dangling input; graph left unchanged")
        pending = still
    del graph.node[:]
    graph.node.extend(ordered)


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {value.name for value in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    live = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live)


def _save_offline_optimized(source: Path, out_path: Path, metadata: Iterable[onnx.StringStringEntryProto]) -> None:
    """Let onnxruntime apply its portable (BASIC) rewrites offline and keep the graph's metadata."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        try:
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a rewrite onnxruntime rejects must never reach the export folder
            raise ExportError(f"optimized fp32 graph does not load in onnxruntime: {exc}") from None
        model = onnx.load(str(optimized))
    del model.metadata_props[:]
    model.metadata_props.extend(metadata)
    onnx.save(model, str(out_path))


# --------------------------------------------------------------------------------------------------- variants


INT8_METHODS = ("static", "dynamic")


def make_variant(
    fp32_path: Path,
    precision: str,
    out_path: Path,
    *,
    calibration_batches: Iterable[np.ndarray] | None = None,
    int8_method: str | None = None,
    float_groups: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write the ``precision`` variant of one fp32 graph to ``out_path``; returns a description for the manifest.

    int8: static QDQ calibrated on ``calibration_batches`` when given, dynamic quantization otherwise;
    ``int8_method`` forces one (``"dynamic"`` measured faster on this AVX2 CPU without VNNI, docs/speed.md);
    ``float_groups`` (``float_nodes_for_int8``) are kept float [``INT8_FLOAT_GROUPS``]."""
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if precision == "int8":
        batches = list(calibration_batches) if calibration_batches is not None else []
        method = int8_method or ("static" if batches else "dynamic")
        if method not in INT8_METHODS:
            raise ExportError(f"unknown int8 method {method!r}; choose from {', '.join(INT8_METHODS)}")
        if method == "static" and not batches:
            raise ExportError("static int8 quantization needs calibration images (--calib DIR)")
        groups = tuple(INT8_FLOAT_GROUPS if float_groups is None else float_groups)
        if method == "static":
            description = _quantize_static(fp32_path, out_path, batches, groups)
        else:
            description = _quantize_dynamic(fp32_path, out_path, groups)
        description["float_groups"] = list(groups)
    elif precision == "fp16":
        description = _convert_fp16(fp32_path, out_path)
    else:
        raise ExportError(f"no variant maker for precision {precision!r} (int8, fp16)")
    description.setdefault("batch_invariant", True)
    _copy_metadata(fp32_path, out_path, precision)
    return description


INT8_CHOICE_ROUNDS = 5
"""Interleaved batch-1 rounds export times the int8 methods for (a few seconds on b2; enough to tell static's
1.0-1.2x from dynamic's 1.3-1.5x over fp32 on AVX2, docs/speed.md)."""


def choose_int8_method(
    fp32_path: Path,
    calibration_batches: Iterable[np.ndarray] | None,
    *,
    rounds: int = INT8_CHOICE_ROUNDS,
    threads: int | None = None,
) -> dict[str, Any]:
    """Which int8 method to try first on this machine, by timing both: returns ``{"order": [...], "why": ...}``.

    Without calibration images only dynamic is possible. With them, both variants of ``fp32_path`` (the classify
    graph) are made and timed on one calibration image, interleaved call by call (batch 1, the runtime's own
    session settings), and the faster comes first. The export then keeps the first method in ``order`` whose
    variant passes its fidelity thresholds (``method_choice`` in the variant's manifest entry says which and why).
    The load average is recorded with the timing: on a loaded machine the order can be noise."""
    batches = list(calibration_batches) if calibration_batches is not None else []
    if not batches:
        return {"order": ["dynamic"], "why": "no calibration images (--calib), so static int8 is not possible"}
    import statistics
    import time

    from pvt_deploy.bench.machine import cpu_summary, load_average
    from pvt_deploy.runtime.sessions import create_session

    one = np.ascontiguousarray(batches[0][:1], dtype=np.float32)
    times: dict[str, list[float]] = {"static": [], "dynamic": []}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for method in times:
            path = Path(tmp) / f"{method}.onnx"
            make_variant(fp32_path, "int8", path, calibration_batches=batches, int8_method=method)
            sessions[method] = create_session(path, threads=threads)
            name = sessions[method].get_inputs()[0].name
            sessions[method].run(None, {name: one})  # warm-up, apart from the timed rounds
        for index in range(rounds):
            order = list(times) if index % 2 == 0 else list(reversed(times))
            for method in order:
                begin = time.perf_counter()
                sessions[method].run(None, {name: one})
                times[method].append(time.perf_counter() - begin)
    medians = {method: 1000 * statistics.median(values) for method, values in times.items()}
    order = sorted(medians, key=medians.get)
    load_after = load_average()
    return {
        "order": order,
        "timed_ms": {method: round(ms, 2) for method, ms in medians.items()},
        "rounds": rounds,
        "cpu": cpu_summary(),
        "load_average": {"before": load_before, "after": load_after},
        "why": f"{order[0]} ran {medians[order[1]] / medians[order[0]]:.2f}x as fast as {order[1]} on this CPU "
        f"(median of {rounds} interleaved batch-1 calls)",
    }


def _copy_metadata(fp32_path: Path, out_path: Path, precision: str) -> None:
    """The variant carries the fp32 graph's labels and preprocessing, with its own precision key."""
    source = onnx.load(str(fp32_path), load_external_data=False)
    model = onnx.load(str(out_path))
    entries = {entry.key: entry.value for entry in source.metadata_props}
    if "precision" in entries:
        entries["precision"] = precision
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(out_path))


INT8_FLOAT_GROUPS = ("attention_matmuls", "patch_embed", "classifier", "proj", "kv", "stage4/fc1", "stage4/fc2")
"""Node groups kept in float in the int8 graph by default (measured in docs/speed.md). ``proj`` and ``kv`` (the
attention's output and key/value projections) moved b2's logits most when quantized; float, they cut the embedding
error by a third and removed every class flip at fp32 margins >= 0.5 logit, at ~0.95x the speed (loaded machine).
The last stage's MLP (``stage4/fc1``, ``stage4/fc2``; 8% of b2's multiply-adds) was the largest error left; float,
top-1 agreement over 432 photo x head samples rose from 98.6% to 99.5% at ~0.97x the speed (quiet)."""


_ROLE_SEGMENTS = (
    ("/attn/sr/", "sr"),
    ("/attn/kv/", "kv"),
    ("/attn/q/", "q"),
    ("/attn/proj/", "proj"),
    ("/mlp/fc1/", "fc1"),
    ("/mlp/fc2/", "fc2"),
    ("/mlp/dwconv/", "dwconv"),
)
_BLOCK = re.compile(r"/stage(\d+)/(?:blocks\.(\d+)/)?")
_PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def int8_node_roles(model: onnx.ModelProto) -> dict[str, tuple[int | None, str]]:
    """Stage and role of every Conv/MatMul/Gemm, the units the int8 float-keeping is chosen in.

    Roles: ``q``, ``kv``, ``proj``, ``fc1``, ``fc2`` (the weight GEMMs of a block), ``attention`` (the two
    activation x activation products), ``sr``, ``dwconv``, ``patch_embed`` (stem and downsampling convs),
    ``classifier``. onnxruntime's offline pass renames some MatMul+Add pairs to ``Gemm_<n>``; those are found by the
    node that feeds them (norm2 -> fc1; norm1 -> q, or kv where the weight is twice as wide; the attention product
    -> proj; the GELU -> fc2)."""
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    roles: dict[str, tuple[int | None, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        name = node.name
        role = next((role for segment, role in _ROLE_SEGMENTS if segment in name), None)
        if "classifier" in name:
            role = "classifier"
        elif "patch_embed" in name or "downsample" in name:
            role = "patch_embed"
        elif node.op_type == "MatMul" and not any(i in initializers for i in node.input):
            role = "attention"
        source = producers.get(node.input[0])
        for _ in range(4):  # walk back to the LayerNorm that feeds an unnamed GEMM
            if source is None or source.op_type not in _PASS_THROUGH:
                break
            source = producers.get(source.input[0])
        if role is None and source is not None:
            weight = initializers.get(node.input[1])
            wide = weight is not None and len(weight.dims) == 2 and max(weight.dims) == 2 * min(weight.dims)
            if source.op_type == "LayerNormalization" and "/norm2/" in source.name:
                role = "fc1"
            elif source.op_type == "LayerNormalization" and "/attn/norm/" in source.name:
                role = "kv"
            elif source.op_type == "LayerNormalization" and "/norm1/" in source.name:
                role = "kv" if wide else "q"
            elif source.op_type == "MatMul" and "/attn/" in source.name:
                role = "proj"  # fed by the attention product
            elif "/mlp/act/" in source.name:
                role = "fc2"  # fed by the GELU
            name = source.name
        match = _BLOCK.search(name)
        roles[node.name] = (int(match.group(1)) if match else None, role or "other")
    return roles


_GROUP_ROLES = {
    "attention_matmuls": {"attention"},
    "patch_embed": {"patch_embed"},
    "classifier": {"classifier"},
    "spatial_reduction": {"sr", "kv"},
    "depthwise": {"dwconv"},
}


def float_nodes_for_int8(model: onnx.ModelProto, groups: Iterable[str] = INT8_FLOAT_GROUPS) -> list[str]:
    """Names of the quantizable nodes kept float, by group (defaults in ``INT8_FLOAT_GROUPS``):

    - ``attention_matmuls``: activation x activation MatMuls (q @ k^T, softmax @ v); the softmax output spans
      decades that uint8 flattens (tiny model: embedding cosine 0.9982 -> 0.99999 when kept float);
    - ``patch_embed``: the stem and downsampling convs, whose per-tensor input ranges are the widest (tiny model:
      0.997 -> 0.9999; quantizing every other Conv/MatMul with them float keeps 0.9999);
    - ``classifier``: the head (negligible cost, and it decides the top-1);
    - ``spatial_reduction``, ``depthwise``: measured, not needed for the thresholds; selectable for experiments;
    - a role of ``int8_node_roles`` (``q``, ``kv``, ``proj``, ``fc1``, ``fc2``), everywhere; ``stage<N>``: every
      quantizable node of stage N; ``stage<N>/<role>``: one role in one stage.

    LayerNorm, Softmax and GELU are never quantized: they are not in ``INT8_OP_TYPES``.
    """
    groups = set(groups)
    keep: list[str] = []
    for name, (stage, role) in int8_node_roles(model).items():
        wanted = {role, f"stage{stage}", f"stage{stage}/{role}"}
        wanted |= {group for group, roles in _GROUP_ROLES.items() if role in roles}
        if wanted & groups:
            keep.append(name)
    return keep


def _calibration_reader(input_name: str, batches: list[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._items, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

        def rewind(self) -> None:
            self._items = iter(batches)

    return _Reader()


@contextlib.contextmanager
def _quantizer_input(
    fp32_path: Path, float_groups: Iterable[str] = INT8_FLOAT_GROUPS
) -> Iterator[tuple[onnx.ModelProto, Path, list[str]]]:
    """The fp32 graph staged as one self-contained file for onnxruntime's quantizer, and the nodes kept float.

    The quantizer logs advice ("consider pre-processing") on the root logger for every graph; it is not actionable
    for our graphs, so the root logger is held at ERROR while it runs instead of printing it to users."""
    model = onnx.load(str(fp32_path))
    excluded = float_nodes_for_int8(model, float_groups)
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(staged))
        root.setLevel(logging.ERROR)
        try:
            yield model, staged, excluded
        finally:
            root.setLevel(level)


def _quantize_static(
    fp32_path: Path, out_path: Path, batches: list[np.ndarray], float_groups: Iterable[str]
) -> dict[str, Any]:
    """Static QDQ, per-channel int8 weights and uint8 activations (MLAS's U8S8 path), MinMax-calibrated."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quantizer_input(fp32_path, float_groups) as (model, staged, excluded):
        input_name = model.graph.input[0].name
        try:
            quantize_static(
                str(staged),
                str(out_path),
                _calibration_reader(input_name, batches),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES),
                nodes_to_exclude=excluded,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as exc:
            raise ExportError(f"{fp32_path.name}: int8 static quantization failed: {exc}") from None
    return {
        "method": "static",
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8",
        "weights": "int8",
        "calibration": "minmax",
        "calibration_images": int(sum(len(b) for b in batches)),
        "op_types": list(INT8_OP_TYPES),
        "float_nodes": len(excluded),
    }


def _quantize_dynamic(fp32_path: Path, out_path: Path, float_groups: Iterable[str]) -> dict[str, Any]:
    """No calibration set: int8 weights, activations quantized per call (MatMul only; ConvInteger is slow)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quantizer_input(fp32_path, float_groups) as (model, staged, excluded):
        # The dynamic quantizer first rewrites each Gemm <name> as MatMul <name>_MatMul (+ Add), then matches
        # nodes_to_exclude against the new names: a float Gemm is excluded under both.
        gemms = {node.name for node in model.graph.node if node.op_type == "Gemm"}
        try:
            quantize_dynamic(
                str(staged),
                str(out_path),
                op_types_to_quantize=list(INT8_OP_TYPES),
                nodes_to_exclude=excluded + [f"{name}_MatMul" for name in excluded if name in gemms],
                per_channel=True,
                weight_type=QuantType.QInt8,
            )
        except Exception as exc:
            raise ExportError(f"{fp32_path.name}: int8 dynamic quantization failed: {exc}") from None
    return {
        "method": "dynamic",
        # DynamicQuantizeLinear takes one activation scale for the whole batch, so an image's answer would depend
        # on its neighbours (1.5e-2 on b2's logits between batch 1 and 6): the runtime runs it row by row
        "batch_invariant": False,
        "per_channel": True,
        "weights": "int8",
        "op_types": list(INT8_OP_TYPES),
        "float_nodes": len(excluded),
    }


FP16_FLOAT_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "GlobalAveragePool")
"""Kept fp32 in the fp16 graph: normalizations and reductions over many values, where fp16 accumulation error or
overflow shows first."""


def _convert_fp16(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    """fp16 weights and compute for CUDA; inputs and outputs stay float32 so callers see no difference."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - part of onnxruntime(-gpu) wheels
        raise ExportError(f"fp16 conversion needs onnxruntime.transformers: {exc}") from None
    model = onnx.load(str(fp32_path))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FP16_FLOAT_OPS), disable_shape_infer=False
        )
    except Exception as exc:
        raise ExportError(f"{fp32_path.name}: fp16 conversion failed: {exc}") from None
    # The converter appends its input/output Casts at the end of the node list; ONNX wants topological order.
    _topological_sort(converted.graph, list(converted.graph.node))
    onnx.save(converted, str(out_path))
    return {"method": "float16", "keep_io_types": True, "float_ops": list(FP16_FLOAT_OPS)}
