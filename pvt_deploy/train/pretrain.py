"""MMCR self-supervised pretraining of a PVT v2 backbone on a folder of images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pvt_deploy.errors import TrainingError
from pvt_deploy.model.pvt_v2 import BIRDER_LAYER_NORM_EPS, PVT_V2_CONFIGS, create_model
from pvt_deploy.train import checkpoints as ckpt
from pvt_deploy.train.augment import BIRDER_RGB_STATS, AugmentConfig, RGBStats
from pvt_deploy.train.birder_augment import BirderAugmentConfig
from pvt_deploy.train.data import ImageFolder, ViewsDataset
from pvt_deploy.train.distributed import DistEnv, wrap_ddp
from pvt_deploy.train.loop import LoopConfig, TrainTask, run_loop
from pvt_deploy.train.mmcr import DEFAULT_MOMENTUM_TAU, DEFAULT_N_AUG, DEFAULT_PROJECTOR_DIMS, MMCR, mmcr_momentum_loss
from pvt_deploy.train.recipes import DEFAULT_RECIPE, MMCR_RECIPES, Recipe


@dataclass
class MMCRConfig:
    network: str = "pvt_v2_b2"
    size: tuple[int, int] = (224, 224)
    projector_dims: tuple[int, ...] = DEFAULT_PROJECTOR_DIMS
    n_aug: int = DEFAULT_N_AUG
    lambda_coeff: float = 0.0
    momentum_tau: float = DEFAULT_MOMENTUM_TAU
    aug_level: int = 8
    min_scale: float = 0.3
    flip: bool = True
    layer_norm_eps: float = BIRDER_LAYER_NORM_EPS
    drop_path_rate: float | None = None
    rgb_stats: RGBStats = field(default_factory=lambda: dict(BIRDER_RGB_STATS))

    def describe(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "size": list(self.size),
            "projector_dims": list(self.projector_dims),
            "n_aug": self.n_aug,
            "lambda_coeff": self.lambda_coeff,
            "momentum_tau": self.momentum_tau,
            "aug_level": self.aug_level,
            "min_scale": self.min_scale,
            "flip": self.flip,
            "layer_norm_eps": self.layer_norm_eps,
            "drop_path_rate": self.drop_path_rate,
        }

    def augment(self, recipe: Recipe) -> AugmentConfig | BirderAugmentConfig:
        """The recipe's view pipeline (birder's MMCR script turns random erasing off)."""
        augment_type = BirderAugmentConfig if recipe.augment == "birder" else AugmentConfig
        return augment_type(size=self.size, level=self.aug_level, min_scale=self.min_scale, flip=self.flip)


def build_mmcr(config: MMCRConfig, seed: int, recipe: Recipe = MMCR_RECIPES[DEFAULT_RECIPE]) -> MMCR:
    """Seeded so every rank (and a resumed run, before loading) starts from identical weights; the recipe
    decides whether the projector's BatchNorm sees the global batch or each rank's own."""
    if config.network not in PVT_V2_CONFIGS:
        raise TrainingError(f"unknown network {config.network!r}; known: {', '.join(sorted(PVT_V2_CONFIGS))}")
    check_train_size(config.size)
    overrides = {"drop_path_rate": config.drop_path_rate} if config.drop_path_rate is not None else None
    torch.manual_seed(seed)
    backbone = create_model(
        config.network, 0, size=config.size, layer_norm_eps=config.layer_norm_eps, config_overrides=overrides
    )
    global_batch_norm = recipe.projector_batch_norm == "global-batch"
    return MMCR(backbone, config.projector_dims, global_batch_norm=global_batch_norm)


def train_mmcr(
    data: str | Path,
    out_dir: str | Path,
    config: MMCRConfig,
    loop: LoopConfig,
    env: DistEnv,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Pretrain with ``loop.recipe``; writes birder-layout checkpoints into ``out_dir`` and returns the last
    step's metrics."""
    out_dir = Path(out_dir)
    recipe = loop.recipe
    folder = ImageFolder.unlabelled(data)
    dataset = ViewsDataset(folder, config.augment(recipe), config.rgb_stats, config.n_aug)
    net = build_mmcr(config, loop.seed, recipe).to(env.device)
    run_name = ckpt.mmcr_run_name(config.network)
    backbone_name = ckpt.mmcr_backbone_name(config.network)
    description = {"kind": "mmcr", **config.describe(), **loop.describe(), "data": str(folder.root)}

    start_step, states = 0, None
    if resume:
        start_step, states = ckpt.resume_states(out_dir, run_name, description)
        payload = torch.load(ckpt.step_path(out_dir, run_name, start_step), map_location="cpu", weights_only=True)
        net.load_state_dict(payload["state"], strict=True)
        echo(f"resuming {run_name} from step {start_step}")

    model: torch.nn.Module = net
    if env.distributed:
        model = wrap_ddp(net, env, broadcast_buffers=recipe.projector_batch_norm == "per-rank")

    def compute_loss(views: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        z, z_momentum = model(views)
        return mmcr_momentum_loss(z, z_momentum, config.n_aug, config.lambda_coeff, ddp_gradient=recipe.ddp_gradient)

    def save_models(step: int) -> list[Path]:
        return [
            ckpt.save_ssl_net(
                ckpt.step_path(out_dir, run_name, step),
                net,
                net.backbone,
                config.rgb_stats,
                list(config.projector_dims),
            ),
            ckpt.save_backbone(ckpt.step_path(out_dir, backbone_name, step), net.backbone, config.rgb_stats),
        ]

    task = TrainTask(
        name=run_name,
        description=description,
        model=model,
        trainable=[(n, p) for n, p in net.named_parameters() if p.requires_grad],
        dataset=dataset,
        compute_loss=compute_loss,
        save_models=save_models,
        after_step=lambda: net.update_momentum(config.momentum_tau),
        set_train_mode=net.train,
    )
    return run_loop(task, loop, env, out_dir, start_step=start_step, resume_states=states, echo=echo)


def check_train_size(size: tuple[int, int]) -> None:
    """PVT v2 downsamples by 32; say so as a --size error before any model is built."""
    if size[0] % 32 or size[1] % 32:
        raise TrainingError(f"--size {size[0]}x{size[1]} must be a multiple of 32 on both sides")
