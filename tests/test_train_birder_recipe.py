"""``--recipe birder`` is birder 0.8.4's recipe and writes training states birder's resume path accepts.

birder is not needed here: ``dev/check_birder_recipe.py`` (run in a birder venv) loaded our states into birder's
own optimizer and scheduler construction and recorded what birder builds into tests/golden/birder_recipe.json.
These tests check our side against that record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pvt_deploy.cli import cli
from pvt_deploy.train import augment as ours_augment
from pvt_deploy.train import birder_augment
from pvt_deploy.train.augment import AugmentConfig, CropConfig
from pvt_deploy.train.birder_augment import (
    BIRDER_INTERPOLATIONS,
    ERASE_RATIO,
    BirderAugmentConfig,
    birder_default_erase_prob,
    birder_default_min_scale,
    birder_erase_scale,
    birder_max_ops,
    birder_min_ops,
    birder_ops,
    birder_view,
)
from pvt_deploy.train.finetune import FinetuneConfig
from pvt_deploy.train.pretrain import MMCRConfig, build_mmcr
from pvt_deploy.train.recipes import FINETUNE_RECIPES, MMCR_RECIPES
from tests.test_train_data import make_image_folder

RECORD = json.loads((Path(__file__).resolve().parent / "golden" / "birder_recipe.json").read_text())
IN_BIRDER = RECORD["recipe_birder_states_in_birder"]
LEVELS = RECORD["augmentation"]["levels"]


def _close(ours: object, theirs: object) -> bool:
    """Equal, with floats compared to 1e-9 (birder computes 0.05 + 0.025 * level in its own order)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_close(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list | tuple) and isinstance(theirs, list | tuple):
        return len(ours) == len(theirs) and all(_close(a, b) for a, b in zip(ours, theirs, strict=True))
    if isinstance(ours, float) or isinstance(theirs, float):
        return ours == pytest.approx(theirs, abs=1e-9)
    return ours == theirs


def test_birder_loaded_recipe_birder_states_and_refused_ours() -> None:
    assert RECORD["birder_version"].lstrip("v") == "0.8.4"
    assert IN_BIRDER["loaded"] and IN_BIRDER["stepped_after_load"]
    assert IN_BIRDER["optimizer_class"] == "SGD" and IN_BIRDER["scheduler_class"] == "ConstantLR"
    assert len(IN_BIRDER["param_groups"]) == 1 and IN_BIRDER["birder_group_sizes"] == [
        IN_BIRDER["param_groups"][0]["params"]
    ]
    tuned = RECORD["finetune_recipe_birder_states_in_birder"]
    assert tuned["loaded"] and tuned["stepped_after_load"] and len(tuned["param_groups"]) == 1
    for kind in ("recipe_default_states_in_birder", "finetune_recipe_default_states_in_birder"):
        assert "different number of parameter groups" in RECORD[kind]["refused"]  # our recipe: AdamW's two groups


def _check_against_birder(states_path: Path, recorded: dict) -> None:
    """Our saved states against what birder built and loaded: its one group, its parameter order, its scheduler."""
    states = torch.load(states_path, weights_only=True)
    assert sorted(states) == recorded["states_file_keys"]
    optimizer = states["optimizer_state"]
    (group,) = optimizer["param_groups"]
    theirs = recorded["param_groups"][0]
    assert group.keys() == theirs.keys()
    assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    assert len(group["params"]) == theirs["params"] == recorded["birder_group_sizes"][0]
    buffers = [optimizer["state"][index]["momentum_buffer"] for index in group["params"]]
    assert [list(b.shape) for b in buffers] == recorded["birder_param_shapes"]  # birder's parameter order
    for buffer, facts in zip(buffers, recorded["momentum_buffers"], strict=True):
        assert float(torch.linalg.vector_norm(buffer.double())) == pytest.approx(facts["norm"], rel=1e-3, abs=1e-7)
    scheduler = {k: v for k, v in states["scheduler_state"].items() if not k.startswith("_")}
    assert scheduler == recorded["scheduler_state"]  # ConstantLR stepped once: 3 steps at 2 per epoch
    assert states["run"]["recipe"] == "birder"


@pytest.mark.slow
def test_recipe_birder_states_match_what_birder_loaded(tmp_path: Path) -> None:
    """The same tiny runs the dev script made (MMCR, then a fine-tune of its backbone), checked without birder."""
    torch.set_num_threads(1)
    data = make_image_folder(tmp_path / "data", per_class=RECORD["images_per_class"])
    places = {"$DATA": str(data), "$MMCR": str(tmp_path / "mmcr")}
    for kind, key in (("mmcr", "command"), ("finetune", "finetune_command")):
        command = RECORD["made_by"][key][1:]
        for placeholder, value in {**places, "$OUT": str(tmp_path / kind)}.items():
            command = [part.replace(placeholder, value) for part in command]
        result = CliRunner().invoke(cli, [*command, "--recipe", "birder"])
        assert result.exit_code == 0, result.output
    epoch = RECORD["epoch"]
    _check_against_birder(tmp_path / "mmcr" / f"mmcr_pvt_v2_tiny_{epoch}_states.pt", IN_BIRDER)
    _check_against_birder(
        tmp_path / "finetune" / f"pvt_v2_tiny_finetune_{epoch}_states.pt",
        RECORD["finetune_recipe_birder_states_in_birder"],
    )
    run = json.loads((tmp_path / "mmcr" / "run.json").read_text())
    assert (run["recipe_ddp_gradient"], run["recipe_projector_batch_norm"]) == ("local-slice", "per-rank")


