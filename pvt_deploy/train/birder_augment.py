"""birder 0.8.4's training augmentation ("birder" aug type), written on torch tensors for ``--recipe birder``.

birder's ``training_preset`` at level L (1..10) does: random resized crop with a random choice of bilinear or
bicubic resampling; ``BirderAugment``: between 2 and max(2, (L+1)//2) ops, each drawn (with replacement) from a
level-dependent list; optional random erasing; horizontal flip (p 0.5). Level 0 only resizes the whole image
(bicubic), with no crop and no flip. birder runs these on uint8 images through torchvision; here they run on
float images kept on the 8-bit grid, with the same parameter ranges, so torchvision stays out of our
dependencies. ``birder_ops`` is the op list; tests/golden/birder_recipe.json holds the list birder itself builds
at every level (``dev/check_birder_recipe.py``), and CI checks that the two agree.

Every draw comes from the per-sample ``torch.Generator``; the crop box and flip coin are drawn first and exactly
as our recipe draws them, so a sample seed gives the same crop and flip under both recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pvt_deploy.train.augment import (
    CropConfig,
    _chance,
    _uniform,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    draw_crop_and_flip,
    gaussian_blur,
    grayscale,
    resize,
    solarize,
)

BIRDER_INTERPOLATIONS = ("bilinear", "bicubic")
"""``RandomResizedCropWithRandomInterpolation``'s choices, in birder's order."""
ERASE_RATIO = (0.3, 3.3)
"""torchvision's ``RandomErasing`` default aspect-ratio range."""


def birder_min_ops(level: int) -> int:
    return 2


