"""Fine-tuning from a birder classifier: the head is replaced and sized to the class folders; a linear probe
trains the head alone; the result is a classification checkpoint with class_to_idx."""

from __future__ import annotations

from pathlib import Path

import torch

from pvt_deploy.model.checkpoint import load_checkpoint
from pvt_deploy.train.distributed import DistEnv
from pvt_deploy.train.finetune import FinetuneConfig, train_finetune
from pvt_deploy.train.loop import LoopConfig
from tests.test_train_data import make_image_folder


def test_linear_probe_replaces_head_and_trains_only_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    torch.set_num_threads(1)
    data = make_image_folder(tmp_path / "data", per_class=4)
    config = FinetuneConfig(init=str(tiny_checkpoint), linear_probe=True, size=(32, 32))
    loop = LoopConfig(global_batch=4, steps=2, lr=1e-2, workers=0, progress=False)
    last = train_finetune(data, tmp_path / "ft", config, loop, DistEnv())
    assert last["step"] == 2 and last["loss"] > 0

    before = load_checkpoint(tiny_checkpoint)
    after = load_checkpoint(tmp_path / "ft" / "pvt_v2_tiny_finetune_2.pt")
    assert before.num_classes == 10 and after.class_to_idx == {"discs": 0, "stripes": 1}
    assert after.size == (32, 32) and after.rgb_stats == before.rgb_stats
    old, new = before.model.state_dict(), after.model.state_dict()
    body = [key for key in new if not key.startswith("classifier.")]
    assert all(torch.equal(old[key], new[key]) for key in body)  # frozen body, bit for bit
    assert new["classifier.weight"].shape == (2, old["classifier.weight"].shape[1])
    assert (tmp_path / "ft" / "pvt_v2_tiny_finetune_2_states.pt").is_file()


def test_resumed_full_finetune_matches_uninterrupted_bit_for_bit(tmp_path: Path, tiny_checkpoint: Path) -> None:
    torch.set_num_threads(1)
    data = make_image_folder(tmp_path / "data", per_class=4)
    config = FinetuneConfig(init=str(tiny_checkpoint), linear_probe=False, size=(32, 32))

    def loop(**overrides: object) -> LoopConfig:
        settings = dict(global_batch=4, steps=4, lr=1e-2, warmup_steps=1, checkpoint_every=1, workers=0)
        return LoopConfig(**{**settings, "progress": False, **overrides})  # type: ignore[arg-type]

    train_finetune(data, tmp_path / "straight", config, loop(), DistEnv())
    train_finetune(data, tmp_path / "interrupted", config, loop(stop_at=2), DistEnv())
    assert not (tmp_path / "interrupted" / "pvt_v2_tiny_finetune_3.pt").exists()
    train_finetune(data, tmp_path / "interrupted", config, loop(), DistEnv(), resume=True)

    name = "pvt_v2_tiny_finetune_4.pt"
    expected = torch.load(tmp_path / "straight" / name, weights_only=True)["state"]
    resumed = torch.load(tmp_path / "interrupted" / name, weights_only=True)["state"]
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
