"""An interrupted run resumed from its checkpoint ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pvt_deploy.errors import TrainingError
from pvt_deploy.train.distributed import DistEnv
from pvt_deploy.train.loop import LoopConfig
from pvt_deploy.train.pretrain import MMCRConfig, train_mmcr
from tests.test_train_data import make_image_folder

TINY_MMCR = MMCRConfig(network="pvt_v2_tiny", size=(32, 32), projector_dims=(64, 64, 32), aug_level=10)


def _loop(**overrides: object) -> LoopConfig:
    settings = dict(global_batch=8, steps=5, lr=2e-3, warmup_steps=2, checkpoint_every=2, workers=0, progress=False)
    settings.update(overrides)
    return LoopConfig(**settings)  # type: ignore[arg-type]


def _final(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"mmcr_pvt_v2_tiny_{step}.pt", weights_only=True)["state"]


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_bit_for_bit(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=10)  # 20 images: 2 steps per epoch, 5 steps = 3 epochs
    torch.set_num_threads(1)
    straight = tmp_path / "straight"
    train_mmcr(data, straight, TINY_MMCR, _loop(), DistEnv())

    interrupted = tmp_path / "interrupted"
    train_mmcr(data, interrupted, TINY_MMCR, _loop(stop_at=3), DistEnv())  # stops mid-epoch 2
    assert (interrupted / "mmcr_pvt_v2_tiny_3.pt").is_file() and not (interrupted / "mmcr_pvt_v2_tiny_5.pt").exists()
    # resume with a different worker count: views are seeded per sample, so parallel loading cannot change them
    train_mmcr(data, interrupted, TINY_MMCR, _loop(workers=2), DistEnv(), resume=True)

    expected, resumed = _final(straight, 5), _final(interrupted, 5)
    assert expected.keys() == resumed.keys()
    different = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"
    moved = _final(straight, 2)["encoder.projector.0.weight"]
    assert not torch.equal(moved, expected["encoder.projector.0.weight"])  # training really changed the weights
    straight_states = torch.load(straight / "mmcr_pvt_v2_tiny_5_states.pt", weights_only=True)
    resumed_states = torch.load(interrupted / "mmcr_pvt_v2_tiny_5_states.pt", weights_only=True)
    assert straight_states["scheduler_state"] == resumed_states["scheduler_state"]
    for a, b in zip(
        straight_states["optimizer_state"]["state"].values(),
        resumed_states["optimizer_state"]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_resume_refuses_changed_settings_or_missing_checkpoint(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    with pytest.raises(TrainingError, match="no mmcr_pvt_v2_tiny_<step>.pt"):
        train_mmcr(data, tmp_path / "nothing", TINY_MMCR, _loop(steps=1), DistEnv(), resume=True)
    out = tmp_path / "run"
    train_mmcr(data, out, TINY_MMCR, _loop(steps=2, stop_at=1), DistEnv())
    with pytest.raises(TrainingError, match="lr: 0.002 -> 0.1"):
        train_mmcr(data, out, TINY_MMCR, _loop(steps=2, lr=0.1), DistEnv(), resume=True)


def test_bf16_autocast_step_keeps_float32_weights(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    last = train_mmcr(data, tmp_path / "bf16", TINY_MMCR, _loop(steps=1, bf16=True), DistEnv())
    assert torch.isfinite(torch.tensor(last["loss"]))
    state = _final(tmp_path / "bf16", 1)
    assert {tensor.dtype for key, tensor in state.items() if "num_batches" not in key} == {torch.float32}


@pytest.mark.slow
def test_birder_recipe_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """SGD momentum and the per-epoch ConstantLR come back from the states file too."""
    from pvt_deploy.train.recipes import MMCR_RECIPES

    data = make_image_folder(tmp_path / "data", per_class=4)  # 8 images, batch 4: 2 steps per epoch
    torch.set_num_threads(1)
    birder = {"recipe": MMCR_RECIPES["birder"], "lr": 0.1, "weight_decay": 1e-4, "clip_grad_norm": None}
    settings = {"global_batch": 4, "warmup_steps": 0, "checkpoint_every": 0, **birder}
    train_mmcr(data, tmp_path / "straight", TINY_MMCR, _loop(**settings), DistEnv())
    train_mmcr(data, tmp_path / "resumed", TINY_MMCR, _loop(**settings, stop_at=3), DistEnv())
    train_mmcr(data, tmp_path / "resumed", TINY_MMCR, _loop(**settings), DistEnv(), resume=True)
    expected, resumed = _final(tmp_path / "straight", 5), _final(tmp_path / "resumed", 5)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    states = [
        torch.load(tmp_path / run / "mmcr_pvt_v2_tiny_5_states.pt", weights_only=True)
        for run in ("straight", "resumed")
    ]
    assert states[0]["scheduler_state"] == states[1]["scheduler_state"]
    assert states[0]["scheduler_state"]["last_epoch"] == 2  # stepped at the end of epochs 1 and 2
    for a, b in zip(
        states[0]["optimizer_state"]["state"].values(), states[1]["optimizer_state"]["state"].values(), strict=True
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
