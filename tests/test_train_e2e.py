"""End to end on the tiny config, as a user would run it: MMCR pretraining -> fine-tuning -> export -> verify ->
predict on an image the training never saw."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pvt_deploy.model.checkpoint import load_checkpoint
from pvt_deploy.preprocess import preprocess
from tests.test_train_data import make_image_folder

REPO = Path(__file__).resolve().parent.parent
FAST = ["--batch-size", "8", "--workers", "1", "--threads", "1", "--no-progress"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pvt_deploy", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"pvt-deploy {' '.join(args[:2])} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow
def test_pretrain_finetune_export_verify_predict(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=9)
    held_back = tmp_path / "held_back.png"
    shutil.move(data / "stripes" / "008.png", held_back)

    _cli("train", "mmcr", str(data), "--network", "pvt_v2_tiny", "--size", "32", "--projector-dims", "64,64,32",
         "--steps", "3", "--out", str(tmp_path / "mmcr"), *FAST)  # fmt: skip
    backbone = tmp_path / "mmcr" / "pvt_v2_tiny_mmcr_3.pt"
    assert load_checkpoint(backbone).num_classes == 0

    _cli("train", "finetune", str(data), "--init", str(backbone), "--full", "--steps", "3", "--lr", "1e-3",
         "--out", str(tmp_path / "ft"), *FAST)  # fmt: skip
    checkpoint = tmp_path / "ft" / "pvt_v2_tiny_finetune_3.pt"
    loaded = load_checkpoint(checkpoint)
    assert loaded.class_to_idx == {"discs": 0, "stripes": 1} and loaded.size == (32, 32)
    pretrained = load_checkpoint(backbone).model.state_dict()
    key = "body.stage4.blocks.0.mlp.fc1.weight"
    assert not torch.equal(pretrained[key], loaded.model.state_dict()[key])  # --full trained the body too

    exported = tmp_path / "exported"
    _cli("export", str(checkpoint), "--out", str(exported))
    _cli("verify", str(exported), "--checkpoint", str(checkpoint), "--images", str(held_back))
    answer = json.loads(_cli("predict", str(exported), str(held_back), "--json", "-k", "2").stdout)
    assert len(answer) == 1 and answer[0]["image"].endswith("held_back.png")
    predictions = answer[0]["predictions"]
    assert {p["label"] for p in predictions} == {"discs", "stripes"}
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)

    # the exported graph's top label is PyTorch's on the same (runtime-preprocessed) image
    x = torch.from_numpy(preprocess(held_back, loaded.size, loaded.rgb_stats))
    with torch.no_grad():
        top = loaded.labels[int(loaded.model(x).argmax())]
    assert predictions[0]["label"] == top
