"""Read and write birder 0.8.4 PVT v2 checkpoints (``.pt`` and ``.safetensors``) without running any pickle code.

birder's ``.pt`` file is a plain dict saved with ``torch.save``::

    {"state": state_dict, "birder_version": "v0.8.4", "task": "image_classification",
     "signature": {"inputs": [{"data_shape": [0, 3, H, W]}], "outputs": [{"data_shape": [0, num_classes]}]},
     "class_to_idx": {label: index}, "rgb_stats": {"mean": (r, g, b), "std": (r, g, b)},
     "config": {...}}            # only when the net is not a stock birder config

Its ``.safetensors`` file holds the state dict as tensors and the same fields as JSON strings in the header
metadata. Neither stores the network name, so the PVT v2 size is inferred from the weight shapes.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pvt_deploy.errors import CheckpointError
from pvt_deploy.files import atomic_write, atomic_write_bytes, sha256_file
from pvt_deploy.model.pvt_v2 import (
    BIRDER_BASE_NETWORK,
    BIRDER_LAYER_NORM_EPS,
    PVT_V2_CONFIGS,
    PVTv2,
    PVTv2Config,
)

BIRDER_FORMAT_VERSION = "v0.8.4"
"""The birder release whose checkpoint layout we write, spelled like birder's ``__version__`` (with a "v")."""

CLASSIFICATION_TASK = "image_classification"
_REQUIRED_KEYS = ("state", "signature", "class_to_idx", "rgb_stats")
_SHAPE_FIELDS = ("depths", "embed_dims", "mlp_ratios", "linear")
MAX_INPUT_SIDE = 2048
"""Largest input side a signature may claim (the exporter's dynamic-size bound). Export allocates sample batches
of the signature's size, so an unchecked 320000x320000 claim asks for terabytes."""
_REFUSED = "refused: not a weights-only checkpoint; nothing was executed"


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: the model in eval mode plus everything the export and runtime need to know."""

    model: PVTv2
    network: str
    class_to_idx: dict[str, int]
    labels: list[str]
    rgb_stats: dict[str, list[float]]
    signature: dict[str, Any]
    task: str
    birder_version: str | None
    config: dict[str, Any] | None  # birder config overrides the model was built with (None: a stock size)
    size: tuple[int, int]
    sha256: str
    path: Path
    layer_norm_eps: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def make_signature(size: tuple[int, int], num_classes: int, input_channels: int = 3) -> dict[str, Any]:
    """birder's classification signature (``BaseNet.get_signature``): batch dim 0, NCHW input, (N, classes) output."""
    return {
        "inputs": [{"data_shape": [0, input_channels, int(size[0]), int(size[1])]}],
        "outputs": [{"data_shape": [0, int(num_classes)]}],
    }


def size_from_signature(signature: dict[str, Any]) -> tuple[int, int]:
    shape = signature["inputs"][0]["data_shape"]
    return int(shape[2]), int(shape[3])


def channels_from_signature(signature: dict[str, Any]) -> int:
    return int(signature["inputs"][0]["data_shape"][1])


