"""The runtime and its CLI commands in a subprocess where ``import torch`` fails, against in-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pvt_deploy import Runtime

REPO = Path(__file__).resolve().parent.parent

BLOCKER = '''
"""sitecustomize for the torch-free test: any import of torch (or torchvision) fails, as if not installed."""
import importlib.abc
import sys

BLOCKED = ("torch", "torchvision")


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the torch-free test)", name=name)
        return None


sys.meta_path.insert(0, _BlockTorch())
'''

RUNTIME_SCRIPT = """
import json, sys
import numpy as np
try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the torch blocker is not active")
from pvt_deploy import Runtime

model_dir, out, *photos = sys.argv[1:]
runtime = Runtime(model_dir, device="cpu")
probabilities, embedding = runtime.classify(photos, return_embedding=True)
features = runtime.features(photos)
arrays = {"probabilities": probabilities, "embedding": embedding, "embed": runtime.embed(photos),
          "preprocess": runtime.preprocess(photos), **features}
np.savez(out, **arrays)
print(json.dumps({"predict": runtime.predict(photos, top_k=3),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "torchvision"))}))
"""


@pytest.fixture(scope="module")
def torch_free_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site_dir = tmp_path_factory.mktemp("blocker")
    (site_dir / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site_dir), str(REPO)])
    env["PVT_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_blocker_really_blocks_torch(torch_free_env: dict[str, str], tmp_path: Path) -> None:
    done = _run(["-c", "import torch"], torch_free_env, tmp_path)
    assert done.returncode != 0 and "blocked by the torch-free test" in done.stderr


def test_runtime_without_torch_equals_in_process(
    model_dir: Path, photo_paths: list[Path], torch_free_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUNTIME_SCRIPT))
    out = tmp_path / "out.npz"
    done = _run([str(script), str(model_dir), str(out), *map(str, photo_paths)], torch_free_env, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []  # neither torch nor onnx was imported

    runtime = Runtime(model_dir, device="cpu")
    got = np.load(out)
    probabilities, embedding = runtime.classify(photo_paths, return_embedding=True)
    expected = {
        "probabilities": probabilities,
        "embedding": embedding,
        "embed": runtime.embed(photo_paths),
        "preprocess": runtime.preprocess(photo_paths),
        **runtime.features(photo_paths),
    }
    assert sorted(got.files) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    predicted = [[[label, p] for label, p in answer] for answer in runtime.predict(photo_paths, top_k=3)]
    assert report["predict"] == predicted


def test_cli_commands_without_torch_equal_in_process(
    model_dir: Path, photo_paths: list[Path], torch_free_env: dict[str, str], tmp_path: Path
) -> None:
    runtime = Runtime(model_dir, device="cpu")
    photos = [str(p) for p in photo_paths]
    cli = ["-m", "pvt_deploy"]

    done = _run([*cli, "predict", str(model_dir), *photos, "--json", "--top-k", "3", "--device", "cpu"],
                torch_free_env, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    expected = runtime.predict(photos, top_k=3)
    assert [r["image"] for r in records] == photos
    for record, answer in zip(records, expected, strict=True):
        assert [(p["label"], p["probability"]) for p in record["predictions"]] == answer

    done = _run([*cli, "embed", str(model_dir), str(photo_paths[0].parent), "--out", str(tmp_path / "emb"),
                 "--device", "cpu"], torch_free_env, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = (tmp_path / "emb" / "paths.txt").read_text().splitlines()
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "embeddings.npy"), runtime.embed(paths))

    done = _run([*cli, "features", str(model_dir), photos[2], "--out", str(tmp_path / "f.npz"), "--device", "cpu"],
                torch_free_env, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    stored = np.load(tmp_path / "f.npz")
    for name, value in runtime.features(photos[2]).items():
        np.testing.assert_array_equal(stored[name], value)

    done = _run([*cli, "info", str(model_dir), "--json"], torch_free_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checksums_ok"] is True
