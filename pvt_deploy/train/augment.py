"""Training augmentations written on torch tensors (torchvision is deliberately not a dependency).

Every random choice draws from an explicit ``torch.Generator`` seeded per sample by the sampler, so a view
depends only on (seed, epoch, image), never on which worker made it or whether the run was resumed.
One ``level`` knob (0-10) scales colour-jitter strength and the probabilities of the photometric ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from pvt_deploy.preprocess import BIRDER_RGB_STATS as _BIRDER_RGB_STATS
from pvt_deploy.preprocess import Preprocessor

RGBStats = dict[str, tuple[float, float, float]]
BIRDER_RGB_STATS: RGBStats = {key: (values[0], values[1], values[2]) for key, values in _BIRDER_RGB_STATS.items()}
"""birder's default ("birder" rgb mode) normalisation, the one its PVT v2 checkpoints carry (as tuples)."""

_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return p > 0.0 and float(torch.rand((), generator=g)) < p


class ViewAugment(Protocol):
    """A recipe's view pipeline: ``AugmentConfig`` (ours) or ``birder_augment.BirderAugmentConfig``."""

    size: tuple[int, int]

    def view(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One random view of a (3, H, W) float image in [0, 1], still unnormalised."""
        ...


@dataclass(frozen=True)
class CropConfig:
    """The random-resized-crop and flip settings both recipes share, and the one level knob (0..10)."""

    size: tuple[int, int]
    level: int = 8
    min_scale: float = 0.3
    max_scale: float = 1.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 10:
            raise ValueError(f"augmentation level must be within 0..10, got {self.level}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(
                f"crop scale range must satisfy 0 < min <= max <= 1, got {self.min_scale}..{self.max_scale}"
            )


@dataclass(frozen=True)
class AugmentConfig(CropConfig):
    """Our recipe. Strengths derived from ``level``: 0 gives crop + flip only, 10 the SimCLR/MMCR-strength one."""

    def view(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return augment_view(image, self, g)

    @property
    def jitter_prob(self) -> float:
        return 0.08 * self.level

    @property
    def jitter_strength(self) -> float:
        return 0.04 * self.level

    @property
    def hue_strength(self) -> float:
        return 0.01 * self.level

    @property
    def grayscale_prob(self) -> float:
        return 0.02 * self.level

    @property
    def blur_prob(self) -> float:
        return 0.05 * self.level

    @property
    def solarize_prob(self) -> float:
        return 0.02 * self.level


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering a random area fraction and aspect ratio; falls back to a centre crop."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_crop_and_flip(
    height: int, width: int, config: CropConfig, g: torch.Generator
) -> tuple[tuple[int, int, int, int], bool]:
    """The geometric draws both recipes make first and in this order: the crop box, then the flip coin.

    Drawing them before anything else is what lets the same sample seed give the same crop and flip under
    either recipe (the photometric draws that follow differ)."""
    box = random_resized_crop_box(height, width, (config.min_scale, config.max_scale), config.ratio, g)
    flipped = config.flip and _chance(g, 0.5)
    return box, flipped


def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Antialiased ``mode`` (bilinear or bicubic) resize of a (C, H, W) float image."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode=mode, antialias=True, align_corners=False)[0]


def grayscale(image: torch.Tensor) -> torch.Tensor:
    gray = (image * _LUMA.to(image.dtype)[:, None, None]).sum(0, keepdim=True)
    return gray.expand_as(image)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    return (image * factor).clamp_(0.0, 1.0)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    mean = grayscale(image)[0].mean()
    return (mean + factor * (image - mean)).clamp_(0.0, 1.0)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    gray = grayscale(image)
    return (gray + factor * (image - gray)).clamp_(0.0, 1.0)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate chroma in YIQ space by ``shift`` turns (|shift| <= 0.5)."""
    angle = 2.0 * math.pi * shift
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    transform = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
    return torch.einsum("ij,jhw->ihw", transform.to(image.dtype), image).clamp_(0.0, 1.0)


def gaussian_blur(image: torch.Tensor, sigma: float, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; kernel radius 3 sigma (at least 1) unless given (birder's
    recipe gives torchvision's fixed odd kernel size // 2)."""
    if radius is None:
        radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, min(image.shape[-2:]) - 1)
    if radius < 1:
        return image
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return x[0]


def solarize(image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(image >= threshold, 1.0 - image, image)


def normalize(image: torch.Tensor, rgb_stats: RGBStats) -> torch.Tensor:
    mean = torch.tensor(rgb_stats["mean"], dtype=image.dtype)[:, None, None]
    std = torch.tensor(rgb_stats["std"], dtype=image.dtype)[:, None, None]
    return (image - mean) / std


def color_jitter(image: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in a random order, as torchvision's ColorJitter does."""
    strength = config.jitter_strength
    order = torch.randperm(4, generator=g).tolist()
    for op in order:
        if op == 0:
            image = adjust_brightness(image, _uniform(g, 1.0 - strength, 1.0 + strength))
        elif op == 1:
            image = adjust_contrast(image, _uniform(g, 1.0 - strength, 1.0 + strength))
        elif op == 2:
            image = adjust_saturation(image, _uniform(g, 1.0 - strength, 1.0 + strength))
        elif config.hue_strength > 0:
            image = adjust_hue(image, _uniform(g, -config.hue_strength, config.hue_strength))
    return image


def augment_view(image: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """One random view of a (3, H, W) float image in [0, 1], still unnormalised."""
    (top, left, h, w), flipped = draw_crop_and_flip(image.shape[-2], image.shape[-1], config, g)
    view = resize(image[:, top : top + h, left : left + w], config.size).clamp(0.0, 1.0)
    if flipped:
        view = view.flip(-1)
    if _chance(g, config.jitter_prob):
        view = color_jitter(view, config, g)
    if _chance(g, config.grayscale_prob):
        view = grayscale(view).contiguous()
    if _chance(g, config.blur_prob):
        view = gaussian_blur(view, _uniform(g, 0.1, 2.0) * min(config.size) / 224.0 + 0.1)
    if _chance(g, config.solarize_prob):
        view = solarize(view)
    return view


def eval_batch(paths: Sequence[str | Path], size: tuple[int, int], rgb_stats: RGBStats) -> torch.Tensor:
    """Evaluation inputs (N, 3, H, W): the runtime's own preprocessing (``pvt_deploy.preprocess.Preprocessor``),
    so a model is evaluated on exactly the tensors it will be served."""
    pipeline = Preprocessor(size, {key: list(values) for key, values in rgb_stats.items()})
    return torch.from_numpy(pipeline.batch(list(paths)))
