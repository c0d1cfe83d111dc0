"""The MMCR objective against analytic cases and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from pvt_deploy.train.mmcr import MMCR, GlobalBatchNorm1d, build_projector, mmcr_momentum_loss, nuclear_norm


def _image_major(centroid_rows: torch.Tensor, n_aug: int) -> torch.Tensor:
    """Every view of image i equal to row i: the centroid matrix is then exactly ``centroid_rows``."""
    return centroid_rows.repeat_interleave(n_aug, dim=0)


def test_orthonormal_centroids_have_nuclear_norm_equal_to_their_count() -> None:
    count, dim, n_aug = 6, 10, 3
    rows = torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(0)))[0].T  # orthonormal
    z = _image_major(rows * 3.0, n_aug)  # scale is removed by the L2 normalisation
    loss = mmcr_momentum_loss(z, z.clone(), n_aug)
    assert loss.item() == pytest.approx(-count, abs=1e-5)


def test_collapsed_centroids_are_rank_one() -> None:
    """All images mapped to one unit direction: a single singular value, sqrt(N). Normalised by the Frobenius
    norm (sqrt(N) for N unit rows) the nuclear norm is exactly 1, its minimum for non-zero rows."""
    count, dim, n_aug = 8, 5, 2
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    z = _image_major(direction.expand(count, dim), n_aug)
    loss = mmcr_momentum_loss(z, z.clone(), n_aug)
    assert -loss.item() == pytest.approx(math.sqrt(count), rel=1e-5)
    assert -loss.item() / math.sqrt(count) == pytest.approx(1.0, rel=1e-5)


def test_loss_mixes_online_and_momentum_centroids_and_drops_non_finite_rows() -> None:
    n_aug = 2
    eye = torch.eye(4)
    z = _image_major(eye, n_aug)
    z_momentum = z.clone()
    z_momentum[0] = float("nan")  # image 0's centroid becomes NaN -> dropped, 3 orthonormal rows remain
    assert mmcr_momentum_loss(z, z_momentum, n_aug).item() == pytest.approx(-3.0, abs=1e-6)
    # online says e_i, momentum says e_{i+1}: centroid rows (e_i + e_{i+1}) / 2, a known circulant spectrum
    z_shift = _image_major(eye.roll(1, dims=1), n_aug)
    expected = nuclear_norm(0.5 * (eye + eye.roll(1, dims=1)))
    assert mmcr_momentum_loss(z, z_shift, n_aug).item() == pytest.approx(-expected.item(), rel=1e-6)


def test_lambda_adds_mean_per_image_view_nuclear_norm() -> None:
    n_aug = 2
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(5 * n_aug, 7, generator=generator)
    z_m = torch.randn(5 * n_aug, 7, generator=generator)
    base = mmcr_momentum_loss(z, z_m, n_aug)
    views = torch.nn.functional.normalize(z, dim=-1).reshape(5, n_aug, 7).permute(0, 2, 1)
    local = torch.linalg.svdvals(views).sum(dim=1).mean()
    assert mmcr_momentum_loss(z, z_m, n_aug, lambda_coeff=0.5).item() == pytest.approx(
        base.item() + 0.5 * local.item(), rel=1e-5
    )


def test_gradient_matches_finite_differences_in_float64() -> None:
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(4 * 2, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    z_m = torch.randn(4 * 2, 5, dtype=torch.float64, generator=generator)

    def loss(online: torch.Tensor) -> torch.Tensor:
        return mmcr_momentum_loss(online, z_m, 2, lambda_coeff=0.3)

    assert loss(z).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-5)


def test_projector_layout_matches_birder() -> None:
    projector = build_projector(16, [32, 32, 8])
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear", "GlobalBatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in projector if isinstance(m, torch.nn.Linear))
    assert isinstance(projector[1], torch.nn.BatchNorm1d) and isinstance(projector[1], GlobalBatchNorm1d)


def test_mmcr_state_keys_follow_birder_and_momentum_is_an_ema() -> None:
    from pvt_deploy.model.pvt_v2 import create_model

    torch.manual_seed(0)
    net = MMCR(create_model("pvt_v2_tiny", 0, size=(32, 32)), [16, 8])
    keys = set(net.state_dict())
    assert {"backbone.patch_embed.proj.weight", "encoder.backbone.patch_embed.proj.weight"} <= keys
    assert {"encoder.projector.0.weight", "encoder.projector.1.running_mean", "encoder.projector.3.weight"} <= keys
    assert "momentum_encoder.projector.3.weight" in keys
    assert not any(p.requires_grad for p in net.momentum_encoder.parameters())
    before = net.momentum_encoder.projector[0].weight.clone()
    with torch.no_grad():
        net.encoder.projector[0].weight.add_(1.0)
    net.update_momentum(0.99)
    after = net.momentum_encoder.projector[0].weight
    assert torch.allclose(after, before + 0.01, atol=1e-6)
