"""Floating-point operations of one PVT v2 forward pass, counted from the architecture (2 FLOPs per multiply-add).

Counts convolutions, linear layers and the two attention products; normalizations, softmax and GELU are left out
(they are a fraction of a percent and not multiply-adds).

The attention products (q @ k^T, attention @ v) have no weights, and common counters (fvcore, the figures in
papers) leave them out: pvt_v2_b2 at 384x384 is 22.8 GFLOP without them (the figure the speed targets use, our
default) and 25.3 GFLOP with them."""

from __future__ import annotations

from pvt_deploy.model.pvt_v2 import PVTv2Config

LINEAR_POOL_TOKENS = 7 * 7
"""Linear (``_li``) variants pool keys and values to a fixed 7x7 map."""


def _stage_macs(config: PVTv2Config, stage: int, height: int, width: int, attention: bool) -> int:
    dim = config.embed_dims[stage]
    tokens = height * width
    macs = 0
    for _ in range(config.depths[stage]):
        ratio = config.sr_ratios[stage]
        if config.linear:
            kv_tokens = LINEAR_POOL_TOKENS
            macs += kv_tokens * dim * dim  # 1x1 reduction conv on the pooled map
        elif ratio > 1:
            kv_tokens = (height // ratio) * (width // ratio)
            macs += kv_tokens * dim * dim * ratio * ratio  # the strided reduction conv
        else:
            kv_tokens = tokens
        macs += tokens * dim * dim  # q
        macs += kv_tokens * dim * 2 * dim  # kv
        if attention:
            macs += 2 * tokens * kv_tokens * dim  # q @ k^T and attention @ v, summed over heads
        macs += tokens * dim * dim  # proj
        hidden = int(dim * config.mlp_ratios[stage])
        macs += 2 * tokens * dim * hidden + tokens * hidden * 9  # fc1, fc2, depthwise 3x3
    return macs


def flops_per_image(
    config: PVTv2Config,
    size: tuple[int, int],
    num_classes: int,
    *,
    in_channels: int = 3,
    attention_products: bool = False,
) -> float:
    """FLOPs (2 x multiply-adds) for one image of ``size`` through the whole classifier."""
    height, width = size[0] // 4, size[1] // 4
    dims = config.embed_dims
    macs = height * width * dims[0] * in_channels * 7 * 7  # overlapping 7x7 stride-4 patch embedding
    previous = dims[0]
    for stage in range(len(config.depths)):
        if stage > 0:
            height, width = (height + 1) // 2, (width + 1) // 2
            macs += height * width * dims[stage] * previous * 3 * 3  # 3x3 stride-2 downsample
        macs += _stage_macs(config, stage, height, width, attention_products)
        previous = dims[stage]
    macs += dims[-1] * num_classes
    return 2.0 * macs
