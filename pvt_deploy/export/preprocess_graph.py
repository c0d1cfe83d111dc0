"""Preprocessing as an ONNX graph: uint8 ``[H, W, C]`` image -> the model's ``[1, 3, H, W]`` float32 input.

The resize repeats Pillow's BICUBIC arithmetic (``src/libImaging/Resample.c``): a separable a=-0.5 cubic whose
support widens by ``in/out`` when downscaling, coefficients normalised per output pixel and rounded to 22-bit
fixed point, a rounding offset of ``2**21``, an arithmetic shift and a clip to 0..255 after each pass, horizontal
pass first unless the height shrinks by more than twice what the width does (Pillow 13.0's rule). The coefficient
matrices depend on the input size, so the graph builds them at run time from
``Shape`` with Range/Sub/Abs/Where/Div; each pass is one float64 MatMul whose sums of integer products are exact.
Measured against ONNX ``Resize(cubic, antialias=1)`` in docs/portability.md (this one is the closer).

``image_graph`` composes the preprocessing with a tensor graph (``onnx.compose``) so a client in any language
feeds decoded RGB pixels and gets the tensor graph's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pvt_deploy.format.manifest import IMAGE_INPUT_NAME, INPUT_NAME

PRECISION_BITS = 32 - 8 - 2
"""Pillow's fixed-point precision of 8-bit resampling coefficients."""
CUBIC_A = -0.5
MIN_OPSET = 13
"""Squeeze/Unsqueeze/ReduceSum take axes as inputs from opset 13 on."""
_PREFIX = "pre_"


def _const(name: str, value: np.ndarray | float | int | Sequence, dtype: type = np.float64) -> onnx.NodeProto:
    array = np.asarray(value, dtype=dtype)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


class _Builder:
    """A small node list with unique names (every name carries the ``pre_`` prefix)."""

    def __init__(self, prefix: str = _PREFIX) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._count = 0

    def const(self, value, dtype: type = np.float64) -> str:
        self._count += 1
        name = f"{self.prefix}c{self._count}"
        self.nodes.append(_const(name, value, dtype))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        name = f"{self.prefix}{op_type.lower()}{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name


def _bicubic(b: _Builder, t: str) -> str:
    """Pillow's ``bicubic_filter`` on a float64 tensor: piecewise cubic on |t|, 0 from 2 on."""
    x = b.op("Abs", t)
    a = b.const(CUBIC_A)
    one, two = b.const(1.0), b.const(2.0)
    # |x| < 1: ((a + 2) x - (a + 3)) x x + 1
    inner = b.op("Sub", b.op("Mul", b.const(CUBIC_A + 2.0), x), b.const(CUBIC_A + 3.0))
    near = b.op("Add", b.op("Mul", b.op("Mul", inner, x), x), one)
    # 1 <= |x| < 2: (((x - 5) x + 8) x - 4) a
    far = b.op(
        "Sub", b.op("Mul", b.op("Add", b.op("Mul", b.op("Sub", x, b.const(5.0)), x), b.const(8.0)), x), b.const(4.0)
    )
    far = b.op("Mul", far, a)
    zero = b.const(0.0)
    return b.op("Where", b.op("Less", x, one), near, b.op("Where", b.op("Less", x, two), far, zero))


def _coefficients(b: _Builder, in_size: str, out_size: int) -> str:
    """``[out_size, in_size]`` float64 integer coefficients (Pillow's 22-bit fixed point) for one axis.

    ``in_size``: a float64 scalar tensor holding the input length."""
    out_f = b.const(float(out_size))
    scale = b.op("Div", in_size, out_f)
    filterscale = b.op("Max", scale, b.const(1.0))
    support = b.op("Mul", b.const(2.0), filterscale)
    ss = b.op("Div", b.const(1.0), filterscale)
    outputs = b.op("Unsqueeze", b.op("Range", b.const(0.0), out_f, b.const(1.0)), b.const([1], np.int64))
    center = b.op("Mul", b.op("Add", outputs, b.const(0.5)), scale)  # [out, 1]
    half = b.const(0.5)
    xmin = b.op("Max", b.op("Floor", b.op("Add", b.op("Sub", center, support), half)), b.const(0.0))
    xmax = b.op("Min", b.op("Floor", b.op("Add", b.op("Add", center, support), half)), in_size)
    inputs = b.op("Unsqueeze", b.op("Range", b.const(0.0), in_size, b.const(1.0)), b.const([0], np.int64))  # [1, in]
    weights = _bicubic(b, b.op("Mul", b.op("Add", b.op("Sub", inputs, center), half), ss))
    window = b.op("And", b.op("GreaterOrEqual", inputs, xmin), b.op("Less", inputs, xmax))
    zero = b.const(0.0)
    weights = b.op("Where", window, weights, zero)
    total = b.op("ReduceSum", weights, b.const([1], np.int64), keepdims=1)
    nonzero = b.op("Not", b.op("Equal", total, zero))
    weights = b.op("Where", nonzero, b.op("Div", weights, b.op("Where", nonzero, total, b.const(1.0))), weights)
    # Pillow: (int)(k * 2^22 + 0.5) for k >= 0, (int)(k * 2^22 - 0.5) below: half away from zero
    scaled = b.op("Mul", weights, b.const(float(1 << PRECISION_BITS)))
    return b.op("Mul", b.op("Sign", scaled), b.op("Floor", b.op("Add", b.op("Abs", scaled), half)))


