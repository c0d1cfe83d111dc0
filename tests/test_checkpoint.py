"""Loading and saving birder-format checkpoints: layouts, round trips, config inference, and every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pvt_deploy.errors import CheckpointError
from pvt_deploy.files import sha256_file
from pvt_deploy.model.checkpoint import (
    infer_config,
    load_checkpoint,
    make_signature,
    match_network,
    save_checkpoint,
    save_safetensors,
)
from pvt_deploy.model.pvt_v2 import PVT_V2_CONFIGS, TRAINING_LAYER_NORM_EPS, create_model
from tests.fixtures.checkpoints import BIRDER_RGB_STATS, make_tiny_model, tiny_class_to_idx

BIRDER_KEY_ORDER = ["state", "birder_version", "task", "signature", "class_to_idx", "rgb_stats"]


def _outputs(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(x)


def _rewrite(source: Path, target: Path, change) -> Path:
    payload = torch.load(source, weights_only=True)
    change(payload)
    torch.save(payload, target)
    return target


def test_tiny_checkpoint_fixture_loads(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.network == "pvt_v2_tiny"
    assert loaded.labels == [f"class_{i}" for i in range(10)]
    assert loaded.class_to_idx == tiny_class_to_idx()
    assert loaded.size == (64, 64)
    assert loaded.num_classes == 10
    assert loaded.rgb_stats == BIRDER_RGB_STATS
    assert loaded.task == "image_classification"
    assert loaded.birder_version == "v0.8.4"
    assert loaded.config == PVT_V2_CONFIGS["pvt_v2_tiny"].to_birder()
    assert loaded.sha256 == sha256_file(tiny_checkpoint)
    assert loaded.path == tiny_checkpoint
    assert loaded.signature == make_signature((64, 64), 10)
    assert not loaded.model.training
    assert torch.equal(_outputs(loaded.model), _outputs(make_tiny_model()))


def test_saved_layout_is_birders(tiny_checkpoint: Path) -> None:
    raw = torch.load(tiny_checkpoint, weights_only=True)
    assert list(raw) == [*BIRDER_KEY_ORDER, "config"]  # config: pvt_v2_tiny is not a stock birder size
    assert raw["signature"] == {"inputs": [{"data_shape": [0, 3, 64, 64]}], "outputs": [{"data_shape": [0, 10]}]}
    assert raw["rgb_stats"] == {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)}
    assert raw["config"] == {
        "depths": [1, 1, 1, 1],
        "embed_dims": [16, 32, 80, 128],
        "mlp_ratios": [2.0, 2.0, 2.0, 2.0],
        "linear": False,
        "drop_path_rate": 0.0,
    }


def test_stock_size_is_saved_without_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("pvt_v2_b0", 3, size=(64, 64))
    path = save_checkpoint(tmp_path / "b0.pt", model, class_to_idx={"a": 0, "b": 1, "c": 2}, rgb_stats=BIRDER_RGB_STATS)
    assert list(torch.load(path, weights_only=True)) == BIRDER_KEY_ORDER
    loaded = load_checkpoint(path)
    assert loaded.network == "pvt_v2_b0"
    assert loaded.config is None
    assert torch.equal(_outputs(loaded.model), _outputs(model.eval()))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model = make_tiny_model()
    save_checkpoint(tmp_path / "sub" / "m.pt", model, class_to_idx=tiny_class_to_idx(), rgb_stats=BIRDER_RGB_STATS)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.pt"]
    with pytest.raises(CheckpointError, match="class_to_idx"):
        save_checkpoint(tmp_path / "bad.pt", model, class_to_idx={"a": 0}, rgb_stats=BIRDER_RGB_STATS)
    assert not (tmp_path / "bad.pt").exists()


def test_extra_keys_are_saved_and_returned(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "m.pt",
        make_tiny_model(),
        class_to_idx=tiny_class_to_idx(),
        rgb_stats=BIRDER_RGB_STATS,
        extra={"pvt_deploy": {"epochs": 3}},
    )
    assert load_checkpoint(path).extra == {"pvt_deploy": {"epochs": 3}}
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(tmp_path / "x.pt", make_tiny_model(), class_to_idx=tiny_class_to_idx(),
                        rgb_stats=BIRDER_RGB_STATS, extra={"state": 1})  # fmt: skip


def test_safetensors_round_trip_with_birder_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = make_tiny_model()
    path = save_safetensors(tmp_path / "m.safetensors", model, class_to_idx=tiny_class_to_idx(),
                            rgb_stats=BIRDER_RGB_STATS)  # fmt: skip
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {"birder_version", "task", "class_to_idx", "signature", "rgb_stats", "config"}
    assert json.loads(metadata["signature"]) == make_signature((64, 64), 10)
    loaded = load_checkpoint(path)
    assert loaded.network == "pvt_v2_tiny"
    assert loaded.labels == [f"class_{i}" for i in range(10)]
    assert torch.equal(_outputs(loaded.model), _outputs(model))
    # recognised by content too, whatever the suffix
    renamed = shutil.copyfile(path, tmp_path / "weights.bin")
    assert torch.equal(_outputs(load_checkpoint(renamed).model), _outputs(model))


def test_layer_norm_eps_option(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint, layer_norm_eps=TRAINING_LAYER_NORM_EPS)
    assert loaded.layer_norm_eps == TRAINING_LAYER_NORM_EPS
    assert all(m.eps == TRAINING_LAYER_NORM_EPS for m in loaded.model.modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.parametrize("network", sorted(PVT_V2_CONFIGS))
def test_config_is_inferred_from_shapes(network: str) -> None:
    with torch.device("meta"):
        state = create_model(network, 550).state_dict()
    inferred = infer_config(state)
    assert match_network(inferred) == network


def test_unregistered_size_is_built_as_birder_would(tmp_path: Path) -> None:
    """A size not in the registry loads as birder's base network plus the config inferred from shapes."""
    torch.manual_seed(0)
    model = create_model("pvt_v2_tiny", 4, size=(64, 64), config_overrides={"depths": [1, 2, 1, 1]})
    path = tmp_path / "custom.pt"
    save_checkpoint(path, model, class_to_idx={str(i): i for i in range(4)}, rgb_stats=BIRDER_RGB_STATS)
    _rewrite(path, path, lambda payload: payload.pop("config"))  # shapes alone must be enough
    loaded = load_checkpoint(path)
    assert loaded.network == "pvt_v2_b0"
    assert loaded.model.config.depths == (1, 2, 1, 1)
    assert loaded.config == model.config.to_birder() | {"drop_path_rate": 0.0}
    assert torch.equal(_outputs(loaded.model), _outputs(model.eval()))
    # naming the network the loader reported (as export/verify do from a manifest) loads it again
    again = load_checkpoint(path, network=loaded.network)
    assert torch.equal(_outputs(again.model), _outputs(model.eval()))


