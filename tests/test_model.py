"""The PVT v2 family: birder's state-dict layout key for key, output shapes, sizes, and the LayerNorm eps knob."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pvt_deploy.model.pvt_v2 import (
    BIRDER_LAYER_NORM_EPS,
    PVT_V2_CONFIGS,
    TRAINING_LAYER_NORM_EPS,
    create_model,
)

LAYOUTS = json.loads((Path(__file__).resolve().parent / "golden" / "birder_state_dict_layouts.json").read_text())


def _layout_digest(state: dict[str, torch.Tensor]) -> dict:
    lines = "\n".join(f"{key}:{list(value.shape)}" for key, value in state.items())
    return {
        "num_keys": len(state),
        "num_params": int(sum(value.numel() for value in state.values())),
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
    }


def test_every_birder_size_is_registered() -> None:
    assert set(LAYOUTS) <= set(PVT_V2_CONFIGS)
    expected = {"pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"}
    assert expected <= set(LAYOUTS)


@pytest.mark.parametrize("network", sorted(LAYOUTS))
def test_state_dict_matches_birder_key_for_key(network: str) -> None:
    """Same keys, in the same order, with the same shapes as birder 0.8.4's model (fingerprint from birder)."""
    with torch.device("meta"):
        model = create_model(network, 550)
    assert _layout_digest(model.state_dict()) == LAYOUTS[network]


def test_b2_has_25m_parameters_and_birders_output_shapes() -> None:
    with torch.device("meta"):
        model = create_model("pvt_v2_b2", 550, size=(384, 384)).eval()
        x = torch.empty(2, 3, 384, 384)
        features = model.detection_features(x)
        embedding = model.embedding(x)
        logits = model(x)
    assert 25.0e6 < sum(p.numel() for p in model.parameters()) < 25.5e6
    assert {name: tuple(value.shape) for name, value in features.items()} == {
        "stage1": (2, 64, 96, 96),
        "stage2": (2, 128, 48, 48),
        "stage3": (2, 320, 24, 24),
        "stage4": (2, 512, 12, 12),
    }
    assert tuple(embedding.shape) == (2, 512)
    assert tuple(logits.shape) == (2, 550)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (32, 160)])
def test_any_multiple_of_32_works(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = create_model("pvt_v2_tiny", 5, size=(64, 64)).eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, *size)
        logits = model(x)
        stage4 = model.detection_features(x)["stage4"]
    assert logits.shape == (1, 5)
    assert torch.isfinite(logits).all()
    assert tuple(stage4.shape[-2:]) == (size[0] // 32, size[1] // 32)


def test_size_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        create_model("pvt_v2_tiny", 5, size=(100, 100))


def test_unknown_network_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown network"):
        create_model("resnet50", 5)


@pytest.mark.parametrize("eps", [BIRDER_LAYER_NORM_EPS, TRAINING_LAYER_NORM_EPS])
def test_layer_norm_eps_reaches_every_layer_norm(eps: float) -> None:
    model = create_model("pvt_v2_tiny", 5, size=(64, 64), layer_norm_eps=eps)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == eps for m in norms)
    assert model.layer_norm_eps == eps


def test_embedding_and_classify_compose_to_forward() -> None:
    torch.manual_seed(0)
    model = create_model("pvt_v2_tiny", 7, size=(64, 64)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model.classify(model.embedding(x)), model(x))
        assert torch.allclose(model.embedding_from_features(model.forward_features(x)), model.embedding(x))
