"""The step loop shared by MMCR pretraining and fine-tuning: the recipe's optimizer and schedule (ours: AdamW,
warmup + cosine per step, clipping; birder's: SGD, constant per epoch), bf16 autocast, periodic checkpoints,
bit-for-bit resume, a progress bar and a JSONL metrics log.

Why resume is exact: the batches of step ``s`` come from the seeded sampler (a function of seed and epoch only),
the global torch RNG (stochastic depth) is re-seeded from (seed, step, rank) before every step, and model,
optimizer and scheduler state are restored from the checkpoint of the step the run stopped at.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvt_deploy.errors import ImageError, TrainingError
from pvt_deploy.train import checkpoints as ckpt
from pvt_deploy.train.data import SeededBatchSampler, ViewsDataset, make_loader
from pvt_deploy.train.distributed import DistEnv, all_reduce_mean, barrier
from pvt_deploy.train.recipes import DEFAULT_RECIPE, MMCR_RECIPES, Recipe


@dataclass
class LoopConfig:
    """Hyper-parameters that define a run. ``--resume`` compares ``describe()`` with the saved run's and refuses
    any difference except workers, checkpoint_every, stop_at, log_every, progress and data
    (``checkpoints.check_same_run``). ``recipe`` fixes the optimizer and schedule (``recipes.py``)."""

    global_batch: int
    steps: int
    lr: float
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 0.0
    clip_grad_norm: float | None = 1.0
    bf16: bool = False
    checkpoint_every: int = 0
    stop_at: int | None = None
    seed: int = 0
    workers: int = 2
    log_every: int = 1
    progress: bool = True
    recipe: Recipe = MMCR_RECIPES[DEFAULT_RECIPE]
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self).items() if k not in ("extra", "recipe")}
        return {**settings, **self.recipe.describe(), **self.extra}


def warmup_cosine(step: int, *, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(parameters: list[tuple[str, nn.Parameter]], config: LoopConfig) -> torch.optim.Optimizer:
    """Ours: AdamW, biases and norm parameters (ndim <= 1) not decayed (two groups). birder's: SGD with momentum,
    every parameter decayed, in the one group (with its ``lr_scale`` key) that birder's
    ``optimizer_parameter_groups`` builds with its defaults, so its ``--load-states`` accepts our states."""
    if config.recipe.optimizer == "sgd":
        group = {"params": [p for _, p in parameters], "weight_decay": config.weight_decay, "lr_scale": 1.0}
        return torch.optim.SGD(
            [group], lr=config.lr, momentum=config.recipe.momentum, nesterov=False, weight_decay=config.weight_decay
        )
    decay = [p for _, p in parameters if p.ndim > 1]
    no_decay = [p for _, p in parameters if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999))


def make_scheduler(optimizer: torch.optim.Optimizer, config: LoopConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Ours: warmup + cosine, stepped every optimizer step. birder's default: ``ConstantLR(factor=1.0,
    total_iters=1)``, stepped at the end of every epoch (its ``--lr-scheduler-update epoch``)."""
    if config.recipe.schedule == "constant-per-epoch":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=1)

    def factor(step: int) -> float:
        lr = warmup_cosine(
            step, total=config.steps, warmup=config.warmup_steps, base_lr=config.lr, min_lr=config.min_lr
        )
        return lr / config.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 4099 + rank


class _Progress:
    """tqdm when installed (train extra), else a plain line every ``log_every`` steps."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, record: dict[str, Any], total: int) -> None:
        if not self.enabled:
            return
        text = f"loss={record['loss']:.4f} lr={record['lr']:.3e} img/s={record['images_per_s']:.1f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {record['step']}/{total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """Append-only JSONL; on resume, records past the resumed step (from the interrupted tail) are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


