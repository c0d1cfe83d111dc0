"""A `train finetune` checkpoint, loaded by birder 0.8.4 (recorded by dev/check_birder_finetune.py), gives the
outputs our loader gives today. birder itself is not needed here: its numbers are in the golden JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pvt_deploy.model.checkpoint import load_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden"
RECORD = json.loads((GOLDEN / "birder_loads_finetune.json").read_text())


def test_birder_recorded_identical_outputs_when_it_loaded_our_checkpoint() -> None:
    assert RECORD["birder_version"].lstrip("v") == "0.8.4"
    assert RECORD["class_to_idx_agree"] and RECORD["birder_class_to_idx"] == {"discs": 0, "stripes": 1}
    assert max(RECORD["max_abs_diff_ours_vs_birder"].values()) <= 1e-5
    # the MMCR run's files, under birder's names: backbone, whole net (birder's MMCR class, strict) and states
    mmcr = RECORD["mmcr_checkpoints"]
    assert mmcr["training_states_read_by_birder"]
    assert set(mmcr["max_abs_diff_ours_vs_birder"]) == {"backbone_embedding", "encoder", "momentum_encoder"}
    assert max(mmcr["max_abs_diff_ours_vs_birder"].values()) <= 1e-5


def test_our_loader_still_reproduces_birders_outputs() -> None:
    path = GOLDEN / RECORD["checkpoint"].split("/")[-1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == RECORD["checkpoint_sha256"]
    loaded = load_checkpoint(path)
    assert loaded.network == "pvt_v2_tiny" and loaded.class_to_idx == RECORD["birder_class_to_idx"]
    x = torch.randn(*RECORD["inputs"]["shape"], generator=torch.Generator().manual_seed(RECORD["inputs"]["seed"]))
    with torch.no_grad():
        ours = {"logits": loaded.model(x), "embedding": loaded.model.embedding(x)}
    for loader in ("load_model", "load_checkpoint"):
        for output, value in ours.items():
            theirs = torch.tensor(RECORD["birder_outputs"][loader][output])
            assert torch.allclose(value, theirs, rtol=0, atol=1e-5), (loader, output)
