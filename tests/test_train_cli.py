"""`pvt-deploy train` refuses bad input with one `Error:` line and the error's exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy.cli import cli
from tests.test_train_data import make_image_folder

TINY = ["--network", "pvt_v2_tiny", "--size", "32", "--projector-dims", "16,8", "--workers", "0", "--no-progress"]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cli") / "data", per_class=2)


def test_help_lists_both_commands() -> None:
    code, output = _invoke("train", "--help")
    assert code == 0 and "mmcr" in output and "finetune" in output
    code, output = _invoke("train", "mmcr", "--help")
    assert code == 0 and all(flag in output for flag in ("--resume", "--bf16", "--no-flip", "--checkpoint-every"))


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--steps", "2", "--epochs", "1"], 9, "exactly one of --steps and --epochs"),
        (["--steps", "1", "--batch-size", "64"], 9, "fewer than one global batch"),
        (["--steps", "1", "--resume"], 9, "--resume: no mmcr_pvt_v2_tiny_<step>.pt"),
        (["--steps", "1", "--network", "resnet50"], 9, "unknown network 'resnet50'"),
    ],
)
def test_mmcr_option_errors(data: Path, tmp_path: Path, extra: list[str], code: int, message: str) -> None:
    exit_code, output = _invoke("train", "mmcr", str(data), *TINY, "--out", str(tmp_path / "o"), *extra)
    assert exit_code == code, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and message in lines[-1]
    assert "Traceback" not in output


def test_data_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = _invoke("train", "mmcr", str(tmp_path / "empty"), *TINY, "--steps", "1")
    assert code == 8 and "Error: no images" in output
    code, output = _invoke("train", "mmcr", str(tmp_path / "missing"), *TINY, "--steps", "1")
    assert code == 2 and "does not exist" in output  # click's own usage error
    make_image_folder(tmp_path / "one_class", per_class=2)
    single = tmp_path / "one_class" / "stripes"
    code, output = _invoke("train", "finetune", str(single.parent / "discs"), "--init", __file__, "--steps", "1")
    assert code == 8 and "at least two class sub-folders" in output


def test_finetune_init_must_be_a_checkpoint(data: Path, tmp_path: Path) -> None:
    not_a_checkpoint = tmp_path / "weights.pt"
    not_a_checkpoint.write_bytes(b"garbage")
    code, output = _invoke("train", "finetune", str(data), "--init", str(not_a_checkpoint), "--steps", "1")
    assert code == 2 and output.strip().splitlines()[-1].startswith("Error: ")


def test_undecodable_image_in_a_worker_is_one_line_exit_4(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2)
    (data / "discs" / "000.png").write_bytes(b"\x89PNG truncated")
    args = [a for a in TINY if a not in ("--workers", "0")]
    code, output = _invoke("train", "mmcr", str(data), *args, "--workers", "1", "--batch-size", "4", "--steps", "1")
    assert code == 4, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: cannot decode image") and "000.png" in last and "Traceback" not in output


def test_epochs_sets_the_step_count(data: Path, tmp_path: Path) -> None:
    out = str(tmp_path)
    code, output = _invoke("train", "mmcr", str(data), *TINY, "--batch-size", "2", "--epochs", "2", "--out", out)
    assert code == 0, output
    assert "done: step 4" in output  # 4 images / batch 2 = 2 steps per epoch
    assert (tmp_path / "pvt_v2_tiny_mmcr_4.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()
