"""The typed manifest: read and validated in one place, unknown sections kept, per-graph flags honoured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pvt_deploy import Runtime
from pvt_deploy.errors import ModelDirError
from pvt_deploy.manifest import MANIFEST_NAME, Manifest, confined_path, load_manifest


def test_typed_fields_and_raw_sections(tiny_export_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    raw["input"]["preprocess"] = {"steps": ["resize", "crop"]}  # a section this version does not model
    (folder / MANIFEST_NAME).write_text(json.dumps(raw))
    manifest = load_manifest(folder)
    assert isinstance(manifest, Manifest) and manifest.input.size == (64, 64)
    assert manifest.entry("features").output_names == ("stage1", "stage2", "stage3", "stage4")
    assert manifest.files["weights.bin"].size == (folder / "weights.bin").stat().st_size
    assert manifest["input"]["preprocess"] == {"steps": ["resize", "crop"]}  # kept in .raw
    runtime = Runtime(folder, device="cpu")
    assert runtime.manifest.raw["input"]["preprocess"] == {"steps": ["resize", "crop"]}
    assert runtime.metadata["manifest"]["input"]["preprocess"] == {"steps": ["resize", "crop"]}
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