# --------------------------------------------------------------------------------------------- bad input


def test_missing_file_folder_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_checkpoint(tmp_path / "empty.pt")


def test_not_a_checkpoint(tmp_path: Path, photo_paths: list[Path]) -> None:
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(photo_paths[0])
    (tmp_path / "text.pt").write_text("hello, not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="top level is Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"state": {}, "signature": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing class_to_idx, rgb_stats"):
        load_checkpoint(tmp_path / "partial.pt")


def test_truncated_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_another_architecture(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def to_resnet(payload: dict) -> None:
        payload["state"] = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
        payload.pop("config")

    path = _rewrite(tiny_checkpoint, tmp_path / "resnet.pt", to_resnet)
    with pytest.raises(CheckpointError, match=r"not a PVT v2 state dict .*first keys: conv1.weight"):
        load_checkpoint(path)


def test_wrong_shapes_missing_and_unexpected_keys(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def wrong_head(payload: dict) -> None:
        payload["state"]["classifier.weight"] = torch.zeros(12, 128)
        payload["state"]["classifier.bias"] = torch.zeros(12)

    with pytest.raises(CheckpointError, match=r"2 shape mismatches \(first: classifier.weight is \(12, 128\)"):
        load_checkpoint(_rewrite(tiny_checkpoint, tmp_path / "head.pt", wrong_head))

    def drop_and_add(payload: dict) -> None:
        del payload["state"]["body.stage2.norm.bias"]
        payload["state"]["extra.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match=r"1 missing keys \(first: body.stage2.norm.bias\); 1 unexpected"):
        load_checkpoint(_rewrite(tiny_checkpoint, tmp_path / "keys.pt", drop_and_add))


def test_explicit_network_that_does_not_fit(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = _rewrite(tiny_checkpoint, tmp_path / "noconfig.pt", lambda payload: payload.pop("config"))
    with pytest.raises(CheckpointError, match=r"weights do not fit pvt_v2_b2: .*shape mismatches"):
        load_checkpoint(path, network="pvt_v2_b2")
    with pytest.raises(CheckpointError, match="unknown network 'resnet'"):
        load_checkpoint(path, network="resnet")


def test_labels_must_cover_every_class(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def fewer_labels(payload: dict) -> None:
        payload["class_to_idx"] = {"a": 0, "b": 1}

    with pytest.raises(CheckpointError, match="class_to_idx has 2 labels but the model has 10 classes"):
        load_checkpoint(_rewrite(tiny_checkpoint, tmp_path / "labels.pt", fewer_labels))


class _Payload:
    """Unpickling this runs ``exec``: it creates a marker file. A weights file must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_pickle_is_refused_without_running(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # control: the payload is live (plain unpickling does create the marker)
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned-marker"
    zipped = tmp_path / "evil.pt"
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["class_to_idx"] = _Payload(marker)
    torch.save(payload, zipped)
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"state": _Payload(marker)}, protocol=2))  # torch's legacy (non-zip) format
    refused = "refused: not a weights-only checkpoint; nothing was executed"
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match=refused) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value)
    assert not marker.exists()
