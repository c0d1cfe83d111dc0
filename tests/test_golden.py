"""Our model, checkpoint loader and preprocessing against golden files made by birder 0.8.4 (dev/make_goldens.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pvt_deploy.model.checkpoint import load_checkpoint, save_checkpoint
from pvt_deploy.model.pvt_v2 import TRAINING_LAYER_NORM_EPS
from pvt_deploy.preprocess import preprocess

GOLDEN = Path(__file__).resolve().parent / "golden"
PHOTOS = Path(__file__).resolve().parent / "data" / "photos"
MODEL_TOLERANCE = 1e-5
PREPROCESS_TOLERANCE = 1e-6
STAGES = ("stage1", "stage2", "stage3", "stage4")


@pytest.fixture(scope="module")
def goldens() -> dict:
    return json.loads((GOLDEN / "goldens.json").read_text())


@pytest.fixture(scope="module")
def birder_checkpoint():
    return load_checkpoint(GOLDEN / "birder_pvt_v2_tiny.pt")


@pytest.fixture(scope="module")
def birder_outputs() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / "birder_pvt_v2_tiny_outputs.npz"))


def test_birder_saved_checkpoint_is_recognised(birder_checkpoint, goldens) -> None:
    assert birder_checkpoint.network == "pvt_v2_tiny"  # inferred from shapes; birder built it as b0 + config
    assert birder_checkpoint.config == goldens["checkpoint"]["config"]
    assert birder_checkpoint.size == (64, 64)
    assert birder_checkpoint.labels == [f"class_{i}" for i in range(10)]
    assert birder_checkpoint.birder_version == "v0.8.4"
    assert birder_checkpoint.rgb_stats == goldens["checkpoint"]["rgb_stats"]
    assert not birder_checkpoint.model.training


def test_logits_embedding_and_features_match_birder(birder_checkpoint, birder_outputs) -> None:
    model = birder_checkpoint.model
    x = torch.from_numpy(birder_outputs["input"])
    with torch.inference_mode():
        ours = {"logits": model(x), "embedding": model.embedding(x), **model.detection_features(x)}
        ours["logits_nonsquare"] = model(torch.from_numpy(birder_outputs["input_nonsquare"]))
    for key, value in ours.items():
        expected = birder_outputs[key]
        assert value.shape == expected.shape, key
        assert np.abs(value.numpy() - expected).max() <= MODEL_TOLERANCE, key
    # the comparison is meaningful: outputs are far from constant
    assert np.ptp(birder_outputs["logits"]) > 1.0


def test_training_eps_changes_outputs_slightly(birder_outputs) -> None:
    """The 1e-5 LayerNorm convention is a real, small difference from birder's 1e-6."""
    loaded = load_checkpoint(GOLDEN / "birder_pvt_v2_tiny.pt", layer_norm_eps=TRAINING_LAYER_NORM_EPS)
    assert loaded.layer_norm_eps == TRAINING_LAYER_NORM_EPS
    with torch.inference_mode():
        logits = loaded.model(torch.from_numpy(birder_outputs["input"])).numpy()
    difference = np.abs(logits - birder_outputs["logits"]).max()
    assert 0 < difference < 0.05


def test_preprocessing_matches_birder(goldens) -> None:
    expected = np.load(GOLDEN / "birder_preprocess.npz")
    cases = goldens["preprocess"]["cases"]
    assert {case["photo"] for case in cases} == {p.name for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg")}
    for case in cases:
        ours = preprocess(PHOTOS / case["photo"], case["size"], goldens["checkpoint"]["rgb_stats"],
                          center_crop=case["center_crop"])  # fmt: skip
        reference = expected[case["key"]]
        assert ours.shape == (1, *reference.shape), case
        assert ours.dtype == np.float32
        assert np.abs(ours[0] - reference).max() <= PREPROCESS_TOLERANCE, case


def test_infer_image_path_matches_birder(birder_checkpoint, goldens) -> None:
    """birder's one-image inference (infer_image) vs our preprocessing + model on the same photo."""
    spec = goldens["infer_image"]
    reference = np.load(GOLDEN / "birder_infer_image.npz")
    batch = preprocess(PHOTOS / spec["photo"], spec["size"], birder_checkpoint.rgb_stats)
    with torch.inference_mode():
        embedding = birder_checkpoint.model.embedding(torch.from_numpy(batch))
        probabilities = torch.softmax(birder_checkpoint.model.classify(embedding), dim=1)
    assert np.abs(probabilities.numpy() - reference["probabilities"]).max() <= MODEL_TOLERANCE
    assert np.abs(embedding.numpy() - reference["embedding"]).max() <= MODEL_TOLERANCE


def test_resaving_a_birder_checkpoint_reproduces_birders_file_contents(birder_checkpoint, tmp_path) -> None:
    """What save_checkpoint writes has the same keys and values as what birder's checkpoint_model wrote."""
    ours_path = save_checkpoint(
        tmp_path / "resaved.pt",
        birder_checkpoint.model,
        class_to_idx=birder_checkpoint.class_to_idx,
        rgb_stats=birder_checkpoint.rgb_stats,
    )
    ours = torch.load(ours_path, weights_only=True)
    birders = torch.load(GOLDEN / "birder_pvt_v2_tiny.pt", weights_only=True)
    assert list(ours) == list(birders)  # same keys, same order
    for key in birders:
        if key == "state":
            assert list(ours["state"]) == list(birders["state"])
            for name, tensor in birders["state"].items():
                assert torch.equal(ours["state"][name], tensor), name
        else:
            assert ours[key] == birders[key], key


def test_our_checkpoint_loaded_in_birder_gave_identical_outputs() -> None:
    """Recorded by dev/make_goldens.py: birder's load_model (.pt and .safetensors) and load_checkpoint on a file
    written by our save_checkpoint; re-check the record so a regenerated golden with a difference fails CI."""
    report = json.loads((GOLDEN / "our_checkpoint_in_birder.json").read_text())
    assert set(report["birder_loaders"]) == {
        "fs_ops.load_model(.pt)",
        "fs_ops.load_model(.safetensors, st=True)",
        "fs_ops.load_checkpoint(.pt)",
    }
    for loader, differences in report["birder_loaders"].items():
        assert set(differences) >= {"logits", "embedding", *STAGES}, loader
        assert max(differences.values()) <= MODEL_TOLERANCE, loader
