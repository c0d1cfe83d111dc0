"""The typed manifest: read and validated in one place, unknown sections kept, per-graph flags honoured."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pvt_deploy import Runtime
from pvt_deploy.errors import ModelDirError
from pvt_deploy.format.manifest import MANIFEST_NAME, Manifest, confined_path, load_manifest, write_manifest


def test_typed_fields_and_the_written_document_round_trip(tiny_export_dir: Path) -> None:
    """What export wrote is exactly what the dataclasses read and write back: one description, no raw dict."""
    manifest = load_manifest(tiny_export_dir)
    assert isinstance(manifest, Manifest) and manifest.input.size == (64, 64)
    assert manifest.entry("features").output_names == ("stage1", "stage2", "stage3", "stage4")
    assert manifest.files["weights.bin"].size == (tiny_export_dir / "weights.bin").stat().st_size
    assert manifest.image_entry("classify").file == "classify.image.onnx"
    assert manifest.input.preprocess is not None and manifest.input.preprocess.size == (64, 64)
    written = json.loads((tiny_export_dir / MANIFEST_NAME).read_text())
    assert manifest.to_json() == written
    for removed in ("raw", "get", "__getitem__", "__contains__", "__iter__"):
        assert not hasattr(manifest, removed), removed
    runtime = Runtime(tiny_export_dir, device="cpu")
    assert runtime.metadata["manifest"] == written
    assert runtime.describe()["preprocess"] == written["input"]["preprocess"]
    with pytest.raises(ModelDirError, match="no 'int4' variant"):
        manifest.entry("classify", "int4")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "a\x00b"])
def test_confined_path_refuses_names_that_leave_the_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelDirError):
        confined_path(tmp_path, name)


def test_confined_path_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "inside.bin").write_bytes(b"1")
    (tmp_path / "model" / "alias.bin").symlink_to(tmp_path / "model" / "inside.bin")
    (tmp_path / "model" / "escape.bin").symlink_to(tmp_path / "outside.bin")
    assert confined_path(tmp_path / "model", "alias.bin") == tmp_path / "model" / "alias.bin"
    with pytest.raises(ModelDirError, match="outside the model folder"):
        confined_path(tmp_path / "model", "escape.bin")


def test_a_graph_marked_not_batch_invariant_runs_row_by_row(
    tiny_export_dir: Path, tmp_path: Path, photo_paths: list[Path]
) -> None:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    raw["graphs"]["classify"]["fp32"]["batch_invariant"] = False
    (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    runtime = Runtime(folder, device="cpu", batch_size=4)
    session = runtime.session("classify")
    batches: list[int] = []
    run = session.run

    def recording(batch: np.ndarray, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        batches.append(len(batch))
        return run(batch, names)

    session.run = recording  # type: ignore[method-assign]
    probabilities = runtime.classify(photo_paths[:3])
    assert batches == [1, 1, 1]
    np.testing.assert_allclose(
        probabilities, Runtime(tiny_export_dir, device="cpu").classify(photo_paths[:3]), atol=1e-6
    )


@dataclass(frozen=True, kw_only=True)
class ManifestWithLicense(Manifest):
    """What adding a manifest field takes: this one dataclass field (with a default, so folders written before it
    still load). The JSON key, its type check and its place in ``to_json`` come from the field itself."""

    license: str | None = None


def test_a_new_manifest_field_is_one_dataclass_field_and_one_reader(tiny_export_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    before = load_manifest(folder)
    extended = ManifestWithLicense(**{f.name: getattr(before, f.name) for f in fields(Manifest)}, license="CC-BY-4.0")
    write_manifest(folder, extended)  # the writer needs no change
    document = json.loads((folder / MANIFEST_NAME).read_text())
    assert document["license"] == "CC-BY-4.0"
    assert ManifestWithLicense.from_json(document, folder).license == "CC-BY-4.0"  # the one reader
    assert load_manifest(folder) == before  # readers that do not know the field are unaffected
    old_document = json.loads((tiny_export_dir / MANIFEST_NAME).read_text())
    assert ManifestWithLicense.from_json(old_document, folder).license is None  # older folders still load
    with pytest.raises(ModelDirError, match="'license' must be a string, got 5"):
        ManifestWithLicense.from_json({**document, "license": 5}, folder)


def _edited(tiny_export_dir: Path, tmp_path: Path, change: Any) -> Path:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    document = json.loads((folder / MANIFEST_NAME).read_text())
    change(document)
    (folder / MANIFEST_NAME).write_text(json.dumps(document))
    return folder


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(format_version=True), "unsupported manifest format"),
        (lambda m: m["input"]["resize"].update(center_crop=1e-9), "center_crop must be in"),
        (lambda m: m["input"]["resize"].update(center_crop=float("nan")), "must be a finite number"),
        (lambda m: m["input"]["resize"].update(center_crop=1.5), "center_crop must be in"),
        (lambda m: m.update(num_classes=True), "'num_classes' must be an integer, got True"),
        (lambda m: m["files"]["weights.bin"].update(size=False), "'files.weights.bin.size' must be an integer"),
        (lambda m: m["input"].update(size=[64, True]), "must be an integer"),
        (lambda m: m["input"]["preprocess"]["center_crop"].update(size=[32, 32]), "disagrees with the input"),
    ],
    ids=["format-true", "crop-1e-9", "crop-nan", "crop-1.5", "classes-true", "size-false", "input-true", "contract"],
)
def test_manifest_values_are_strict(tiny_export_dir: Path, tmp_path: Path, change: Any, match: str) -> None:
    """``true`` is not 1, a centre crop must keep the resize bounded, the contract must agree with the input: one
    ModelDirError line each (``format_version: true`` loaded, ``center_crop: 1e-9`` was an OverflowError)."""
    folder = _edited(tiny_export_dir, tmp_path, change)
    with pytest.raises(ModelDirError, match=match):
        Runtime(folder, device="cpu")


def test_a_symlink_loop_is_a_model_dir_error(tiny_export_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    (folder / "weights.bin").unlink()
    (folder / "weights.bin").symlink_to("weights.bin")  # a link to itself (RuntimeError: Symlink loop, before)
    with pytest.raises(ModelDirError, match="weights.bin"):
        Runtime(folder, device="cpu")
