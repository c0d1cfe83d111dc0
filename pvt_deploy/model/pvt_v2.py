"""Pyramid Vision Transformer v2 (Wang et al., arXiv 2106.13797), laid out as birder 0.8.4 lays it out.

The module tree mirrors birder's ``birder/net/pvt_v2.py`` so that ``state_dict`` keys match key for key
and birder checkpoints load with ``strict=True``. Architecture sizes are data (``PVT_V2_CONFIGS``); the one
deliberate knob birder lacks is ``layer_norm_eps`` (birder 0.8.4 hard-codes 1e-6, the published weights were
trained under 1e-5).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BIRDER_LAYER_NORM_EPS = 1e-6
"""birder 0.8.4 builds every LayerNorm with this eps."""

TRAINING_LAYER_NORM_EPS = 1e-5
"""The eps the published ``pvt_v2_b2_mmcr-il-all`` weights were trained with."""

STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class PVTv2Config:
    """One PVT v2 size. Field names match birder's config dict so a config round-trips through checkpoints."""

    depths: tuple[int, ...]
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    linear: bool
    drop_path_rate: float
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)

    def __post_init__(self) -> None:
        lengths = {len(self.depths), len(self.embed_dims), len(self.mlp_ratios), len(self.num_heads)}
        if len(lengths) != 1:
            raise ValueError("depths, embed_dims, mlp_ratios and num_heads must have one entry per stage")
        for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
            if dim % heads != 0:
                raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")

    def to_birder(self) -> dict[str, Any]:
        """The dict birder stores under a checkpoint's ``config`` key (birder fixes heads and sr ratios)."""
        return {
            "depths": list(self.depths),
            "embed_dims": list(self.embed_dims),
            "mlp_ratios": list(self.mlp_ratios),
            "linear": self.linear,
            "drop_path_rate": self.drop_path_rate,
        }

    def with_overrides(self, overrides: dict[str, Any] | None) -> PVTv2Config:
        """Apply a birder-style config dict (lists become tuples; unknown keys are ignored as birder does)."""
        if not overrides:
            return self
        known = {f: overrides[f] for f in asdict(self) if f in overrides}
        for key, value in known.items():
            if isinstance(value, list):
                known[key] = tuple(value)
        return replace(self, **known)


_B_SMALL = dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8.0, 8.0, 4.0, 4.0))

PVT_V2_CONFIGS: dict[str, PVTv2Config] = {
    "pvt_v2_b0": PVTv2Config((2, 2, 2, 2), (32, 64, 160, 256), (8.0, 8.0, 4.0, 4.0), False, 0.1),
    "pvt_v2_b0_li": PVTv2Config((2, 2, 2, 2), (32, 64, 160, 256), (8.0, 8.0, 4.0, 4.0), True, 0.1),
    "pvt_v2_b1": PVTv2Config((2, 2, 2, 2), linear=False, drop_path_rate=0.1, **_B_SMALL),
    "pvt_v2_b1_li": PVTv2Config((2, 2, 2, 2), linear=True, drop_path_rate=0.1, **_B_SMALL),
    "pvt_v2_b2": PVTv2Config((3, 4, 6, 3), linear=False, drop_path_rate=0.1, **_B_SMALL),
    "pvt_v2_b2_li": PVTv2Config((3, 4, 6, 3), linear=True, drop_path_rate=0.1, **_B_SMALL),
    "pvt_v2_b3": PVTv2Config((3, 4, 18, 3), linear=False, drop_path_rate=0.3, **_B_SMALL),
    "pvt_v2_b3_li": PVTv2Config((3, 4, 18, 3), linear=True, drop_path_rate=0.3, **_B_SMALL),
    "pvt_v2_b4": PVTv2Config((3, 8, 27, 3), linear=False, drop_path_rate=0.3, **_B_SMALL),
    "pvt_v2_b5": PVTv2Config(
        (3, 6, 40, 3), (64, 128, 320, 512), (4.0, 4.0, 4.0, 4.0), linear=False, drop_path_rate=0.3
    ),
    # Not a birder name: a few-hundred-k-parameter PVT v2 for tests and CPU training demos. birder builds it as
    # network "pvt_v2_b0" with this config stored in the checkpoint's ``config`` key.
    "pvt_v2_tiny": PVTv2Config((1, 1, 1, 1), (16, 32, 80, 128), (2.0, 2.0, 2.0, 2.0), False, 0.0),
}

BIRDER_BASE_NETWORK = {"pvt_v2_tiny": "pvt_v2_b0"}
"""Our extra configs and the birder network that builds them when given the checkpoint's config."""