def birder_max_ops(level: int) -> int:
    return max(2, (level + 1) // 2)


def birder_default_min_scale(level: int) -> float:
    """``training_preset``'s crop scale when the script leaves ``--resize-min-scale`` unset."""
    return 0.8 - level * 0.05


def birder_default_erase_prob(level: int) -> float:
    """``BirderAugment``'s random-erasing probability when the script leaves ``--re-prob`` unset."""
    return max(0.25, -0.15 + level * 0.05)


def birder_erase_scale(level: int) -> tuple[float, float]:
    return (0.02, 0.05 + level * 0.025)


def birder_ops(level: int, use_grayscale: bool = False) -> list[dict[str, Any]]:
    """The ops ``BirderAugment(level)`` chooses from, in its order, each described by its parameters."""
    ops: list[dict[str, Any]] = [{"op": "identity"}]
    if level >= 1:
        hue = max(0.0, -0.025 + level * 0.0125)
        ops += [
            {"op": "rotate", "degrees": [-2.25 * level, 2.25 * level]},
            {"op": "color_jitter", "brightness": [1 - (0.2 + 0.0125 * level), 1 + (0.2 + 0.0125 * level)]},
            {
                "op": "color_jitter",
                "contrast": [1 - (0.05 + 0.025 * level), 1 + (0.05 + 0.025 * level)],
                **({"hue": [-hue, hue]} if hue > 0 else {}),
            },
        ]
    if level >= 3:
        blur_kernel = ((level + 1) // 4) * 2 + 1
        ops += [
            {"op": "saturation", "factor": 1.0, "variation": level * 0.07},
            {"op": "translate", "translate": [0.02 * level, 0.02 * level]},
            {"op": "shear", "shear": [-2.5 * level, 2.5 * level, 0.0, 0.0]},
            {"op": "posterize", "bits": 9 - (level + 1) // 2},
            {"op": "gaussian_blur", "kernel_size": [blur_kernel, blur_kernel], "sigma": [0.5, 1.2]},
            {"op": "autocontrast"},
            {"op": "sharpness", "factor": 1 + level * 0.04, "variation": 0.2},
        ]
    if level >= 5:
        ops.append({"op": "solarize", "threshold": 255 - 12 * level, "variation": 0.3})
    if use_grayscale:
        ops.append({"op": "grayscale"})
    return ops


@dataclass(frozen=True)
class BirderAugmentConfig(CropConfig):
    """birder's pipeline at ``level`` (default 4); ``erase_prob`` 0 turns random erasing off (its MMCR script)."""

    level: int = 4
    erase_prob: float = 0.0

    def view(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return birder_view(image, self, g)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Back onto the 8-bit grid birder's uint8 images live on."""
    return (image.clamp(0.0, 1.0) * 255.0).round_().div_(255.0)


def birder_view(
    image: torch.Tensor, config: BirderAugmentConfig, g: torch.Generator, applied: list[str] | None = None
) -> torch.Tensor:
    """One view of a (3, H, W) float image in [0, 1], still unnormalised; ``applied`` collects the op names."""
    if config.level == 0:
        return quantize(resize(image, config.size, "bicubic"))
    (top, left, h, w), flipped = draw_crop_and_flip(image.shape[-2], image.shape[-1], config, g)
    mode = BIRDER_INTERPOLATIONS[int(torch.randint(0, len(BIRDER_INTERPOLATIONS), (), generator=g))]
    view = quantize(resize(image[:, top : top + h, left : left + w], config.size, mode))
    ops = birder_ops(config.level)
    count = int(torch.randint(birder_min_ops(config.level), birder_max_ops(config.level) + 1, (), generator=g))
    for _ in range(count):
        op = ops[int(torch.randint(0, len(ops), (), generator=g))]
        view = quantize(apply_op(op, view, g))
        if applied is not None:
            applied.append(op["op"])
    if config.erase_prob > 0 and _chance(g, config.erase_prob):
        view = random_erase(view, birder_erase_scale(config.level), g)
        if applied is not None:
            applied.append("random_erasing")
    if flipped:
        view = view.flip(-1)
    return view


def apply_op(op: dict[str, Any], image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Draw ``op``'s parameters as torchvision does for that transform, then apply it."""
    name = op["op"]
    if name == "identity":
        return image
    if name == "rotate":
        return affine_nearest(image, angle=_uniform(g, *op["degrees"]))
    if name == "translate":
        height, width = image.shape[-2:]
        angle = _uniform(g, 0.0, 0.0)  # RandomAffine(degrees=0) still draws its angle
        max_dx, max_dy = op["translate"][0] * width, op["translate"][1] * height
        shift = (round(_uniform(g, -max_dx, max_dx)), round(_uniform(g, -max_dy, max_dy)))
        return affine_nearest(image, angle=angle, translate=shift)
    if name == "shear":
        angle = _uniform(g, 0.0, 0.0)
        low_x, high_x, low_y, high_y = op["shear"]
        shear = (_uniform(g, low_x, high_x), _uniform(g, low_y, high_y))
        return affine_nearest(image, angle=angle, shear=shear)
    if name == "color_jitter":
        return _color_jitter(image, op, g)
    if name == "saturation":
        factor = min(2.0, max(0.1, op["factor"] + _uniform(g, -op["variation"], op["variation"])))
        return adjust_saturation(image, factor)
    if name == "posterize":
        return posterize(image, op["bits"])
    if name == "gaussian_blur":
        return gaussian_blur(image, _uniform(g, *op["sigma"]), radius=op["kernel_size"][0] // 2)
    if name == "autocontrast":
        return autocontrast(image)
    if name == "sharpness":
        factor = min(2.0, max(1.0, op["factor"] + _uniform(g, -op["variation"], op["variation"])))
        return adjust_sharpness(image, factor)
    if name == "solarize":
        spread = int(op["threshold"] * op["variation"])
        noise = int(torch.randint(-spread, spread + 1, (), generator=g))
        return solarize(image, max(0, min(255, op["threshold"] + noise)) / 255.0)
    if name == "grayscale":
        return grayscale(image).contiguous()
    raise ValueError(f"unknown birder op {name!r}")


def _color_jitter(image: torch.Tensor, op: dict[str, Any], g: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter: the given adjustments in a random order, each factor uniform in its range."""
    order = torch.randperm(4, generator=g).tolist()
    factors = {key: _uniform(g, *op[key]) for key in ("brightness", "contrast", "saturation", "hue") if key in op}
    for index in order:
        if index == 0 and "brightness" in factors:
            image = adjust_brightness(image, factors["brightness"])
        elif index == 1 and "contrast" in factors:
            image = adjust_contrast(image, factors["contrast"])
        elif index == 2 and "saturation" in factors:
            image = adjust_saturation(image, factors["saturation"])
        elif index == 3 and "hue" in factors:
            image = adjust_hue_hsv(image, factors["hue"])
    return image


def affine_nearest(
    image: torch.Tensor,
    *,
    angle: float = 0.0,
    translate: tuple[int, int] = (0, 0),
    shear: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """torchvision's tensor ``affine`` about the image centre: nearest-neighbour sampling, zero fill."""
    height, width = image.shape[-2:]
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    tx, ty = float(translate[0]), float(translate[1])
    inverse = [d, -b, d * -tx + -b * -ty, -c, a, -c * -tx + a * -ty]
    theta = torch.tensor(inverse, dtype=image.dtype).view(1, 2, 3)
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width, dtype=image.dtype)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height, dtype=image.dtype)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width), torch.ones(height, width)], dim=-1)
    grid = (base.view(1, -1, 3) @ theta.transpose(1, 2)) / torch.tensor([0.5 * width, 0.5 * height])
    out = F.grid_sample(
        image[None], grid.view(1, height, width, 2), mode="nearest", padding_mode="zeros", align_corners=False
    )
    return out[0]


def adjust_hue_hsv(image: torch.Tensor, shift: float) -> torch.Tensor:
    """torchvision's ``adjust_hue``: rotate the hue in HSV space by ``shift`` turns."""
    r, g, b = image[0], image[1], image[2]
    maxc, minc = image.max(0).values, image.min(0).values
    equal = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(equal, ones, maxc)
    divisor = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    hue = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    hue = torch.remainder(hue + shift, 1.0)
    value = maxc
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    mask = (sector[None] == torch.arange(6)[:, None, None]).to(image.dtype)
    red = torch.stack([value, q, p, p, t, value])
    green = torch.stack([t, value, value, q, p, p])
    blue = torch.stack([p, p, t, value, value, q])
    return torch.stack([(mask * channel).sum(0) for channel in (red, green, blue)])


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top ``bits`` bits of each 8-bit value."""
    levels = (image * 255.0).round().to(torch.int64)
    return (levels & (-(1 << (8 - bits)) & 0xFF)).to(image.dtype) / 255.0


def autocontrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to the full range (a flat channel is left as it is)."""
    low = image.amin(dim=(-2, -1), keepdim=True)
    high = image.amax(dim=(-2, -1), keepdim=True)
    flat = low == high
    low = torch.where(flat, torch.zeros_like(low), low)
    high = torch.where(flat, torch.ones_like(high), high)
    return ((image - low) / (high - low)).clamp(0.0, 1.0)


def adjust_sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with torchvision's smoothed image (3x3 kernel, centre weight 5, borders kept)."""
    if image.shape[-1] <= 2 or image.shape[-2] <= 2:
        return image
    kernel = torch.ones(3, 3, dtype=image.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(image.shape[0], 1, 3, 3)
    smooth = F.conv2d(image[None], kernel, groups=image.shape[0])[0]
    degenerate = image.clone()
    degenerate[:, 1:-1, 1:-1] = quantize(smooth)
    return (factor * image + (1.0 - factor) * degenerate).clamp(0.0, 1.0)


def random_erase(image: torch.Tensor, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """torchvision's ``RandomErasing`` (value 0): up to 10 tries at a box of the drawn area and aspect."""
    height, width = image.shape[-2:]
    area = height * width
    log_low, log_high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for _ in range(10):
        erase_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_low, log_high))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        top = int(torch.randint(0, height - h + 1, (), generator=g))
        left = int(torch.randint(0, width - w + 1, (), generator=g))
        erased = image.clone()
        erased[:, top : top + h, left : left + w] = 0.0
        return erased
    return image
