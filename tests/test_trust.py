"""A model folder is untrusted input: each case builds a bad folder from a copy of ``tiny_export_dir`` and checks
that the runtime, ``predict`` and ``info`` refuse it the same way (ModelDirError, exit 5, one line, nothing read or
written outside the folder), and that hostile image inputs never hang, never read without bound, and are named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from pvt_deploy import Runtime
from pvt_deploy.cli import cli
from pvt_deploy.errors import ImageError, InferenceError, ModelDirError
from pvt_deploy.files import sha256_file
from pvt_deploy.format.manifest import MANIFEST_NAME

onnx = pytest.importorskip("onnx")


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def copy_model(source: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rehash(folder: Path, name: str, target: Path | None = None) -> None:
    """Record ``name``'s current sha256 and size (of ``target`` if given), as an attacker would."""
    path = target or folder / name

    def change(manifest: dict[str, Any]) -> None:
        manifest["files"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size}

    edit_manifest(folder, change)


def assert_refused(folder: Path, image: Any, match: str) -> None:
    """Runtime, predict and info all refuse the folder with ModelDirError / exit 5 and one Error line."""
    with pytest.raises(ModelDirError, match=match):
        Runtime(folder, device="cpu").classify(image)
    for args in (("predict", folder, image, "--device", "cpu"), ("info", folder)):
        result = invoke(*args)
        assert result.exit_code == 5, (args[0], result.stdout, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("Error: "), (args[0], result.stderr)
        assert "Traceback" not in result.stderr


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- 1. paths escape the model folder -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_manifest_paths_must_stay_inside_the_folder(
    kind: str, tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    folder = copy_model(tiny_export_dir, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    other = outside / "classify.onnx"  # another valid graph, with its weights next to it
    shutil.copy(folder / "classify.onnx", other)
    shutil.copy(folder / "weights.bin", outside / "weights.bin")
    if kind == "symlink":
        (folder / "classify.onnx").unlink()
        (folder / "classify.onnx").symlink_to(other)
        name = "classify.onnx"
    else:
        name = "../elsewhere/classify.onnx" if kind == "traversal" else str(other)

    def point_at(manifest: dict[str, Any]) -> None:
        manifest["graphs"]["classify"]["fp32"]["file"] = name
        manifest["files"][name] = {"sha256": sha256_file(other), "size": other.stat().st_size}

    edit_manifest(folder, point_at)
    before = tree(tmp_path)
    assert_refused(folder, photo_paths[0], "outside the model folder")
    assert tree(tmp_path) == before  # nothing written anywhere (no cache, no temp folders)


def test_files_entry_naming_etc_passwd_is_refused(tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]):
    folder = copy_model(tiny_export_dir, tmp_path)
    name = "../../../../etc/passwd"
    edit_manifest(folder, lambda m: m["files"].update({name: {"sha256": "0" * 64, "size": 1}}))
    assert_refused(folder, photo_paths[0], "outside the model folder")


# --- 2. every byte a graph reads answers to the manifest ------------------------------------------------------------


def test_changed_weights_with_updated_hash_are_served(tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]):
    """Replacing weights.bin and its hash gives the new weights' answers (the old cache kept serving the old ones)."""
    folder = copy_model(tiny_export_dir, tmp_path)
    before = Runtime(folder, device="cpu").classify(photo_paths)
    weights = np.fromfile(folder / "weights.bin", dtype=np.float32)
    (weights * np.float32(1.5)).tofile(folder / "weights.bin")
    rehash(folder, "weights.bin")
    after = Runtime(folder, device="cpu").classify(photo_paths)
    assert not np.allclose(before, after, atol=1e-4)


def test_external_data_not_listed_in_the_manifest_is_refused(
    tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    folder = copy_model(tiny_export_dir, tmp_path)
    edit_manifest(folder, lambda m: m["files"].pop("weights.bin"))
    assert_refused(folder, photo_paths[0], "does not list with a checksum")


# --- 3. a swapped graph is checked against the manifest -------------------------------------------------------------


def _toy_classifier(path: Path, metadata_from: Path, size: int, classes: int) -> None:
    """A valid graph with the classify outputs, but ``classes`` classes and a ``size`` x ``size`` input."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((3, classes), np.float32), "head")
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("Identity", ["pooled"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3]),
        ],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    source = onnx.load(str(metadata_from), load_external_data=False)
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("swap", "match"),
    [
        ("no-metadata", "not a pvt-deploy graph"),
        ("1000-classes", "output 'probabilities' is float32 \\[batchx1000\\]"),
        ("224x224", "input 'input' is float32 \\[batchx3x224x224\\]"),
        ("embed-as-classify", "outputs \\['embedding'\\] differ"),
    ],
)
def test_swapped_graph_with_updated_hash_is_refused(
    swap: str, match: str, tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    folder = copy_model(tiny_export_dir, tmp_path)
    target = folder / "classify.onnx"
    if swap == "no-metadata":
        model = onnx.load(str(target), load_external_data=False)
        del model.metadata_props[:]
        onnx.save(model, str(target))
    elif swap == "1000-classes":
        _toy_classifier(target, tiny_export_dir / "classify.onnx", 64, 1000)
    elif swap == "224x224":
        _toy_classifier(target, tiny_export_dir / "classify.onnx", 224, 10)
    else:
        shutil.copy(folder / "embed.onnx", target)
    rehash(folder, "classify.onnx")
    before = tree(folder)
    assert_refused(folder, photo_paths[0], match)
    assert tree(folder) == before  # a failed load leaves nothing behind (no .ort-cache/.classify.*.tmp)


def test_runtime_uses_the_manifest_outputs_of_a_three_stage_features_graph(
    tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    """export always writes stage1..stage4; a features graph cut to three stages (edited with onnx, manifest
    updated) gives exactly those three, not the four of a module constant."""
    folder = copy_model(tiny_export_dir, tmp_path)
    path = folder / "features.onnx"
    model = onnx.load(str(path), load_external_data=False)
    kept = [output for output in model.graph.output if output.name != "stage4"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path))
    rehash(folder, "features.onnx")
    edit_manifest(
        folder,
        lambda m: m["graphs"]["features"]["fp32"].update(
            outputs=[o for o in m["graphs"]["features"]["fp32"]["outputs"] if o["name"] != "stage4"]
        ),
    )
    maps = Runtime(folder, device="cpu").features(photo_paths[:2])
    full = Runtime(tiny_export_dir, device="cpu").features(photo_paths[:2])
    assert list(maps) == ["stage1", "stage2", "stage3"]
    for name, value in maps.items():
        np.testing.assert_allclose(value, full[name], atol=1e-5)


# --- 4. a malformed manifest ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("file-record-is-a-string", "must be \\{'sha256'"),
        ("graph-not-in-files", "is not listed \\(with its sha256\\)"),
        ("no-input-section", "no 'input' section"),
        ("files-is-a-list", "'files' must map"),
        ("graph-entry-is-a-number", "must be \\{'file'"),
        ("labels-disagree-with-classes", "labels for 10 classes"),
    ],
)
def test_malformed_manifest_is_one_line_everywhere(
    case: str, match: str, tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    folder = copy_model(tiny_export_dir, tmp_path)
    changes: dict[str, Callable[[dict[str, Any]], None]] = {
        "file-record-is-a-string": lambda m: m["files"].update({"classify.onnx": "deadbeef"}),
        "graph-not-in-files": lambda m: m["files"].pop("classify.onnx"),
        "no-input-section": lambda m: m.pop("input"),
        "files-is-a-list": lambda m: m.update(files=list(m["files"])),
        "graph-entry-is-a-number": lambda m: m["graphs"]["classify"].update(fp32=7),
        "labels-disagree-with-classes": lambda m: m.update(labels=m["labels"][:3]),
    }
    edit_manifest(folder, changes[case])
    assert_refused(folder, photo_paths[0], match)


# --- 5. only regular files are opened, with a size cap --------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_export_dir: Path) -> Runtime:
    return Runtime(tiny_export_dir, device="cpu")


def _with_deadline(function: Callable[[], Any], seconds: float = 30) -> Any:
    """Run ``function`` in a daemon thread; fail (instead of hanging the suite) if it does not return in time."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_an_item_error_not_a_hang(runtime: Runtime, photo_paths: list[Path], tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    result = _with_deadline(lambda: runtime.classify([photo_paths[0], fifo], on_error="collect"))
    assert result.ok.tolist() == [True, False]
    assert "not a regular file" in str(result.errors[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_predict_and_embed_skip_fifos_with_a_named_error(
    tiny_export_dir: Path, photo_paths: list[Path], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photo_paths[0], images / "good.png")
    os.mkfifo(images / "fifo.jpg")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for args in (
        ["predict", str(tiny_export_dir), str(images / "good.png"), str(images / "fifo.jpg"), "--device", "cpu"],
        ["embed", str(tiny_export_dir), str(images), "--out", str(tmp_path / "out"), "--device", "cpu"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pvt_deploy", *args], capture_output=True, text=True, timeout=120, env=env
        )
        assert done.returncode == 4, done.stderr
        assert "fifo.jpg: not a regular file" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "paths.txt").read_text().strip().endswith("good.png")


def test_dev_zero_is_never_read(runtime: Runtime) -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(ImageError, match="/dev/zero: not a regular file"):
        _with_deadline(lambda: runtime.classify("/dev/zero"))


def test_image_file_size_cap_is_checked_before_reading(tiny_export_dir: Path, photo_paths: list[Path]) -> None:
    size = photo_paths[5].stat().st_size
    small = Runtime(tiny_export_dir, device="cpu", max_image_bytes=size - 1)
    with pytest.raises(ImageError, match=f"{size} bytes exceeds the image file limit of {size - 1}"):
        small.classify(photo_paths[5])
    with pytest.raises(ImageError, match="exceeds the image file limit"):
        small.classify(photo_paths[5].read_bytes())
    Runtime(tiny_export_dir, device="cpu", max_image_bytes=size).classify(photo_paths[5])


# --- 6. images with no pixels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), "pil"],
    ids=["0x0x3", "0x5x3", "5x0", "pil-0x0"],
)
def test_zero_pixel_images_are_empty_image_errors(runtime: Runtime, image: Any) -> None:
    image = Image.new("RGB", (0, 0)) if isinstance(image, str) else image
    with pytest.raises(ImageError, match="empty image"):
        runtime.classify(image)
    result = runtime.classify([image, np.zeros((64, 64, 3), np.uint8)], on_error="collect")
    assert result.ok.tolist() == [False, True] and "empty image" in str(result.errors[0])


# --- 7. onnxruntime failures at run time ----------------------------------------------------------------------------


def _exploding_classifier(path: Path, metadata_from: Path) -> None:
    """A classify graph that matches the manifest (64x64 in, 10 classes, 128-d embedding) but asks onnxruntime, at
    run time, for a [2000000 * batch, 2000000] float tensor (a ConstantOfShape whose shape depends on the input, so
    nothing is folded when the session is created)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> Any:
        return numpy_helper.from_array(value, name)

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "head"], ["raw_logits"]),
        helper.make_node("MatMul", ["pooled", "project"], ["embedding"]),
        helper.make_node("Shape", ["input"], ["input_shape"]),
        helper.make_node("Slice", ["input_shape", "zero", "one"], ["batch"]),
        helper.make_node("Mul", ["batch", "huge"], ["rows"]),
        helper.make_node("Concat", ["rows", "huge"], ["big_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "nothing"], ["zero_total"]),
        helper.make_node("Add", ["raw_logits", "zero_total"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers = [
        const("head", np.ones((3, 10), np.float32)),
        const("project", np.ones((3, 128), np.float32)),
        const("zero", np.array([0], np.int64)),
        const("one", np.array([1], np.int64)),
        const("huge", np.array([2_000_000], np.int64)),
        const("nothing", np.array(0.0, np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "exploding",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 128]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.extend(onnx.load(str(metadata_from), load_external_data=False).metadata_props)
    onnx.save(model, str(path))


def test_an_onnxruntime_run_failure_is_one_typed_error_line(
    tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    """A graph that passes every load-time check but cannot allocate what it asks for at run time is one
    InferenceError (exit 14, one ``Error:`` line), not an onnxruntime traceback with exit 1."""
    folder = copy_model(tiny_export_dir, tmp_path)
    _exploding_classifier(folder / "classify.onnx", tiny_export_dir / "classify.onnx")
    rehash(folder, "classify.onnx")
    runtime = Runtime(folder, device="cpu")
    runtime.load(["classify"])  # loads and agrees with the manifest: the failure is the run's
    with pytest.raises(InferenceError, match="onnxruntime could not run classify.onnx"):
        runtime.classify(photo_paths[0])
    result = invoke("predict", folder, photo_paths[0], "--device", "cpu")
    assert result.exit_code == InferenceError.exit_code == 14, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: onnxruntime could not run classify.onnx"), result.stderr
    assert "Traceback" not in result.stderr


def _external_tensor(name: str, location: str, values: np.ndarray) -> Any:
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(values.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(values.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.mark.parametrize("place", ["function-constant", "function-default-attribute", "if-subgraph"])
def test_external_data_reached_through_functions_and_subgraphs_must_be_listed(
    place: str, tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    """``unlisted.bin`` sits in the folder but not in the manifest: a tensor reading it from a model-local
    function's Constant (it loaded and ``predict`` exited 0), a function's attribute default or an If branch is
    refused before onnxruntime opens it (exit 5)."""
    from onnx import helper

    folder = copy_model(tiny_export_dir, tmp_path)
    np.zeros(10, np.float32).tofile(folder / "unlisted.bin")
    path = folder / "classify.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = _external_tensor("offset_value", "unlisted.bin", np.zeros(10, np.float32))
    if place == "if-subgraph":
        branch = helper.make_graph(
            [helper.make_node("Constant", [], ["branch_out"], value=tensor)],
            "branch",
            [],
            [helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, [10])],
        )
        model.graph.node.append(
            helper.make_node("If", ["unused_condition"], ["unused"], then_branch=branch, else_branch=branch)
        )
    else:
        if place == "function-constant":
            nodes = [helper.make_node("Constant", [], ["c"], value=tensor), helper.make_node("Add", ["x", "c"], ["y"])]
            defaults = []
        else:
            nodes = [helper.make_node("Identity", ["x"], ["y"])]
            defaults = [helper.make_attribute("unused", tensor)]
        function = helper.make_function(
            "pvt.test", "Offset", ["x"], ["y"], nodes, [helper.make_opsetid("", 17)], attribute_protos=defaults
        )
        model.functions.append(function)
        model.opset_import.append(helper.make_opsetid("pvt.test", 1))
    onnx.save(model, str(path))
    rehash(folder, "classify.onnx")
    assert_refused(folder, photo_paths[0], "reads external data 'unlisted.bin'")
