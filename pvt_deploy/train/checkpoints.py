"""Where a training run writes its files, in birder's layout, and how ``--resume`` finds them again.

birder's MMCR script (``train_mmcr.py``) writes, per save point, three files that we mirror:

* ``mmcr_<network>_<n>.pt`` -- the whole MMCR net (online + momentum encoders), ``task`` "self_supervised_learning",
  signature ``{"inputs": [{"data_shape": [0, C, H, W]}], "outputs": [{"data_shape": [0]}]}``;
* ``mmcr_<network>_<n>_states.pt`` -- optimizer / scheduler / scaler state in the dict layout of birder's
  "training states" file (birder's ``--load-states`` takes it under ``--recipe birder``: one parameter group);
* ``<network>_mmcr_<n>.pt`` -- the backbone alone as a 0-class classification checkpoint, the file birder's
  ``train.py --network <network> --tag mmcr --resume-epoch <n> --reset-head`` fine-tunes from.

birder numbers files by epoch; we number them by optimizer step (``--checkpoint-every`` counts steps). Fine-tuning
writes ``<network>_<tag>_<n>.pt`` (classification, with ``class_to_idx``) and its ``_states.pt``. Our extra keys
in the states file (``step``, ``run``) are ignored by birder, which reads only its own.
``resume_states`` finds the newest save point again and refuses a resume with different settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from pvt_deploy.errors import TrainingError
from pvt_deploy.files import atomic_write
from pvt_deploy.model.checkpoint import (
    BIRDER_FORMAT_VERSION,
    birder_config_for,
    make_signature,
    save_checkpoint,
)
from pvt_deploy.model.pvt_v2 import PVTv2

SSL_TASK = "self_supervised_learning"
CLASSIFICATION_TASK = "image_classification"


def ssl_signature(size: tuple[int, int], input_channels: int = 3) -> dict[str, Any]:
    """birder's ``get_ssl_signature``: an SSL net has no fixed output width."""
    return {
        "inputs": [{"data_shape": [0, input_channels, int(size[0]), int(size[1])]}],
        "outputs": [{"data_shape": [0]}],
    }


def mmcr_run_name(network: str) -> str:
    return f"mmcr_{network}"


def mmcr_backbone_name(network: str) -> str:
    return f"{network}_mmcr"


def step_path(out_dir: Path, name: str, step: int, *, states: bool = False) -> Path:
    return out_dir / (f"{name}_{step}_states.pt" if states else f"{name}_{step}.pt")


def atomic_torch_save(payload: Any, path: Path) -> Path:
    """torch.save through the project's atomic writer, so an interrupted save never leaves a truncated file."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def save_ssl_net(
    path: Path, net: torch.nn.Module, backbone: PVTv2, rgb_stats: dict[str, Any], projector_dims: list[int]
) -> Path:
    """The whole MMCR net as birder's ``checkpoint_model`` writes it for an SSL network.

    ``config`` carries the backbone config (only for non-stock sizes, as birder does) and ``mmcr_config`` the
    projector dims, which birder passes on its command line instead of storing."""
    payload: dict[str, Any] = {
        "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "birder_version": BIRDER_FORMAT_VERSION,
        "task": SSL_TASK,
        "signature": ssl_signature(backbone.size, backbone.input_channels),
        "class_to_idx": {},
        "rgb_stats": _rgb(rgb_stats),
        "mmcr_config": {"projector_dims": list(projector_dims)},
    }
    config = birder_config_for(backbone)
    if config is not None:
        payload["config"] = config
    return atomic_torch_save(payload, path)


def save_backbone(path: Path, backbone: PVTv2, rgb_stats: dict[str, Any]) -> Path:
    """The backbone alone: a 0-class classification checkpoint (birder's ``get_signature(shape, 0)``)."""
    if backbone.num_classes != 0:
        raise ValueError("a backbone checkpoint must have no classifier (num_classes=0)")
    return save_checkpoint(
        path,
        backbone,
        class_to_idx={},
        rgb_stats=rgb_stats,
        task=CLASSIFICATION_TASK,
        signature=make_signature(backbone.size, 0, backbone.input_channels),
    )


def save_states(path: Path, *, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, run: dict) -> Path:
    """The training states in the dict layout of birder's ``fs_ops._checkpoint_states`` plus our resume
    bookkeeping (``step``, ``run``; birder files extra keys under ``extra_states``). Whether birder's
    ``--load-states`` accepts the optimizer state depends on the recipe: birder's has one parameter group,
    ours two (``loop.make_optimizer``)."""
    return atomic_torch_save(
        {
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": None,
            "model_base_state": None,
            "step": step,
            "run": run,
        },
        path,
    )


def load_states(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is one user-facing error
        raise TrainingError(f"cannot read training states {path}: {str(exc).splitlines()[0]}") from None


def resume_states(out_dir: Path, run_name: str, description: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The newest saved step of ``run_name`` in ``out_dir`` and its training states, checked to be the same run."""
    step = latest_step(out_dir, run_name)
    if step is None:
        raise TrainingError(f"--resume: no {run_name}_<step>.pt with its _states.pt in {out_dir}")
    states = load_states(step_path(out_dir, run_name, step, states=True))
    check_same_run(states.get("run", {}), description)
    return step, states


def check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must use the settings that shape the remaining steps, or it would not be a continuation."""
    ignored = {"workers", "checkpoint_every", "stop_at", "log_every", "progress", "data"}
    changed = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if key not in ignored and _normal(saved.get(key)) != _normal(current.get(key))
    ]
    if changed:
        raise TrainingError("--resume with different settings than the checkpointed run (" + "; ".join(changed) + ")")


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))


def latest_step(out_dir: Path, name: str) -> int | None:
    """The highest step with both a model file and a states file (a run killed mid-save leaves neither)."""
    pattern = re.compile(rf"^{re.escape(name)}_([1-9][0-9]*)_states\.pt$")
    steps = []
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            match = pattern.fullmatch(path.name)
            if match and step_path(out_dir, name, int(match.group(1))).is_file():
                steps.append(int(match.group(1)))
    return max(steps) if steps else None


def _rgb(rgb_stats: dict[str, Any]) -> dict[str, tuple[float, ...]]:
    return {"mean": tuple(float(v) for v in rgb_stats["mean"]), "std": tuple(float(v) for v in rgb_stats["std"])}