def test_recipe_tables_match_birders_script_defaults() -> None:
    for recipe, script in ((MMCR_RECIPES["birder"], "train_mmcr"), (FINETUNE_RECIPES["birder"], "train")):
        defaults = RECORD["script_defaults"][script]
        assert (recipe.optimizer, recipe.momentum, recipe.lr, recipe.weight_decay) == (
            defaults["opt"],
            defaults["momentum"],
            defaults["lr"],
            defaults["wd"],
        )
        assert defaults["nesterov"] is False and defaults["lr_scale"] is None
        # no norm or bias weight decay of its own: optimizer_parameter_groups merges everything into one group
        assert recipe.param_groups == "one" and defaults["norm_wd"] is None and defaults["bias_weight_decay"] is None
        assert recipe.schedule == "constant-per-epoch"
        assert (defaults["lr_scheduler"], defaults["lr_scheduler_update"]) == ("constant", "epoch")
        assert defaults["warmup_epochs"] is None and defaults["warmup_steps"] is None
        assert recipe.clip_grad_norm is defaults["clip_grad_norm"] is None
        assert (recipe.augment, recipe.aug_level) == (defaults["aug_type"], defaults["aug_level"])
        assert recipe.min_scale == defaults["resize_min_scale"]  # None: the level rule
        assert recipe.random_erasing == (defaults["re_prob"] is None)  # train_mmcr sets 0.0, train.py the level rule
        assert defaults["use_grayscale"] is False and defaults["rgb_mode"] == "birder"
        assert defaults["sync_bn"] is False and defaults["no_broadcast_buffers"] is False
    assert RECORD["script_defaults"]["train"]["smoothing_alpha"] == 0.0
    assert MMCR_RECIPES["birder"].projector_batch_norm == "per-rank"
    assert MMCR_RECIPES["birder"].ddp_gradient == "local-slice"


@pytest.mark.parametrize("level", range(11))
def test_birder_ops_and_settings_match_birders_own_at_every_level(level: int) -> None:
    recorded = LEVELS[str(level)]
    if level == 0:  # only a bicubic resize of the whole image
        assert recorded["transforms"][0] == "Resize" and recorded["resize_interpolation"] == "bicubic"
        image = torch.rand(3, 40, 24, generator=torch.Generator().manual_seed(0))
        view = birder_view(image, BirderAugmentConfig((32, 32), level=0), torch.Generator().manual_seed(1))
        expected = birder_augment.quantize(ours_augment.resize(image, (32, 32), "bicubic"))
        assert torch.equal(view, expected)
        return
    assert _close(birder_ops(level), recorded["ops"])
    assert (birder_min_ops(level), birder_max_ops(level)) == (recorded["min_ops"], recorded["max_ops"])
    assert list(BIRDER_INTERPOLATIONS) == recorded["crop_interpolations"]
    assert _close([birder_default_min_scale(level), 1.0], recorded["crop_scale"])
    assert _close(list(CropConfig((32, 32)).ratio), recorded["crop_ratio"])
    assert _close(birder_default_erase_prob(level), recorded["erase_prob"])  # train.py's defaults at this level
    assert _close(list(birder_erase_scale(level)), recorded["erase_scale"])
    assert _close(list(ERASE_RATIO), recorded["erase_ratio"]) and recorded["erase_value"] == [0.0]
    assert recorded["flip_p"] == 0.5
    assert recorded["transforms"][1:4] == [
        "RandomResizedCropWithRandomInterpolation",
        "BirderAugment",
        "RandomHorizontalFlip",
    ]
    assert birder_ops(level, use_grayscale=True)[-1] == RECORD["augmentation"]["grayscale_op"]