def _round_pass(b: _Builder, accumulated: str) -> str:
    """``clip8((2^21 + sum) >> 22)``: Pillow's rounding back to uint8 after a pass (values stay float64)."""
    shifted = b.op(
        "Floor",
        b.op(
            "Div",
            b.op("Add", accumulated, b.const(float(1 << (PRECISION_BITS - 1)))),
            b.const(float(1 << PRECISION_BITS)),
        ),
    )
    return b.op("Clip", shifted, b.const(0.0), b.const(255.0))


def _input_guard(b: _Builder) -> str:
    """A float32 ``[1.0]`` that exists only for images the contract allows (height and width >= 1, 1, 3 or 4
    channels): otherwise it is a Reshape of one value into two, which every runtime refuses, so the graph fails
    instead of answering an empty or 5-channel image. Multiplied into the (small) output, so no optimizer drops
    it and no image-sized copy is made."""
    dims = b.op("Shape", IMAGE_INPUT_NAME)

    def dim(index: int) -> str:
        return b.op("Slice", dims, b.const([index], np.int64), b.const([index + 1], np.int64))

    height, width, channels = dim(0), dim(1), dim(2)
    zero = b.const([0], np.int64)
    has_pixels = b.op("And", b.op("Greater", height, zero), b.op("Greater", width, zero))
    allowed = b.op(
        "Or",
        b.op("Or", b.op("Equal", channels, b.const([1], np.int64)), b.op("Equal", channels, b.const([3], np.int64))),
        b.op("Equal", channels, b.const([4], np.int64)),
    )
    refused = b.op("Cast", b.op("Not", b.op("And", has_pixels, allowed)), to=TensorProto.INT64)
    length = b.op("Add", refused, b.const([1], np.int64))  # [1] for a valid image, [2] otherwise
    return b.op("Reshape", b.const([1.0], np.float32), length)


