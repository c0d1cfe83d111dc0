"""What an export starts from: a loaded checkpoint, or a seeded random-weights model for offline try-outs.

Random weights are regenerated from ``(network, num_classes, size, seed)`` alone, which the manifest records,
so ``verify`` can rebuild the exact same PyTorch model without any file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pvt_deploy.errors import ExportError
from pvt_deploy.model.checkpoint import LoadedCheckpoint, load_checkpoint
from pvt_deploy.model.pvt_v2 import BIRDER_LAYER_NORM_EPS, PVT_V2_CONFIGS, PVTv2, create_model
from pvt_deploy.preprocess import BIRDER_RGB_STATS  # used when there is no checkpoint to read it from

RANDOM_WEIGHTS_SEED = 0
RANDOM_WEIGHTS_CLASSES = 550
"""A published name's class count; a bare network name gets the same so the graphs look like the real thing."""
RANDOM_WEIGHTS_SIZE = (384, 384)


@dataclass
class ExportSource:
    """Everything the exporter needs about the model, however it was obtained."""

    model: PVTv2
    model_name: str
    network: str
    labels: list[str]
    rgb_stats: dict[str, list[float]]
    size: tuple[int, int]
    layer_norm_eps: float
    random_weights: bool
    record: dict[str, Any] = field(default_factory=dict)  # the manifest's "source"

    @property
    def sha256(self) -> str:
        return str(self.record.get("sha256") or "")

    @property
    def birder_version(self) -> str:
        return str(self.record.get("birder_version") or "")


def random_weights_model(
    network: str, num_classes: int, size: tuple[int, int], layer_norm_eps: float, seed: int, config: Any = None
) -> PVTv2:
    """The same weights for the same arguments on every machine (CPU RNG, fixed init order)."""
    torch.manual_seed(seed)
    return create_model(network, num_classes, size=size, layer_norm_eps=layer_norm_eps, config_overrides=config).eval()


def _published_spec(name: str) -> dict[str, Any] | None:
    """Network and input size of a published name, from the hub's registry (None if not a published name)."""
    from pvt_deploy.hub import PUBLISHED

    weights = PUBLISHED.get(name)
    if weights is None:
        return None
    return {"network": weights.network, "size": tuple(weights.resolution), "num_classes": RANDOM_WEIGHTS_CLASSES}


def from_random_weights(
    name: str,
    *,
    network: str | None,
    layer_norm_eps: float,
    size: tuple[int, int] | None = None,
    num_classes: int | None = None,
    seed: int = RANDOM_WEIGHTS_SEED,
) -> ExportSource:
    """``name`` is a network (``pvt_v2_b2``) or a published name (its network, classes and resolution)."""
    published = _published_spec(name)
    if published is not None:
        network = network or published["network"]
        size = size or published["size"]
        num_classes = num_classes or published["num_classes"]
    elif name in PVT_V2_CONFIGS:
        network = network or name
    else:
        known = ", ".join(sorted(PVT_V2_CONFIGS))
        raise ExportError(f"--random-weights needs a network or published name, got {name!r}; networks: {known}")
    if network not in PVT_V2_CONFIGS:
        raise ExportError(f"unknown network {network!r}; known: {', '.join(sorted(PVT_V2_CONFIGS))}")
    size = tuple(size or RANDOM_WEIGHTS_SIZE)  # type: ignore[assignment]
    num_classes = num_classes or RANDOM_WEIGHTS_CLASSES
    try:
        model = random_weights_model(network, num_classes, size, layer_norm_eps, seed)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return ExportSource(
        model=model,
        model_name=name,
        network=network,
        labels=[f"class_{i:03d}" for i in range(num_classes)],
        rgb_stats=BIRDER_RGB_STATS,
        size=size,  # type: ignore[arg-type]
        layer_norm_eps=layer_norm_eps,
        random_weights=True,
        record={
            "random_weights": {"seed": seed, "network": network, "num_classes": num_classes, "size": list(size)},
            "path": None,
            "sha256": None,
            "birder_version": None,
            "task": "image_classification",
        },
    )


def from_checkpoint(loaded: LoadedCheckpoint, model_name: str | None = None) -> ExportSource:
    return ExportSource(
        model=loaded.model.eval(),
        model_name=model_name or _name_from_path(loaded.path),
        network=loaded.network,
        labels=list(loaded.labels),
        rgb_stats=loaded.rgb_stats,
        size=tuple(loaded.size),  # type: ignore[arg-type]
        layer_norm_eps=loaded.layer_norm_eps,
        random_weights=False,
        record={
            "path": str(Path(loaded.path).resolve()),
            "sha256": loaded.sha256,
            "birder_version": loaded.birder_version,
            "task": loaded.task,
            "config": loaded.config,
        },
    )


def _name_from_path(path: Path) -> str:
    name = Path(path).name
    for suffix in (".safetensors", ".pt", ".pth"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def resolve_export_source(
    source: str | Path | LoadedCheckpoint,
    *,
    random_weights: bool = False,
    network: str | None = None,
    layer_norm_eps: float = BIRDER_LAYER_NORM_EPS,
    size: tuple[int, int] | None = None,
) -> ExportSource:
    """A checkpoint path or published name (downloaded and verified by the hub), or random weights."""
    if isinstance(source, LoadedCheckpoint):
        return from_checkpoint(source)
    if random_weights:
        return from_random_weights(str(source), network=network, layer_norm_eps=layer_norm_eps, size=size)
    from pvt_deploy.hub import PUBLISHED, resolve_source  # a published name is downloaded and sha256-verified

    path = resolve_source(str(source))
    published_name = str(source) if str(source) in PUBLISHED and not Path(str(source)).is_file() else None
    loaded = load_checkpoint(path, network=network, layer_norm_eps=layer_norm_eps)
    return from_checkpoint(loaded, model_name=published_name)
