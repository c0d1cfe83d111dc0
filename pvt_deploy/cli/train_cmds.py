"""``pvt-deploy train mmcr|finetune``: single process, or one process per rank under ``torchrun``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from pvt_deploy.errors import TrainingError


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise click.BadParameter(f"expected N or HxW, got {value!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) <= 0 or sizes[0] % 32 or sizes[1] % 32:
        raise click.BadParameter(f"expected a positive multiple of 32 (N or HxW), got {value!r}")
    return sizes[0], sizes[1]


def _loop_options(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options every training command shares (recipe, optimisation, schedule, checkpoints, loading, logging).

    Options whose default depends on ``--recipe`` default to None here and are resolved by ``_loop_config``."""
    from pvt_deploy.train.recipes import DEFAULT_RECIPE, RECIPE_NAMES, recipe_for

    ours, birder = recipe_for(kind, "pvt-deploy"), recipe_for(kind, "birder")  # type: ignore[arg-type]
    options = [
        click.option(
            "--recipe",
            type=click.Choice(RECIPE_NAMES),
            default=DEFAULT_RECIPE,
            show_default=True,
            help="pvt-deploy: ours (AdamW, warmup + cosine, clipping, exact DDP gradient). birder: birder 0.8.4's "
            "own defaults (SGD momentum 0.9, constant lr per epoch, no clipping, birder's augmentations and DDP "
            "conventions); its training states load into birder's --resume-epoch --load-states. "
            "See docs/training.md.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=2),
            default=64,
            show_default=True,
            help="Global batch (all processes together); split evenly across torchrun ranks.",
        ),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps to train for."),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=None,
            help="Alternatively, full passes over the data (incomplete last batch dropped).",
        ),
        click.option(
            "--lr",
            type=click.FloatRange(min=0.0, min_open=True),
            default=None,
            help=f"Peak learning rate (AdamW) [default: {ours.lr:g}; birder recipe: {birder.lr:g}, SGD, constant].",
        ),
        click.option(
            "--min-lr",
            type=click.FloatRange(min=0.0),
            default=None,
            help="Learning rate at the end of the cosine decay [default: 0; not with --recipe birder].",
        ),
        click.option(
            "--weight-decay",
            type=click.FloatRange(min=0.0),
            default=None,
            help=f"Weight decay [default: {ours.weight_decay:g}, not on biases and norm weights; birder recipe: "
            f"{birder.weight_decay:g} on every parameter].",
        ),
        click.option(
            "--warmup-steps",
            type=click.IntRange(min=0),
            default=None,
            help="Linear warmup steps before the cosine decay [default: 0; not with --recipe birder].",
        ),
        click.option(
            "--clip-grad-norm",
            type=click.FloatRange(min=0.0),
            default=None,
            help=f"Clip the global gradient norm, 0 disables [default: {ours.clip_grad_norm:g}; birder recipe: 0].",
        ),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast for forward and backward."),
        click.option(
            "--out",
            "out_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Output folder for checkpoints, run.json and metrics.jsonl.",
        ),
        click.option(
            "--checkpoint-every",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Also save every N steps (the last step is always saved).",
        ),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint."),
        click.option(
            "--stop-at",
            type=click.IntRange(min=1),
            default=None,
            help="Stop (and save) at this step without ending the schedule; --resume continues it.",
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds weights, data order and views."),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=2,
            show_default=True,
            help="DataLoader worker processes per rank (0 loads in the main process).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="torch intra-op CPU threads per process (default: torch's choice).",
        ),
        click.option("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)."),
        click.option(
            "--log-every",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Write a metrics.jsonl record every N steps.",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _loop_config(kind: str, kwargs: dict[str, Any], num_images: Callable[[], int]):  # -> LoopConfig
    from pvt_deploy.train.loop import LoopConfig
    from pvt_deploy.train.recipes import recipe_for

    recipe = recipe_for(kind, kwargs["recipe"])  # type: ignore[arg-type]
    if recipe.schedule == "constant-per-epoch":
        given = [f"--{name.replace('_', '-')}" for name in ("warmup_steps", "min_lr") if kwargs[name] is not None]
        if given:
            raise TrainingError(
                f"{' and '.join(given)} shape the cosine schedule; --recipe {recipe.name} keeps lr constant"
            )
    steps, epochs = kwargs["steps"], kwargs["epochs"]
    if (steps is None) == (epochs is None):
        raise TrainingError("give exactly one of --steps and --epochs")
    if steps is None:
        steps = epochs * max(1, num_images() // kwargs["batch_size"])
    clip = kwargs["clip_grad_norm"] if kwargs["clip_grad_norm"] is not None else recipe.clip_grad_norm
    return LoopConfig(
        global_batch=kwargs["batch_size"],
        steps=steps,
        lr=kwargs["lr"] if kwargs["lr"] is not None else recipe.lr,
        weight_decay=kwargs["weight_decay"] if kwargs["weight_decay"] is not None else recipe.weight_decay,
        warmup_steps=kwargs["warmup_steps"] or 0,
        min_lr=kwargs["min_lr"] or 0.0,
        clip_grad_norm=clip or None,
        bf16=kwargs["bf16"],
        checkpoint_every=kwargs["checkpoint_every"],
        stop_at=kwargs["stop_at"],
        seed=kwargs["seed"],
        workers=kwargs["workers"],
        log_every=kwargs["log_every"],
        progress=not kwargs["no_progress"],
        recipe=recipe,
    )


def _recipe_default(kind: str, kwargs: dict[str, Any], name: str) -> Any:
    """An augmentation option's value: as given, else the recipe's default."""
    from pvt_deploy.train.birder_augment import birder_default_min_scale
    from pvt_deploy.train.recipes import recipe_for

    if kwargs[name] is not None:
        return kwargs[name]
    recipe = recipe_for(kind, kwargs["recipe"])  # type: ignore[arg-type]
    if name == "aug_level":
        return recipe.aug_level
    if recipe.min_scale is None:  # birder's fine-tuning: the level decides the crop scale
        return round(birder_default_min_scale(_recipe_default(kind, kwargs, "aug_level")), 6)
    return recipe.min_scale


def _with_process_group(func: Callable[..., Any]) -> Callable[..., Any]:
    """Join torchrun's process group (if any) around the command and always leave it."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        import torch

        from pvt_deploy.train.distributed import init_distributed, shutdown_distributed

        if kwargs.get("threads"):
            torch.set_num_threads(kwargs["threads"])
        env = init_distributed(kwargs.get("device"))
        try:
            if env.world_size > 1 and kwargs["batch_size"] % env.world_size:
                raise TrainingError(f"--batch-size {kwargs['batch_size']} must divide evenly by {env.world_size} ranks")
            return func(env=env, **kwargs)
        finally:
            shutdown_distributed()

    return wrapper


@click.group()
def train() -> None:
    """MMCR self-supervised pretraining and supervised fine-tuning (run under torchrun for DDP)."""


@train.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--network", default="pvt_v2_b2", show_default=True, help="PVT v2 size (pvt_v2_b0..b5, _li, pvt_v2_tiny)."
)
@click.option("--size", callback=_parse_size, default="224", show_default=True, help="Crop size, N or HxW.")
@click.option(
    "--projector-dims",
    default="8192,8192,512",
    show_default=True,
    help="Projector widths, comma-separated ([Linear, BN, ReLU] per hidden layer).",
)
@click.option("--n-aug", type=click.IntRange(min=2), default=2, show_default=True, help="Views per image.")
@click.option(
    "--lambda-coeff", type=float, default=0.0, show_default=True, help="Weight of the mean per-image nuclear norm."
)
@click.option(
    "--momentum-tau",
    type=click.FloatRange(0.0, 1.0),
    default=0.99,
    show_default=True,
    help="EMA rate of the momentum encoder.",
)
@click.option(
    "--aug-level",
    type=click.IntRange(0, 10),
    default=None,
    help="Augmentation strength [default: 8; birder recipe: 4, birder's own levels].",
)
@click.option(
    "--min-scale",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="Smallest random-resized-crop area fraction [default: 0.3, both recipes].",
)
@click.option(
    "--flip/--no-flip",
    default=True,
    show_default=True,
    help="Random horizontal flips (turn off for data that is not mirror-symmetric, e.g. digits).",
)
@click.option(
    "--drop-path-rate", type=click.FloatRange(0.0, 1.0), default=None, help="Override the network's stochastic depth."
)
@_loop_options("mmcr")
@_with_process_group
def mmcr(env: Any, data: str, **kwargs: Any) -> None:
    """Pretrain a PVT v2 backbone with MMCR on every image under DATA (any folder tree).

    Writes mmcr_<network>_<step>.pt (whole net), its _states.pt, and <network>_mmcr_<step>.pt (the backbone,
    what `train finetune --init` and birder's train.py take)."""
    from pvt_deploy.train.data import ImageFolder
    from pvt_deploy.train.pretrain import MMCRConfig, train_mmcr

    try:
        projector_dims = tuple(int(d) for d in kwargs["projector_dims"].split(",") if d.strip())
    except ValueError:
        raise click.BadParameter("expected comma-separated integers", param_hint="--projector-dims") from None
    if not projector_dims or min(projector_dims) <= 0:
        raise click.BadParameter("expected positive widths", param_hint="--projector-dims")
    loop = _loop_config("mmcr", kwargs, lambda: len(ImageFolder.unlabelled(data)))
    config = MMCRConfig(
        network=kwargs["network"],
        size=kwargs["size"],
        projector_dims=projector_dims,
        n_aug=kwargs["n_aug"],
        lambda_coeff=kwargs["lambda_coeff"],
        momentum_tau=kwargs["momentum_tau"],
        aug_level=_recipe_default("mmcr", kwargs, "aug_level"),
        min_scale=_recipe_default("mmcr", kwargs, "min_scale"),
        flip=kwargs["flip"],
        drop_path_rate=kwargs["drop_path_rate"],
    )
    out_dir = kwargs["out_dir"] or f"runs/mmcr_{config.network}"
    last = train_mmcr(data, out_dir, config, loop, env, resume=kwargs["resume"], echo=_echo(env))
    if env.is_primary:
        click.echo(f"done: step {last['step']}, loss {last.get('loss', float('nan')):.4f}; checkpoints in {out_dir}")


@train.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--init",
    "init",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Starting weights: a backbone from `train mmcr` or any birder PVT v2 checkpoint (head replaced).",
)
@click.option(
    "--linear-probe/--full",
    default=False,
    show_default=True,
    help="Train only the new head (frozen body), or everything.",
)
@click.option("--size", callback=_parse_size, default=None, help="Input size (default: the --init checkpoint's).")
@click.option(
    "--aug-level",
    type=click.IntRange(0, 10),
    default=None,
    help="Augmentation strength [default: 3; birder recipe: 4, with random erasing].",
)
@click.option(
    "--min-scale",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="Smallest crop area fraction [default: 0.5; birder recipe: 0.8 - 0.05 x level].",
)
@click.option("--label-smoothing", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True)
@click.option("--tag", default="finetune", show_default=True, help="Checkpoint names are <network>_<tag>_<step>.pt.")
@_loop_options("finetune")
@_with_process_group
def finetune(env: Any, data: str, **kwargs: Any) -> None:
    """Fine-tune on DATA, one sub-folder per class; saves birder classification checkpoints with class_to_idx."""
    from pvt_deploy.train.data import ImageFolder
    from pvt_deploy.train.finetune import FinetuneConfig, train_finetune

    loop = _loop_config("finetune", kwargs, lambda: len(ImageFolder.labelled(data)))
    config = FinetuneConfig(
        init=kwargs["init"],
        linear_probe=kwargs["linear_probe"],
        size=kwargs["size"],
        aug_level=_recipe_default("finetune", kwargs, "aug_level"),
        min_scale=_recipe_default("finetune", kwargs, "min_scale"),
        label_smoothing=kwargs["label_smoothing"],
        tag=kwargs["tag"],
    )
    out_dir = kwargs["out_dir"] or "runs/finetune"
    last = train_finetune(data, out_dir, config, loop, env, resume=kwargs["resume"], echo=_echo(env))
    if env.is_primary:
        click.echo(f"done: step {last['step']}, loss {last.get('loss', float('nan')):.4f}; checkpoints in {out_dir}")


def _echo(env: Any) -> Callable[[str], None]:
    return (lambda line: click.echo(line)) if env.is_primary else (lambda line: None)
