"""Supervised fine-tuning (or a linear probe) of a PVT v2 from a birder checkpoint, on class sub-folders.

The initial weights come from any checkpoint ``load_checkpoint`` reads: an MMCR backbone (0 classes), or a
classifier whose head is replaced. The result is a birder classification checkpoint with ``class_to_idx``,
which ``pvt-deploy export`` and birder's own ``load_model`` both load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pvt_deploy.errors import CheckpointError
from pvt_deploy.model.checkpoint import load_checkpoint, read_checkpoint_file, save_checkpoint
from pvt_deploy.model.pvt_v2 import BIRDER_LAYER_NORM_EPS, PVTv2
from pvt_deploy.train import checkpoints as ckpt
from pvt_deploy.train.augment import AugmentConfig
from pvt_deploy.train.birder_augment import BirderAugmentConfig, birder_default_erase_prob
from pvt_deploy.train.data import ImageFolder, ViewsDataset
from pvt_deploy.train.distributed import DistEnv, wrap_ddp
from pvt_deploy.train.loop import LoopConfig, TrainTask, run_loop
from pvt_deploy.train.pretrain import check_train_size
from pvt_deploy.train.recipes import Recipe


@dataclass
class FinetuneConfig:
    init: str = ""
    linear_probe: bool = False
    size: tuple[int, int] | None = None  # None: the init checkpoint's size
    aug_level: int = 3
    min_scale: float = 0.5
    label_smoothing: float = 0.0
    layer_norm_eps: float = BIRDER_LAYER_NORM_EPS
    tag: str = "finetune"
    rgb_stats: dict[str, Any] | None = field(default=None)  # None: the init checkpoint's

    def describe(self) -> dict[str, Any]:
        return {
            "init": str(self.init),
            "linear_probe": self.linear_probe,
            "size": list(self.size) if self.size else None,
            "aug_level": self.aug_level,
            "min_scale": self.min_scale,
            "label_smoothing": self.label_smoothing,
            "layer_norm_eps": self.layer_norm_eps,
            "tag": self.tag,
        }

    def augment(self, size: tuple[int, int], recipe: Recipe) -> AugmentConfig | BirderAugmentConfig:
        """One view per image; birder's fine-tuning pipeline also erases a patch (p and size from the level)."""
        if recipe.augment != "birder":
            return AugmentConfig(size=size, level=self.aug_level, min_scale=self.min_scale)
        return BirderAugmentConfig(
            size=size,
            level=self.aug_level,
            min_scale=self.min_scale,
            erase_prob=birder_default_erase_prob(self.aug_level) if recipe.random_erasing else 0.0,
        )


def load_init(path: str | Path, layer_norm_eps: float) -> tuple[PVTv2, dict[str, Any]]:
    """The backbone to fine-tune and its rgb_stats; says what to pass instead of a full MMCR training file."""
    payload = read_checkpoint_file(path)
    if payload.get("task") == ckpt.SSL_TASK:
        raise CheckpointError(
            f"{path} is a whole MMCR training checkpoint; pass its backbone file (<network>_mmcr_<step>.pt) to --init"
        )
    loaded = load_checkpoint(path, layer_norm_eps=layer_norm_eps)
    return loaded.model, loaded.rgb_stats


def new_head(model: PVTv2, num_classes: int, seed: int) -> None:
    """A fresh head sized to the class folders, birder-initialised (trunc-normal 0.02, zero bias), seeded."""
    model.reset_classifier(num_classes)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    nn.init.trunc_normal_(model.classifier.weight, std=0.02)
    nn.init.zeros_(model.classifier.bias)
    torch.random.set_rng_state(generator_state)


def train_finetune(
    data: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig,
    loop: LoopConfig,
    env: DistEnv,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Fine-tune with ``loop.recipe``; writes birder classification checkpoints and returns the last step's
    metrics."""
    out_dir = Path(out_dir)
    recipe = loop.recipe
    folder = ImageFolder.labelled(data)
    model, init_rgb = load_init(config.init, config.layer_norm_eps)
    rgb_stats = config.rgb_stats or init_rgb
    if config.size is not None:
        check_train_size(config.size)
        model.size = tuple(config.size)
    size = tuple(model.size)
    new_head(model, len(folder.class_to_idx), loop.seed)
    model.to(env.device)
    name = f"{model.network}_{config.tag}"
    description = {
        "kind": "finetune",
        **config.describe(),
        **loop.describe(),
        "network": model.network,
        "classes": folder.class_to_idx,
    }

    start_step, states = 0, None
    if resume:
        start_step, states = ckpt.resume_states(out_dir, name, description)
        resumed = load_checkpoint(ckpt.step_path(out_dir, name, start_step), layer_norm_eps=config.layer_norm_eps)
        model.load_state_dict(resumed.model.state_dict(), strict=True)
        echo(f"resuming {name} from step {start_step}")

    if config.linear_probe:
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith("classifier."))

    def set_train_mode() -> None:
        model.train()
        if config.linear_probe and recipe.name != "birder":
            # frozen body: no stochastic depth, features as at inference (birder's --freeze-body keeps it training)
            model.eval()
            model.classifier.train()

    forward_model: nn.Module = model
    if env.distributed:
        forward_model = wrap_ddp(model, env)

    def compute_loss(views: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = forward_model(views[:, 0])
        return F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)

    def save_models(step: int) -> list[Path]:
        path = ckpt.step_path(out_dir, name, step)
        return [save_checkpoint(path, model, class_to_idx=folder.class_to_idx, rgb_stats=rgb_stats)]

    task = TrainTask(
        name=name,
        description=description,
        model=forward_model,
        trainable=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
        dataset=ViewsDataset(folder, config.augment(size, recipe), rgb_stats, n_aug=1),
        compute_loss=compute_loss,
        save_models=save_models,
        set_train_mode=set_train_mode,
    )
    return run_loop(task, loop, env, out_dir, start_step=start_step, resume_states=states, echo=echo)