@dataclass
class TrainTask:
    """What a concrete training run plugs into the loop. The loop itself writes run.json (``description``) and
    each save point's training states (``<name>_<step>_states.pt``); the task writes only its model files."""

    name: str  # checkpoint stem: <name>_<step>.pt and <name>_<step>_states.pt
    description: dict[str, Any]  # every setting: run.json, and the states' "run" that --resume compares
    model: nn.Module  # what forward runs on (DDP-wrapped when distributed)
    trainable: list[tuple[str, nn.Parameter]]
    dataset: ViewsDataset
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    save_models: Callable[[int], list[Path]]  # the step's model files; called on the primary rank only
    after_step: Callable[[], None] = lambda: None
    set_train_mode: Callable[[], None] = lambda: None

    def save(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> list[Path]:
        states = ckpt.save_states(
            ckpt.step_path(out_dir, self.name, step, states=True),
            optimizer=optimizer,
            scheduler=scheduler,
            step=step,
            run=self.description,
        )
        return [*self.save_models(step), states]


def run_loop(
    task: TrainTask,
    config: LoopConfig,
    env: DistEnv,
    out_dir: Path,
    *,
    start_step: int = 0,
    resume_states: dict[str, Any] | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Train from ``start_step`` to ``config.steps`` (or ``stop_at``); returns a summary of the last step."""
    batches_per_epoch = len(task.dataset) // config.global_batch
    if batches_per_epoch < 1:
        raise TrainingError(
            f"{len(task.dataset)} images are fewer than one global batch of {config.global_batch}; lower --batch-size"
        )
    if env.is_primary:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run.json").write_text(json.dumps(task.description, indent=2) + "\n")
    optimizer = make_optimizer(task.trainable, config)
    scheduler = make_scheduler(optimizer, config)
    per_epoch_schedule = config.recipe.schedule == "constant-per-epoch"
    if resume_states is not None:
        optimizer.load_state_dict(resume_states["optimizer_state"])
        scheduler.load_state_dict(resume_states["scheduler_state"])

    end = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
    metrics = MetricsLog(out_dir / "metrics.jsonl", start_step, env.is_primary)
    progress = _Progress(end, start_step, config.progress and env.is_primary)
    device_type = env.device.type
    parameters = [p for _, p in task.trainable]
    step = start_step
    saved: list[Path] = []
    last: dict[str, Any] = {"step": step}
    task.set_train_mode()
    try:
        while step < end:
            epoch, first_batch = divmod(step, batches_per_epoch)
            sampler = SeededBatchSampler(
                len(task.dataset),
                config.global_batch,
                seed=config.seed,
                epoch=epoch,
                rank=env.rank,
                world_size=env.world_size,
                start_batch=first_batch,
            )
            tick = time.perf_counter()
            for views, labels in _surface_image_errors(make_loader(task.dataset, sampler, config.workers)):
                torch.manual_seed(step_seed(config.seed, step, env.rank))
                views = views.to(env.device, non_blocking=True)
                labels = labels.to(env.device, non_blocking=True)
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.bf16):
                    loss = task.compute_loss(views, labels)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {step + 1}; lower --lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = None
                if config.clip_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                if not per_epoch_schedule:
                    scheduler.step()
                task.after_step()
                step += 1
                if per_epoch_schedule and step % batches_per_epoch == 0:
                    scheduler.step()
                now = time.perf_counter()
                last = {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": float(all_reduce_mean(loss.detach().float())),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "images_per_s": config.global_batch / max(now - tick, 1e-9),
                    "time": time.time(),
                }
                tick = now
                if step % max(1, config.log_every) == 0 or step == end:
                    metrics.write(last)
                progress.update(last, end)
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end:
                    if env.is_primary:
                        saved = task.save(out_dir, step, optimizer, scheduler)
                    barrier()
                if step >= end:
                    break
    finally:
        progress.close()
    for path in saved:
        echo(f"saved {path}")
    return last


def _surface_image_errors(loader: Any) -> Any:
    """A worker's ImageError arrives re-wrapped with a traceback in its message; keep it to one line."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except ImageError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            message = next((line.split("ImageError: ", 1)[1] for line in lines if "ImageError: " in line), lines[-1])
            raise ImageError(message) from None
        yield batch
