"""Maximum Manifold Capacity Representations (Yerxa et al., arXiv 2303.03307) in birder's momentum form.

Each image is seen in ``n_aug`` augmented views by an online encoder and by a momentum (EMA) copy of it. The
per-image centroid is the mean of the L2-normalised view projections of both encoders; the loss rewards a
centroid matrix of high nuclear norm (many directions, each image spread out), optionally penalising the
nuclear norm of each image's own view matrix (``lambda_coeff``; 0 by default as in birder).

The module tree (``backbone``, ``encoder.backbone``, ``encoder.projector``, ``momentum_encoder.*``) matches
birder's ``MMCR`` so the full training checkpoint's state keys are the ones birder writes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pvt_deploy.model.pvt_v2 import PVTv2
from pvt_deploy.train.distributed import all_gather_with_grad, is_distributed

DEFAULT_PROJECTOR_DIMS = (8192, 8192, 512)
DEFAULT_MOMENTUM_TAU = 0.99
DEFAULT_N_AUG = 2


def nuclear_norm(matrix: torch.Tensor) -> torch.Tensor:
    """Sum of singular values (of each matrix in a batch, summed)."""
    return torch.linalg.svdvals(matrix).sum()


def mmcr_momentum_loss(
    z: torch.Tensor,
    z_momentum: torch.Tensor,
    n_aug: int,
    lambda_coeff: float = 0.0,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """MMCR loss for projections laid out image-major: rows ``[img0 view0, img0 view1, ..., img1 view0, ...]``.

    Under a process group the per-image view matrices are all-gathered (gradient-aware) first, so every rank
    computes the same global loss. Rows whose centroid is not finite (a NaN/inf projection) are dropped.
    """
    if z.shape != z_momentum.shape or z.ndim != 2 or z.shape[0] % n_aug:
        raise ValueError(
            f"expected two (images*{n_aug}, dim) matrices, got {tuple(z.shape)}, {tuple(z_momentum.shape)}"
        )
    # SVD has no half-precision kernels: under bf16 autocast compute the loss in float32 (float64 stays float64)
    if z.dtype in (torch.float16, torch.bfloat16):
        z, z_momentum = z.float(), z_momentum.float()
    z = F.normalize(z, dim=-1)
    z_momentum = F.normalize(z_momentum.to(z.dtype), dim=-1)
    # (images, dim, views): one column per view
    views = z.reshape(-1, n_aug, z.shape[-1]).permute(0, 2, 1)
    views_momentum = z_momentum.reshape(-1, n_aug, z.shape[-1]).permute(0, 2, 1)
    if gather and is_distributed():
        views = all_gather_with_grad(views.contiguous())
        views_momentum = all_gather_with_grad(views_momentum.contiguous())

    centroids = 0.5 * (views.mean(dim=-1) + views_momentum.mean(dim=-1))
    centroids = centroids[centroids.isfinite().all(dim=1)]
    loss = -nuclear_norm(centroids)
    if lambda_coeff != 0.0:
        loss = loss + lambda_coeff * nuclear_norm(views) / views.shape[0]
    return loss


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the whole global batch under a process group.

    torch's SyncBatchNorm refuses CPU tensors, and per-rank statistics would make an N-process run differ from
    a single-process run with the same global batch. Gathering the (small) projector activations keeps the two
    equal and keeps birder's state keys (``weight``, ``bias``, ``running_mean``, ...).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        rows = x.shape[0]
        rank = torch.distributed.get_rank()
        full = super().forward(all_gather_with_grad(x))
        return full[rank * rows : (rank + 1) * rows]


def build_projector(in_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """[Linear(no bias), BatchNorm1d, ReLU] per hidden layer, then a bias-free Linear (birder's layout)."""
    if len(dims) < 1:
        raise ValueError("projector needs at least one output dim")
    sizes = [in_dim, *dims]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), GlobalBatchNorm1d(sizes[i + 1]), nn.ReLU(True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class MMCREncoder(nn.Module):
    """Backbone embedding (global-average-pooled last stage, as birder takes it) followed by the projector."""

    def __init__(self, backbone: PVTv2, projector_dims: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = build_projector(backbone.embedding_size, projector_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x)
        embedding = torch.flatten(self.backbone.embedding_from_features(features), 1)
        return self.projector(embedding)


class MMCR(nn.Module):
    """Online encoder + EMA momentum encoder. ``forward`` takes (images, n_aug, C, H, W) and returns the
    online projections (with grad) and the momentum projections (without), both image-major."""

    def __init__(self, backbone: PVTv2, projector_dims: Sequence[int] = DEFAULT_PROJECTOR_DIMS) -> None:
        super().__init__()
        self.projector_dims = list(projector_dims)
        self.backbone = backbone
        self.encoder = MMCREncoder(backbone, projector_dims)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        for parameter in self.momentum_encoder.parameters():
            parameter.requires_grad_(False)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = views.reshape(-1, *views.shape[-3:])
        z = self.encoder(flat)
        with torch.no_grad():
            z_momentum = self.momentum_encoder(flat)
        return z, z_momentum

    @torch.no_grad()
    def update_momentum(self, tau: float) -> None:
        """EMA of the parameters (not buffers: the momentum projector keeps its own BatchNorm statistics)."""
        momentum = list(self.momentum_encoder.parameters())
        online = list(self.encoder.parameters())
        torch._foreach_lerp_(momentum, online, weight=1.0 - tau)