def num_classes_from_signature(signature: dict[str, Any]) -> int:
    if "num_labels" in signature:
        return int(signature["num_labels"])
    return int(signature["outputs"][0]["data_shape"][1])


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _is_safetensors(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_pickle_stream(path: Path) -> bool:
    """Whether the file starts with one well-formed pickle (zip checkpoints count); parsed, never executed."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as handle:
            for opcode, _arg, _pos in pickletools.genops(handle):
                if opcode.name == "STOP":
                    return True
    except Exception:  # genops raises ValueError, EOFError, UnicodeDecodeError... on non-pickle bytes
        return False
    return False


def _refusal(path: Path, exc: pickle.UnpicklingError) -> CheckpointError:
    """One line for torch's weights-only refusal. torch's own text advises ``weights_only=False`` (running the
    file's code); that advice is never passed on, only what was refused."""
    text = str(exc)
    global_match = re.search(r"\bGLOBAL (\S+?)(?=\s|$)", text)
    if global_match:
        detail = f"it asks for {global_match.group(1)}, which a plain weights file never needs"
    elif operand := re.search(r"Unsupported operand (\d+)", text):
        if not _is_pickle_stream(path):
            return CheckpointError(f"{path}: not a PyTorch checkpoint (not pickle data)")
        detail = f"it uses pickle opcode {operand.group(1)}, which torch.save never writes"
    else:
        detail = "torch's weights-only unpickler rejected it"
    return CheckpointError(f"{path}: {_REFUSED} ({detail})")


def _read_pt(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            # torch warns (2 lines) about any pickle protocol but 2 before refusing or reading a raw pickle
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.(_weights_only_unpickler|serial)")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        if isinstance(exc, KeyError):  # the pickle machinery's lookup of an unknown opcode byte, e.g. KeyError(105)
            reason = "not pickle data"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({reason})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a birder checkpoint (top level is {type(payload).__name__}, not a dict)")
    return payload


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
    device = str(map_location) if not isinstance(map_location, str) else map_location
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError plus OSError/ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    payload: dict[str, Any] = {"state": state}
    for key, value in metadata.items():
        if key in ("birder_version", "task"):
            payload[key] = value
            continue
        try:
            payload[key] = json.loads(value) if value else None
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: safetensors metadata {key!r} is not valid JSON") from None
    if payload.get("config") is None:
        payload.pop("config", None)
    return payload


def read_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw birder dict from a ``.pt`` or ``.safetensors`` file, checked for the keys birder requires."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (.pt or .safetensors)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    payload = _read_safetensors(path, map_location) if _is_safetensors(path) else _read_pt(path, map_location)
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a birder checkpoint (missing {', '.join(missing)})")
    if not isinstance(payload["state"], dict) or not all(
        isinstance(value, torch.Tensor) for value in payload["state"].values()
    ):
        raise CheckpointError(f"{path}: 'state' is not a state dict of tensors")
    return payload


def infer_config(state: dict[str, torch.Tensor]) -> PVTv2Config:
    """Recover depths, embed dims, MLP ratios and the linear flag from weight shapes.

    Heads and spatial-reduction ratios are fixed in birder (1, 2, 5, 8 / 8, 4, 2, 1), so shapes are enough."""
    if "patch_embed.proj.weight" not in state or not any(key.startswith("body.stage1.") for key in state):
        sample = ", ".join(list(state)[:3]) or "no keys"
        raise CheckpointError(f"not a PVT v2 state dict (no patch_embed/body.stage1 weights; first keys: {sample})")
    depths, embed_dims, mlp_ratios = [], [], []
    stage = 1
    while f"body.stage{stage}.norm.weight" in state:
        prefix = f"body.stage{stage}."
        dim = int(state[f"{prefix}norm.weight"].shape[0])
        block_ids = {int(key[len(prefix) :].split(".")[1]) for key in state if key.startswith(f"{prefix}blocks.")}
        depth = max(block_ids) + 1 if block_ids else 0
        hidden = state.get(f"{prefix}blocks.0.mlp.fc1.weight")
        depths.append(depth)
        embed_dims.append(dim)
        mlp_ratios.append(float(hidden.shape[0]) / dim if hidden is not None else 4.0)
        stage += 1
    sr_weight = state.get("body.stage1.blocks.0.attn.sr.weight")
    linear = sr_weight is not None and tuple(sr_weight.shape[-2:]) == (1, 1)
    base = PVT_V2_CONFIGS["pvt_v2_b0"]
    try:
        return PVTv2Config(
            depths=tuple(depths),
            embed_dims=tuple(embed_dims),
            mlp_ratios=tuple(mlp_ratios),
            linear=linear,
            drop_path_rate=0.0,
            num_heads=base.num_heads[: len(depths)],
            sr_ratios=base.sr_ratios[: len(depths)],
        )
    except ValueError as exc:
        raise CheckpointError(f"weight shapes do not describe a PVT v2: {exc}") from None


def _same_shape(a: PVTv2Config, b: PVTv2Config) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in _SHAPE_FIELDS)


def match_network(config: PVTv2Config) -> str | None:
    """The registered name whose sizes equal ``config`` (drop-path rate is irrelevant at inference)."""
    for name, known in PVT_V2_CONFIGS.items():
        if _same_shape(known, config):
            return name
    return None


def _resolve_network(
    payload: dict[str, Any], network: str | None, inferred: PVTv2Config
) -> tuple[str, dict[str, Any] | None]:
    """Pick the network name and config overrides to build; returns (network, overrides)."""
    stored_config: dict[str, Any] | None = payload.get("config") or None
    if network is not None:
        if network not in PVT_V2_CONFIGS:
            known = ", ".join(sorted(PVT_V2_CONFIGS))
            raise CheckpointError(f"unknown network {network!r}; known: {known}")
        if stored_config is None and match_network(inferred) is None:
            # an unregistered size saved without its config: the shapes are the only description there is
            return network, inferred.to_birder()
        return network, stored_config
    name = match_network(inferred)
    if name is not None:
        return name, stored_config
    # Not a registered size: build it the way birder does, a base network plus the shape config as overrides
    base = "pvt_v2_b0_li" if inferred.linear else "pvt_v2_b0"
    overrides = inferred.to_birder()
    if stored_config:
        overrides["drop_path_rate"] = stored_config.get("drop_path_rate", overrides["drop_path_rate"])
    return base, overrides


def _check_signature(
    path: Path,
    size: tuple[int, int],
    num_classes: int,
    input_channels: int,
    state: dict[str, torch.Tensor],
    embedding_dim: int,
) -> None:
    """Bound what the signature claims before anything is allocated from it: the input size by MAX_INPUT_SIDE;
    class and channel counts that differ from the weights' are refused here when the layer they would build could
    not even fit in the file (smaller mismatches get the detailed shape report after the model is built)."""
    if not all(32 <= side <= MAX_INPUT_SIDE for side in size):
        raise CheckpointError(
            f"{path}: signature input size {size[0]}x{size[1]} is outside 32..{MAX_INPUT_SIDE} px per side"
        )
    if size[0] % 32 or size[1] % 32:
        raise CheckpointError(f"{path}: signature input size {size} is not a multiple of 32")
    file_bytes = path.stat().st_size
    patch = state["patch_embed.proj.weight"]
    weight_channels = int(patch.shape[1])
    if input_channels != weight_channels and input_channels * patch[:, :1].numel() * 4 > file_bytes:
        raise CheckpointError(
            f"{path}: signature says {input_channels} input channels, the weights have {weight_channels}"
        )
    classifier = state.get("classifier.weight")
    weight_classes = int(classifier.shape[0]) if classifier is not None else 0
    if num_classes != weight_classes and num_classes * embedding_dim * 4 > file_bytes:
        raise CheckpointError(f"{path}: signature says {num_classes} classes, the weights have {weight_classes}")


def _labels(path: Path, class_to_idx: dict[str, int], num_classes: int) -> list[str]:
    if not isinstance(class_to_idx, dict):
        raise CheckpointError(f"{path}: class_to_idx is not a dict")
    by_index = {int(index): str(label) for label, index in class_to_idx.items()}
    if len(by_index) != len(class_to_idx) or sorted(by_index) != list(range(num_classes)):
        raise CheckpointError(
            f"{path}: class_to_idx has {len(class_to_idx)} labels but the model has {num_classes} classes "
            "(indices must be exactly 0..num_classes-1)"
        )
    return [by_index[i] for i in range(num_classes)]


def _load_state(path: Path, model: PVTv2, state: dict[str, torch.Tensor], network: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        if mismatched:
            key = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches (first: {key} is {tuple(state[key].shape)}, "
                f"{network} expects {tuple(expected[key].shape)})"
            )
        raise CheckpointError(f"{path}: weights do not fit {network}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | Path,
    *,
    network: str | None = None,
    layer_norm_eps: float = BIRDER_LAYER_NORM_EPS,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load a birder PVT v2 checkpoint (``.pt`` or ``.safetensors``) into our model, in eval mode.

    ``network`` defaults to the registered size whose shapes match the weights. ``layer_norm_eps`` defaults to
    birder 0.8.4's 1e-6; pass ``TRAINING_LAYER_NORM_EPS`` (1e-5) for the convention the published weights were
    trained with. Every problem raises ``CheckpointError`` with one line; no pickle code ever runs."""
    path = Path(path)
    payload = read_checkpoint_file(path, map_location)
    signature = payload["signature"]
    try:
        size = size_from_signature(signature)
        num_classes = num_classes_from_signature(signature)
        input_channels = channels_from_signature(signature)
    except (KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{path}: malformed signature {signature!r}") from None
    state: dict[str, torch.Tensor] = payload["state"]
    try:
        inferred = infer_config(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    _check_signature(path, size, num_classes, input_channels, state, inferred.embed_dims[-1])
    network_name, overrides = _resolve_network(payload, network, inferred)
    config = PVT_V2_CONFIGS[network_name].with_overrides(overrides)
    try:
        model = PVTv2(
            config,
            num_classes,
            input_channels=input_channels,
            size=size,
            layer_norm_eps=layer_norm_eps,
            network=network_name,
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot build {network_name} from its config ({exc})") from None
    _load_state(path, model, state, network_name)
    model.eval()
    rgb_stats = payload["rgb_stats"]
    try:
        rgb = {"mean": [float(v) for v in rgb_stats["mean"]], "std": [float(v) for v in rgb_stats["std"]]}
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: malformed rgb_stats {rgb_stats!r}") from None
    if len(rgb["mean"]) != input_channels or len(rgb["std"]) != input_channels:
        raise CheckpointError(f"{path}: rgb_stats need {input_channels} values each, got {rgb_stats!r}")
    extra = {key: value for key, value in payload.items() if key not in (*_REQUIRED_KEYS, "task", "birder_version")}
    extra.pop("config", None)
    return LoadedCheckpoint(
        model=model,
        network=network_name,
        class_to_idx=dict(payload["class_to_idx"]),
        labels=_labels(path, payload["class_to_idx"], num_classes),
        rgb_stats=rgb,
        signature=signature,
        task=str(payload.get("task", CLASSIFICATION_TASK)),
        birder_version=payload.get("birder_version"),
        config=overrides or None,
        size=size,
        sha256=sha256_file(path),
        path=path,
        layer_norm_eps=layer_norm_eps,
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------------------------
# Writing


def birder_config_for(model: PVTv2) -> dict[str, Any] | None:
    """The ``config`` birder needs to rebuild ``model``: None for a stock birder size, else the full config dict.

    birder rebuilds a checkpoint as ``net_factory(network, ..., config=checkpoint['config'])``; our extra sizes
    (e.g. ``pvt_v2_tiny``) are built from ``BIRDER_BASE_NETWORK[name]`` plus this config."""
    stock = PVT_V2_CONFIGS.get(model.network)
    if model.network not in BIRDER_BASE_NETWORK and stock is not None and stock == model.config:
        return None
    return model.config.to_birder()


def birder_network_for(model: PVTv2) -> str:
    """The network name to give birder's ``load_model``/``load_checkpoint`` for this model."""
    return BIRDER_BASE_NETWORK.get(model.network, model.network)


@dataclass(frozen=True)
class _CheckpointContent:
    """What both birder file layouts hold: the tensors, the plain fields, and ``config`` for non-stock sizes."""

    state: dict[str, torch.Tensor]
    fields: dict[str, Any]
    config: dict[str, Any] | None


def _checkpoint_content(
    model: PVTv2,
    class_to_idx: dict[str, int],
    rgb_stats: dict[str, Any],
    task: str,
    signature: dict[str, Any] | None,
) -> _CheckpointContent:
    num_classes = model.num_classes
    if sorted(int(v) for v in class_to_idx.values()) != list(range(num_classes)):
        raise CheckpointError(f"class_to_idx must map exactly the indices 0..{num_classes - 1}")
    if signature is None:
        signature = make_signature(model.size, num_classes, model.input_channels)
    rgb = {"mean": tuple(float(v) for v in rgb_stats["mean"]), "std": tuple(float(v) for v in rgb_stats["std"])}
    return _CheckpointContent(
        state={k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        fields={
            "birder_version": BIRDER_FORMAT_VERSION,
            "task": task,
            "signature": signature,
            "class_to_idx": {str(k): int(v) for k, v in class_to_idx.items()},
            "rgb_stats": rgb,
        },
        config=birder_config_for(model),
    )


def save_checkpoint(
    path: str | Path,
    model: PVTv2,
    *,
    class_to_idx: dict[str, int],
    rgb_stats: dict[str, Any],
    task: str = CLASSIFICATION_TASK,
    signature: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save in birder 0.8.4's ``.pt`` layout (``fs_ops.checkpoint_model``), loadable by birder's ``load_model``.

    ``config`` is stored only when the model is not a stock birder size, exactly when birder itself stores it.
    ``extra`` adds more top-level keys (plain data only: they must pass ``weights_only`` loading)."""
    content = _checkpoint_content(model, class_to_idx, rgb_stats, task, signature)
    payload: dict[str, Any] = {"state": content.state, **content.fields}
    if content.config is not None:
        payload["config"] = content.config
    if extra:
        clashes = set(extra) & set(payload)
        if clashes:
            raise ValueError(f"extra keys clash with birder's: {sorted(clashes)}")
        payload.update(extra)
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def save_safetensors(
    path: str | Path,
    model: PVTv2,
    *,
    class_to_idx: dict[str, int],
    rgb_stats: dict[str, Any],
    task: str = CLASSIFICATION_TASK,
    signature: dict[str, Any] | None = None,
) -> Path:
    """Save in birder's ``.safetensors`` layout (``fs_ops.save_st``): tensors plus JSON-string metadata."""
    from safetensors.torch import save as safetensors_bytes

    content = _checkpoint_content(model, class_to_idx, rgb_stats, task, signature)
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in content.fields.items()}
    if content.config is not None:
        metadata["config"] = json.dumps(content.config)
    blob = safetensors_bytes(content.state, metadata=metadata)
    return atomic_write_bytes(path, blob)


__all__ = [
    "BIRDER_FORMAT_VERSION",
    "LoadedCheckpoint",
    "birder_config_for",
    "birder_network_for",
    "infer_config",
    "load_checkpoint",
    "make_signature",
    "match_network",
    "read_checkpoint_file",
    "save_checkpoint",
    "save_safetensors",
]
