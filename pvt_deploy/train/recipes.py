"""The two training recipes: ours (the default) and birder 0.8.4's own, chosen with ``--recipe``.

The MMCR method (network, projector, loss, momentum encoder) is the same in both; a recipe is everything around
it: augmentation, optimizer, learning-rate schedule, gradient clipping, and how a multi-process run gathers the
loss and normalises the projector. Every field below is written into run.json, so a run says which recipe made it.
The birder values are read from birder 0.8.4's ``training_cli`` defaults, ``train_mmcr.py`` and ``train.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

RecipeName = Literal["pvt-deploy", "birder"]
RECIPE_NAMES: tuple[str, ...] = ("pvt-deploy", "birder")
DEFAULT_RECIPE: RecipeName = "pvt-deploy"


@dataclass(frozen=True)
class Recipe:
    """What a recipe fixes and what its command-line defaults are."""

    name: RecipeName
    optimizer: Literal["adamw", "sgd"]
    momentum: float | None  # SGD momentum (None for AdamW)
    param_groups: Literal["decay-and-no-decay", "one"]  # AdamW skips decay on 1-D params; birder decays all
    schedule: Literal["warmup-cosine-per-step", "constant-per-epoch"]
    lr: float
    weight_decay: float
    clip_grad_norm: float | None
    augment: Literal["pvt-deploy", "birder"]
    aug_level: int
    min_scale: float | None  # None: birder's level rule, 0.8 - 0.05 * level
    random_erasing: bool  # birder's fine-tuning erases a patch (p from the level); its MMCR script turns it off
    ddp_gradient: Literal["exact", "local-slice"]  # fine-tuning's cross-entropy is exact under DDP either way
    projector_batch_norm: Literal["global-batch", "per-rank"] | None  # None: fine-tuning has no projector

    def describe(self) -> dict[str, Any]:
        """The fixed choices; the defaults a run may override (lr, weight decay, clipping, level, crop scale) are
        recorded as the values the run used, under their own names."""
        overridable = {"name", "lr", "weight_decay", "clip_grad_norm", "aug_level", "min_scale"}
        return {"recipe": self.name, **{f"recipe_{k}": v for k, v in asdict(self).items() if k not in overridable}}


MMCR_RECIPES: dict[str, Recipe] = {
    "pvt-deploy": Recipe(
        name="pvt-deploy",
        optimizer="adamw",
        momentum=None,
        param_groups="decay-and-no-decay",
        schedule="warmup-cosine-per-step",
        lr=1e-3,
        weight_decay=1e-6,
        clip_grad_norm=1.0,
        augment="pvt-deploy",
        aug_level=8,
        min_scale=0.3,
        random_erasing=False,
        ddp_gradient="exact",
        projector_batch_norm="global-batch",
    ),
    # birder/scripts/train_mmcr.py: training_cli defaults (--opt sgd --momentum 0.9 --lr 0.1 --wd 0.0001
    # --lr-scheduler constant --lr-scheduler-update epoch, no --clip-grad-norm), add_data_aug_args(default
    # level 4, default_min_scale=0.3, default_re_prob=0.0), plain all_gather in MMCRMomentumLoss, --sync-bn off
    "birder": Recipe(
        name="birder",
        optimizer="sgd",
        momentum=0.9,
        param_groups="one",
        schedule="constant-per-epoch",
        lr=0.1,
        weight_decay=1e-4,
        clip_grad_norm=None,
        augment="birder",
        aug_level=4,
        min_scale=0.3,
        random_erasing=False,
        ddp_gradient="local-slice",
        projector_batch_norm="per-rank",
    ),
}

FINETUNE_RECIPES: dict[str, Recipe] = {
    "pvt-deploy": replace(
        MMCR_RECIPES["pvt-deploy"], lr=1e-4, weight_decay=0.05, aug_level=3, min_scale=0.5, projector_batch_norm=None
    ),
    # birder/scripts/train.py: the same optimizer and schedule defaults; add_data_aug_args(level 4) with
    # --resize-min-scale and --re-prob left to the level rules (0.6 and 0.25 at level 4)
    "birder": replace(
        MMCR_RECIPES["birder"], min_scale=None, random_erasing=True, ddp_gradient="exact", projector_batch_norm=None
    ),
}


def recipe_for(kind: Literal["mmcr", "finetune"], name: str) -> Recipe:
    table = MMCR_RECIPES if kind == "mmcr" else FINETUNE_RECIPES
    if name not in table:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPE_NAMES)}")
    return table[name]
