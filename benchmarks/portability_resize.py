"""Which ONNX resize gets closest to Pillow's BICUBIC (birder's resize)?

Writes benchmarks/results/portability_resize.json.

Candidates on the repo photos (tests/data/photos), resized to 384x384:
* ``resize_uint8``: ONNX Resize(cubic, cubic_coeff_a=-0.5, antialias=1, opset 18) on the uint8 image;
* ``resize_float``: the same Resize on float32 pixels, then Round + Clip to uint8 (one rounding, after both passes);
* ``matmul_fixed_point``: pvt_deploy.export.preprocess_graph (coefficients built in the graph, Pillow's 22-bit
  fixed point, uint8 rounding after each pass).

Run: PYTHONPATH=$PWD python benchmarks/portability_resize.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from PIL import Image

from pvt_deploy.export.preprocess_graph import preprocess_graph
from pvt_deploy.preprocess import BIRDER_RGB_STATS, to_rgb

ROOT = Path(__file__).resolve().parents[1]
SIZE = (384, 384)


def resize_model(dtype: int) -> ort.InferenceSession:
    nodes = [
        helper.make_node(
            "Constant", [], ["sizes"], value=helper.make_tensor("s", TensorProto.INT64, [4], [1, *SIZE, 3])
        ),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])),
        helper.make_node("Unsqueeze", ["x", "axes"], ["x4"]),
    ]
    source = "x4"
    if dtype == TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x4"], ["xf"], to=TensorProto.FLOAT))
        source = "xf"
    nodes.append(
        helper.make_node(
            "Resize",
            [source, "", "", "sizes"],
            ["r"],
            mode="cubic",
            cubic_coeff_a=-0.5,
            antialias=1,
            coordinate_transformation_mode="half_pixel",
            exclude_outside=0,
        )
    )
    if dtype == TensorProto.FLOAT:
        nodes += [
            helper.make_node("Round", ["r"], ["rr"]),
            helper.make_node("Clip", ["rr", "lo", "hi"], ["rc"]),
            helper.make_node("Cast", ["rc"], ["y4"], to=TensorProto.UINT8),
            helper.make_node("Squeeze", ["y4", "axes"], ["y"]),
        ]
        nodes[3:3] = [
            helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Constant", [], ["hi"], value=helper.make_tensor("hi", TensorProto.FLOAT, [], [255.0])),
        ]
    else:
        nodes.append(helper.make_node("Squeeze", ["r", "axes"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["h", "w", 3])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [*SIZE, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    candidates = {
        "resize_uint8": lambda s: lambda a: s.run(["y"], {"x": a})[0],
        "resize_float": lambda s: lambda a: s.run(["y"], {"x": a})[0],
    }
    sessions = {"resize_uint8": resize_model(TensorProto.UINT8), "resize_float": resize_model(TensorProto.FLOAT)}
    fixed = ort.InferenceSession(
        preprocess_graph(SIZE, BIRDER_RGB_STATS, resized_output=True).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    runners = {name: candidates[name](sessions[name]) for name in sessions}
    runners["matmul_fixed_point"] = lambda a: fixed.run(["resized"], {"image": a})[0]
    results: dict[str, dict] = {name: {"per_photo": {}} for name in runners}
    for path in sorted((ROOT / "tests/data/photos").glob("*.*g")):
        image = Image.open(path)
        rgb = to_rgb(image)
        pixels = np.asarray(rgb)
        expected = np.asarray(rgb.resize((SIZE[1], SIZE[0]), Image.Resampling.BICUBIC)).astype(np.int32)
        for name, run in runners.items():
            diff = np.abs(run(pixels).astype(np.int32) - expected)
            results[name]["per_photo"][path.name] = {
                "equal_fraction": round(float((diff == 0).mean()), 6),
                "max_levels": int(diff.max()),
            }
    for result in results.values():
        photos = result["per_photo"].values()
        result["min_equal_fraction"] = min(p["equal_fraction"] for p in photos)
        result["max_levels"] = max(p["max_levels"] for p in photos)
    out = ROOT / "benchmarks/results/portability_resize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"onnxruntime": ort.__version__, "pillow": Image.__version__, "size": list(SIZE), "candidates": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        print(f"{name:20s} min equal {result['min_equal_fraction']:.4%}  max {result['max_levels']} levels")


if __name__ == "__main__":
    main()