class DropPath(nn.Module):
    """Per-sample stochastic depth (torchvision's StochasticDepth 'row' mode); no parameters, so keys match."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class MLP(nn.Module):
    """Feed-forward with a depthwise 3x3 conv between the two linears (PVT v2's 'convolutional FFN')."""

    def __init__(self, in_features: int, hidden_features: int, extra_relu: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, groups=hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        batch, _, channels = x.shape
        x = x.transpose(1, 2).reshape(batch, channels, height, width)
        x = self.dwconv(x).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Attention(nn.Module):
    """Spatial-reduction attention: keys and values come from a downsampled (or pooled, when linear) map."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, linear: bool, layer_norm_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.pool: nn.Module | None = None
        self.act: nn.Module | None = None
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.act = nn.GELU()
            self.sr = nn.Conv2d(dim, dim, 1, 1, 0)
            self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio, 0)
            self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        if self.sr is not None and self.norm is not None:
            x = x.permute(0, 2, 1).reshape(batch, channels, height, width)
            if self.pool is not None:
                x = self.pool(x)
            x = self.norm(self.sr(x).flatten(2).permute(0, 2, 1))
            if self.act is not None:
                x = self.act(x)
        kv = self.kv(x).reshape(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class PyramidVisionTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        linear: bool,
        drop_path: float,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = Attention(dim, num_heads, sr_ratio, linear, layer_norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), extra_relu=linear)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows; returns channels-last (B, H, W, C) like birder."""

    def __init__(self, patch_size: int, stride: int, in_channels: int, embed_dim: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PyramidVisionTransformerStage(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        linear: bool,
        mlp_ratio: float,
        downsample: bool,
        drop_path: list[float],
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.downsample: nn.Module = (
            OverlapPatchEmbed(3, 2, dim, dim_out, layer_norm_eps) if downsample else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            PyramidVisionTransformerBlock(dim_out, num_heads, mlp_ratio, sr_ratio, linear, drop_path[i], layer_norm_eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim_out, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) for stage 1, (B, C, H, W) after it -> (B, C', H', W')."""
        x = self.downsample(x)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        for block in self.blocks:
            x = block(x, height, width)
        x = self.norm(x)
        return x.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def _stochastic_depth_rates(rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    # device="cpu": plain numbers, so building under `with torch.device("meta")` works too
    rates = torch.linspace(0.0, rate, steps=sum(depths), device="cpu").tolist() if sum(depths) else []
    staged, offset = [], 0
    for depth in depths:
        staged.append(rates[offset : offset + depth])
        offset += depth
    return staged


class PVTv2(nn.Module):
    """PVT v2 classifier with birder's interface: ``forward`` (logits), ``embedding``, ``classify``,
    ``forward_features`` and ``detection_features`` (dict of NCHW stage maps)."""

    max_stride = 32

    def __init__(
        self,
        config: PVTv2Config,
        num_classes: int,
        *,
        input_channels: int = 3,
        size: tuple[int, int] = (384, 384),
        layer_norm_eps: float = BIRDER_LAYER_NORM_EPS,
        network: str = "pvt_v2_b2",
    ) -> None:
        super().__init__()
        self.config = config
        self.network = network
        self.num_classes = num_classes
        self.input_channels = input_channels
        self.size = tuple(size)
        self.layer_norm_eps = layer_norm_eps
        self.return_stages = list(STAGE_NAMES[: len(config.depths)])
        embed_dims = config.embed_dims

        self.patch_embed = OverlapPatchEmbed(7, 4, input_channels, embed_dims[0], layer_norm_eps)
        drop_path_rates = _stochastic_depth_rates(config.drop_path_rate, config.depths)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        previous_dim = embed_dims[0]
        for i, depth in enumerate(config.depths):
            stages[f"stage{i + 1}"] = PyramidVisionTransformerStage(
                dim=previous_dim,
                dim_out=embed_dims[i],
                depth=depth,
                num_heads=config.num_heads[i],
                sr_ratio=config.sr_ratios[i],
                linear=config.linear,
                mlp_ratio=config.mlp_ratios[i],
                downsample=i > 0,
                drop_path=drop_path_rates[i],
                layer_norm_eps=layer_norm_eps,
            )
            previous_dim = embed_dims[i]
        self.body = nn.Sequential(stages)
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1))
        self.embedding_size = embed_dims[-1]
        self.return_channels = list(embed_dims)
        self.classifier: nn.Module = self._make_classifier()
        self._init_weights()

    def _make_classifier(self) -> nn.Module:
        return nn.Linear(self.embedding_size, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        """birder's init: Kaiming-normal (linear gain) convs, truncated-normal(0.02) linears, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
            elif isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
            else:
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head, e.g. for fine-tuning on a new label set."""
        self.num_classes = num_classes
        self.classifier = self._make_classifier()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.patch_embed(x))

    def embedding_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.features(features)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last stage: (N, embed_dims[-1]), 512 for b2."""
        return self.embedding_from_features(self.forward_features(x))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embedding(x))

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        out: dict[str, torch.Tensor] = {}
        for name, stage in self.body.named_children():
            x = stage(x)
            if name in self.return_stages:
                out[name] = x
        return out


def create_model(
    network: str,
    num_classes: int,
    *,
    size: tuple[int, int] = (384, 384),
    input_channels: int = 3,
    layer_norm_eps: float = BIRDER_LAYER_NORM_EPS,
    config_overrides: dict[str, Any] | None = None,
) -> PVTv2:
    """Build a registered size by name, optionally overriding config fields as a birder checkpoint's config does."""
    if network not in PVT_V2_CONFIGS:
        known = ", ".join(sorted(PVT_V2_CONFIGS))
        raise ValueError(f"unknown network {network!r}; known: {known}")
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"input size {size} must be a multiple of 32 on both sides")
    config = PVT_V2_CONFIGS[network].with_overrides(config_overrides)
    return PVTv2(
        config,
        num_classes,
        input_channels=input_channels,
        size=size,
        layer_norm_eps=layer_norm_eps,
        network=network,
    )