@pytest.mark.parametrize("name", sorted(RECORD["op_outputs"]["outputs"]))
def test_each_op_gives_torchvisions_output(name: str) -> None:
    """On birder's uint8 values, within one 8-bit step (torchvision truncates where we round)."""
    record = RECORD["op_outputs"]
    image = torch.tensor(record["image"], dtype=torch.float32) / 255.0
    expected = torch.tensor(record["outputs"][name], dtype=torch.float32) / 255.0
    params = record["parameters"].get(name, {})
    functions = {
        "rotate": lambda: birder_augment.affine_nearest(image, angle=params["angle"]),
        "translate": lambda: birder_augment.affine_nearest(image, translate=tuple(params["translate"])),
        "shear": lambda: birder_augment.affine_nearest(image, shear=tuple(params["shear"])),
        "posterize": lambda: birder_augment.posterize(image, params["bits"]),
        "autocontrast": lambda: birder_augment.autocontrast(image),
        "sharpness": lambda: birder_augment.adjust_sharpness(image, params["factor"]),
        "solarize": lambda: ours_augment.solarize(image, params["threshold"] / 255.0),
        "hue": lambda: birder_augment.adjust_hue_hsv(image, params["shift"]),
        "gaussian_blur": lambda: ours_augment.gaussian_blur(image, params["sigma"], radius=params["kernel_size"] // 2),
    }
    ours = birder_augment.quantize(functions[name]())
    assert (ours - expected).abs().max().item() <= 1.0 / 255.0 + 1e-6


def test_same_seed_draws_the_same_crop_and_flip_under_both_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both recipes' full view paths run; where they should agree (crop box, flip) they draw the same."""
    drawn: dict[str, list] = {"ours": [], "birder": []}
    real = ours_augment.draw_crop_and_flip
    current = ["ours"]

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real(*args, **kwargs)
        drawn[current[0]].append(result)
        return result

    monkeypatch.setattr(ours_augment, "draw_crop_and_flip", spy)
    monkeypatch.setattr(birder_augment, "draw_crop_and_flip", spy)
    image = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(3))
    ours = AugmentConfig((32, 32), level=8, min_scale=0.3)
    birder = BirderAugmentConfig((32, 32), level=4, min_scale=0.3)
    for seed in range(40):
        current[0] = "ours"
        ours.view(image, torch.Generator().manual_seed(seed))
        current[0] = "birder"
        birder.view(image, torch.Generator().manual_seed(seed))
    assert len(drawn["ours"]) == len(drawn["birder"]) == 40
    assert drawn["ours"] == drawn["birder"]
    assert {flip for _, flip in drawn["ours"]} == {True, False}


def test_without_ops_a_birder_view_is_our_crop_and_flip(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: with birder's ops made identities, a bilinear birder view equals our level-0 view."""
    monkeypatch.setattr(birder_augment, "apply_op", lambda op, image, g: image)
    image = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(4))
    ours = AugmentConfig((32, 32), level=0, min_scale=0.3)
    birder = BirderAugmentConfig((32, 32), level=4, min_scale=0.3)
    compared = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        ours_augment.draw_crop_and_flip(48, 40, birder, g)
        if BIRDER_INTERPOLATIONS[int(torch.randint(0, 2, (), generator=g))] != "bilinear":
            continue
        ours_view = ours.view(image, torch.Generator().manual_seed(seed))
        birder_view_ = birder.view(image, torch.Generator().manual_seed(seed))
        assert (birder_augment.quantize(ours_view) - birder_view_).abs().max().item() <= 1e-6, seed
        compared += 1
    assert compared >= 5


def test_recipe_birder_applies_birders_op_list() -> None:
    recorded = {op["op"] for op in LEVELS["4"]["ops"]}
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(5))
    config = MMCRConfig(network="pvt_v2_tiny", size=(32, 32), aug_level=4).augment(MMCR_RECIPES["birder"])
    assert isinstance(config, BirderAugmentConfig) and config.erase_prob == 0.0  # train_mmcr: --re-prob 0
    seen: set[str] = set()
    for seed in range(150):
        applied: list[str] = []
        birder_view(image, config, torch.Generator().manual_seed(seed), applied)
        assert len(applied) == 2  # min_ops = max_ops = 2 at level 4
        seen.update(applied)
    assert seen == recorded  # every op of birder's list, and nothing else
    tuned = FinetuneConfig(aug_level=4, min_scale=birder_default_min_scale(4)).augment(
        (32, 32), FINETUNE_RECIPES["birder"]
    )
    assert isinstance(tuned, BirderAugmentConfig) and tuned.erase_prob == pytest.approx(0.25)
    assert isinstance(MMCRConfig().augment(MMCR_RECIPES["pvt-deploy"]), AugmentConfig)


def test_recipe_birder_projector_batch_norm_is_per_rank() -> None:
    config = MMCRConfig(network="pvt_v2_tiny", size=(32, 32), projector_dims=(16, 16, 8))
    birder = build_mmcr(config, seed=0, recipe=MMCR_RECIPES["birder"])
    ours = build_mmcr(config, seed=0)
    assert type(birder.encoder.projector[1]) is torch.nn.BatchNorm1d
    assert type(ours.encoder.projector[1]).__name__ == "GlobalBatchNorm1d"
    assert birder.state_dict().keys() == ours.state_dict().keys()


def test_recipe_birder_refuses_cosine_schedule_options(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=2)
    args = [
        "train",
        "mmcr",
        str(data),
        "--network",
        "pvt_v2_tiny",
        "--size",
        "32",
        "--steps",
        "1",
        "--recipe",
        "birder",
    ]
    result = CliRunner().invoke(cli, [*args, "--warmup-steps", "5"])
    assert result.exit_code == 9 and "--warmup-steps shape the cosine schedule" in result.output
    assert "Traceback" not in result.output
