"""Image folders, the seeded sampler and the hand-written augmentations (torchvision is not a dependency)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from pvt_deploy.errors import DatasetError, ImageError
from pvt_deploy.train.augment import BIRDER_RGB_STATS, AugmentConfig, augment_view, gaussian_blur, solarize
from pvt_deploy.train.data import ImageFolder, SeededBatchSampler, ViewsDataset, load_rgb

CLASSES = ("discs", "stripes")


def make_image_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """Two visually distinct classes of small synthetic images (random colours and positions)."""
    rng = random.Random(seed)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            colour = tuple(rng.randrange(256) for _ in range(3))
            if name == "stripes":
                for y in range(rng.randrange(4), size, 8):
                    draw.rectangle([0, y, size - 1, y + 3], fill=colour)
            else:
                x, y = rng.randrange(2, size // 2), rng.randrange(2, size // 2)
                draw.ellipse([x, y, x + size // 3, y + size // 3], fill=colour)
            image.save(folder / f"{i:03d}.png")
    return root


def test_labelled_folder_indexes_sorted_class_folders(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    (root / "empty").mkdir()
    folder = ImageFolder.labelled(root)
    assert folder.class_to_idx == {"discs": 0, "stripes": 1}
    assert len(folder) == 6 and folder.labels == (0, 0, 0, 1, 1, 1)
    assert len(ImageFolder.unlabelled(root)) == 6


def test_bad_folders_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder.unlabelled(tmp_path / "missing")
    (tmp_path / "blank").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        ImageFolder.unlabelled(tmp_path / "blank")
    one = tmp_path / "one"
    make_image_folder(one, per_class=1)
    (one / "stray.png").write_bytes((one / "discs" / "000.png").read_bytes())
    with pytest.raises(DatasetError, match="outside class folders"):
        ImageFolder.labelled(one)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        load_rgb(broken)


def test_sampler_ranks_partition_the_single_process_batches() -> None:
    single = list(SeededBatchSampler(20, 8, seed=3, epoch=1))
    ranks = [list(SeededBatchSampler(20, 8, seed=3, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 2  # 20 // 8, remainder dropped
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    assert list(SeededBatchSampler(20, 8, seed=3, epoch=1, start_batch=1)) == single[1:]
    assert list(SeededBatchSampler(20, 8, seed=3, epoch=2)) != single
    indices = [i for batch in single for i, _ in batch]
    assert len(set(indices)) == 16


def test_views_depend_only_on_the_sample_seed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=1)
    dataset = ViewsDataset(ImageFolder.unlabelled(root), AugmentConfig((32, 32), level=10), BIRDER_RGB_STATS, n_aug=3)
    views, label = dataset[(0, 1234)]
    again, _ = dataset[(0, 1234)]
    other, _ = dataset[(0, 4321)]
    assert views.shape == (3, 3, 32, 32) and label == -1
    assert torch.equal(views, again)
    assert not torch.equal(views, other)
    assert not torch.equal(views[0], views[1])  # two views of one image differ
    assert torch.isfinite(views).all()


def test_photometric_ops_behave() -> None:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    solarized = solarize(image)
    dark = image < 0.5
    assert torch.equal(solarized[dark], image[dark]) and torch.allclose(solarized[~dark], 1.0 - image[~dark])
    blurred = gaussian_blur(image, 1.5)
    assert blurred.shape == image.shape and blurred.std() < image.std()
    assert torch.allclose(blurred.mean(), image.mean(), atol=0.02)
    flat = torch.full((3, 16, 16), 0.25)
    config = AugmentConfig((16, 16), level=10, min_scale=1.0, ratio=(1.0, 1.0), flip=False)
    view = augment_view(flat, config, torch.Generator().manual_seed(0))
    assert view.shape == (3, 16, 16) and view.min() >= 0.0 and view.max() <= 1.0
