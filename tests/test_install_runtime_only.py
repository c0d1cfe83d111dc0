"""A real runtime-only install, the way a CPU-only service installs it (plain ``onnxruntime``, no extras, no torch):
every CLI command's ``--help`` works, and one real call of each either does its job or prints one ``Error:`` line
naming what is missing. No traceback anywhere."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pvt_deploy.cli import LAZY_COMMANDS
from pvt_deploy.errors import DownloadError, MissingExtraError, SearchIndexError

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "data" / "photos" / "chelsea.png"

pytestmark = pytest.mark.slow

# The packages a CPU-only service installs instead of the default onnxruntime-gpu (README.md, "Installs").
CPU_ONLY_REQUIREMENTS = ["onnxruntime", "numpy", "pillow", "click", "tqdm"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with only the runtime's dependencies and pvt-deploy itself (``pip install --no-deps``).

    For speed the venv gets no pip of its own (this interpreter's pip installs into it with ``--python``) and the
    wheel is built here without an isolated build environment when setuptools is at hand."""
    root = tmp_path_factory.mktemp("runtime-only")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    source = root / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "pvt_deploy"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(root / "wheels"), str(source)], check=True,
                   timeout=600)  # fmt: skip
    (wheel,) = (root / "wheels").glob("pvt_deploy-*.whl")
    into_venv = [*pip, "--python", str(venv / "bin" / "python"), "install"]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on it would look installed
    subprocess.run([*into_venv, *CPU_ONLY_REQUIREMENTS], check=True, timeout=600, env=clean)
    subprocess.run([*into_venv, "--no-deps", str(wheel)], check=True, timeout=600, env=clean)
    return venv


def _cli(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PVT_DEPLOY_CACHE"] = str(cwd / "cache")
    return subprocess.run(
        [str(venv / "bin" / "pvt-deploy"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_venv_is_really_runtime_only(runtime_venv: Path) -> None:
    probe = subprocess.run(
        [
            str(runtime_venv / "bin" / "python"),
            "-c",
            "import importlib.util as u, importlib.metadata as m, onnxruntime as o; "
            "print(m.version('onnxruntime') != '', 'CUDAExecutionProvider' in o.get_available_providers(), "
            "[n for n in ('torch', 'onnx') if u.find_spec(n)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "True False []"  # plain onnxruntime (no CUDA provider), neither torch nor onnx


def _real_calls(model_dir: Path, work: Path) -> dict[str, tuple[list[str], int]]:
    """One real call per command -> (arguments, expected exit code)."""
    return {
        "download": (
            ["download", "pvt_v2_b2_mmcr-il-all", "--quiet", "--base-url", f"http://127.0.0.1:{_closed_port()}"],
            DownloadError.exit_code,
        ),
        "export": (["export", "pvt_v2_b2_mmcr-il-all", "--random-weights"], MissingExtraError.exit_code),
        "verify": (["verify", str(model_dir)], MissingExtraError.exit_code),
        "predict": (["predict", str(model_dir), str(PHOTO), "--device", "cpu"], 0),
        "embed": (["embed", str(model_dir), str(PHOTO), "--out", str(work / "emb"), "--device", "cpu"], 0),
        "features": (["features", str(model_dir), str(PHOTO), "--out", str(work / "f.npz"), "--device", "cpu"], 0),
        "info": (["info", str(model_dir)], 0),
        "train": (["train", "mmcr", str(work), "--out", str(work / "run")], MissingExtraError.exit_code),
        "bench": (["bench", str(model_dir), "--quick"], MissingExtraError.exit_code),
        "serve": (["serve", str(model_dir)], MissingExtraError.exit_code),
        "conformance": (["conformance", str(model_dir), "--out", str(work / "vectors")], 0),
        "index": (["index", "build", str(work / "emb"), "--db", str(work / "db")], MissingExtraError.exit_code),
        "search": (["search", "--db", str(work / "no-db"), str(PHOTO)], SearchIndexError.exit_code),
        "duplicates": (["duplicates", "--db", str(work / "no-db")], SearchIndexError.exit_code),
    }


def test_every_command_helps_and_runs_without_a_traceback(
    runtime_venv: Path, tiny_export_dir: Path, tmp_path: Path
) -> None:
    model_dir = Path(shutil.copytree(tiny_export_dir, tmp_path / "model"))
    calls = _real_calls(model_dir, tmp_path)
    assert set(calls) == set(LAZY_COMMANDS), "every command needs a real call here"
    for command in sorted(LAZY_COMMANDS):
        shown = _cli(runtime_venv, command, "--help", cwd=tmp_path)
        assert "Traceback" not in shown.stdout + shown.stderr, f"{command} --help:\n{shown.stderr}"
        extras = LAZY_COMMANDS[command][2]
        if shown.returncode == 0:
            assert "Usage:" in shown.stdout
        else:  # a command whose module needs its extra even for --help says which one
            assert shown.returncode == MissingExtraError.exit_code and extras, shown.stderr
            assert shown.stderr.startswith(f"Error: `pvt-deploy {command}` needs the [")

        args, expected = calls[command]
        ran = _cli(runtime_venv, *args, cwd=tmp_path)
        output = ran.stdout + ran.stderr
        assert "Traceback" not in output, f"{' '.join(args)}:\n{output}"
        assert ran.returncode == expected, f"{' '.join(args)} exited {ran.returncode}:\n{output}"
        if expected:
            errors = [line for line in ran.stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1, ran.stderr
            if expected == MissingExtraError.exit_code:
                assert "pip install 'pvt-deploy[" in errors[0]
    assert "chelsea.png" in _cli(runtime_venv, "predict", str(model_dir), str(PHOTO), cwd=tmp_path).stdout