def preprocess_graph(
    size: tuple[int, int],
    rgb_stats: dict[str, Sequence[float]],
    center_crop: float = 1.0,
    *,
    opset: int = 17,
    output_name: str = INPUT_NAME,
    resized_output: bool = False,
) -> onnx.ModelProto:
    """The preprocessing graph: ``image`` uint8 [H, W, C] (C = 1, 3 or 4; alpha dropped, gray replicated) ->
    ``output_name`` float32 [1, 3, height, width]; with ``resized_output`` also ``resized`` uint8 [h, w, 3]."""
    height, width = size
    if center_crop <= 0 or center_crop > 1:
        raise ValueError(f"the preprocessing graph supports 0 < center_crop <= 1, got {center_crop}")
    base_h, base_w = int(height / center_crop), int(width / center_crop)
    b = _Builder()
    rgb = b.op("Slice", IMAGE_INPUT_NAME, b.const([0], np.int64), b.const([3], np.int64), b.const([2], np.int64))
    rgb = b.op("Expand", rgb, b.const([1, 1, 3], np.int64))  # gray [H, W, 1] -> [H, W, 3]; RGB unchanged
    # [3, H, W]: transposed while still uint8 (3 bytes per pixel), then float64 once: the largest tensors of the
    # graph are image-sized, so each full-size float64 copy costs 24 bytes per input pixel
    pixels = b.op("Cast", b.op("Transpose", rgb, perm=[2, 0, 1]), to=TensorProto.DOUBLE)
    shape = b.op("Cast", b.op("Shape", IMAGE_INPUT_NAME), to=TensorProto.DOUBLE)
    in_h = b.op("Squeeze", b.op("Slice", shape, b.const([0], np.int64), b.const([1], np.int64)), b.const([0], np.int64))
    in_w = b.op("Squeeze", b.op("Slice", shape, b.const([1], np.int64), b.const([2], np.int64)), b.const([0], np.int64))
    horizontal = b.op("Transpose", _coefficients(b, in_w, base_w), perm=[1, 0])  # [W, base_w]
    vertical = _coefficients(b, in_h, base_h)  # [base_h, H]
    # Pillow (13.0) runs the vertical pass first when the height shrinks by more than twice what the width does
    shrink_h = b.op("Sub", in_h, b.const(float(base_h)))
    shrink_w = b.op("Sub", in_w, b.const(float(base_w)))
    vertical_first = b.op(
        "And",
        b.op("Greater", shrink_h, b.const(0.0)),
        b.op("Greater", shrink_h, b.op("Mul", shrink_w, b.const(2.0))),
    )
    branches = {}
    for name, order in (("then", ("vertical", "horizontal")), ("else", ("horizontal", "vertical"))):
        sub = _Builder(f"{_PREFIX}{name}_")
        value = pixels
        for axis in order:
            product = sub.op("MatMul", value, horizontal) if axis == "horizontal" else sub.op("MatMul", vertical, value)
            value = _round_pass(sub, product)
        sub.nodes.append(helper.make_node("Identity", [value], [f"{_PREFIX}{name}_resized"]))
        branches[name] = helper.make_graph(
            sub.nodes,
            f"{name}_branch",
            [],
            [helper.make_tensor_value_info(f"{_PREFIX}{name}_resized", TensorProto.DOUBLE, [3, base_h, base_w])],
        )
    resized = b.op("If", vertical_first, then_branch=branches["then"], else_branch=branches["else"])
    if (base_h, base_w) != (height, width):
        top = int(round((base_h - height) / 2.0))
        left = int(round((base_w - width) / 2.0))
        resized = b.op(
            "Slice",
            resized,
            b.const([top, left], np.int64),
            b.const([top + height, left + width], np.int64),
            b.const([1, 2], np.int64),
        )
    scaled = b.op("Mul", b.op("Cast", resized, to=TensorProto.FLOAT), b.const(np.float32(1.0 / 255.0), np.float32))
    mean = b.const(np.asarray(rgb_stats["mean"], np.float32).reshape(3, 1, 1), np.float32)
    std = b.const(np.asarray(rgb_stats["std"], np.float32).reshape(3, 1, 1), np.float32)
    normalized = b.op("Mul", b.op("Div", b.op("Sub", scaled, mean), std), _input_guard(b))
    b.nodes.append(helper.make_node("Unsqueeze", [normalized, b.const([0], np.int64)], [output_name]))
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, 3, height, width])]
    if resized_output:
        hwc = b.op("Transpose", resized, perm=[1, 2, 0])
        b.nodes.append(helper.make_node("Cast", [hwc], ["resized"], to=TensorProto.UINT8))
        outputs.append(helper.make_tensor_value_info("resized", TensorProto.UINT8, [height, width, 3]))
    graph = helper.make_graph(
        b.nodes,
        "preprocess",
        [helper.make_tensor_value_info(IMAGE_INPUT_NAME, TensorProto.UINT8, ["height", "width", "channels"])],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def image_graph(tensor_graph: Path, preprocess: onnx.ModelProto, out_path: Path) -> Path:
    """``preprocess`` followed by the tensor graph at ``tensor_graph`` (weights inlined), saved at ``out_path``.

    The tensor graph's batch dimension becomes 1: one image in, one row of each output out."""
    model = onnx.load(str(tensor_graph))
    copy = onnx.ModelProto()
    copy.CopyFrom(preprocess)
    preprocess = copy
    preprocess.ir_version = model.ir_version
    merged = onnx.compose.merge_models(preprocess, model, io_map=[(INPUT_NAME, INPUT_NAME)], prefix1="", prefix2="")
    merged.graph.name = f"{model.graph.name or 'graph'}_image"
    for output in merged.graph.output:  # say so in the declared shapes too (the manifest copies them)
        dims = output.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    onnx.save(merged, str(out_path))
    return out_path
