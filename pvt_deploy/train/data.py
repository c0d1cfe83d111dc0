"""Image-folder datasets, a resumable seeded batch sampler and the parallel DataLoader around them.

Data order and augmentation randomness come from one per-epoch generator seeded by (seed, epoch): the sampler
draws a permutation and one augmentation seed per sample, and hands ``(index, seed)`` pairs to the workers.
Hence a resumed run replays exactly the batches an uninterrupted one would have seen, regardless of worker
count, and an N-rank run sees the same global batches as a single process (each rank takes a contiguous
slice of every global batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from pvt_deploy.errors import DatasetError, ImageError
from pvt_deploy.preprocess import IMAGE_EXTENSIONS
from pvt_deploy.train.augment import RGBStats, ViewAugment, normalize


def list_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively, hidden entries skipped), in a stable sorted order."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in p.parts)
    )


def discover_classes(root: Path) -> dict[str, int]:
    """Sorted sub-folder names that hold at least one image -> class index (torchvision's ImageFolder rule)."""
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and list_images(d))
    return {name: i for i, name in enumerate(names)}


def load_rgb(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; grey, palette and RGBA files become RGB (alpha dropped)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageError(f"cannot decode image {path}: {exc}") from None
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div_(255.0)


@dataclass(frozen=True)
class ImageFolder:
    """Image paths with labels (``-1`` when unlabelled)."""

    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    class_to_idx: dict[str, int]

    @classmethod
    def unlabelled(cls, root: str | Path) -> ImageFolder:
        root = _existing_dir(root)
        paths = tuple(list_images(root))
        if not paths:
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
        return cls(root, paths, (-1,) * len(paths), {})

    @classmethod
    def labelled(cls, root: str | Path) -> ImageFolder:
        root = _existing_dir(root)
        class_to_idx = discover_classes(root)
        if len(class_to_idx) < 2:
            raise DatasetError(f"{root} needs at least two class sub-folders with images, found {len(class_to_idx)}")
        stray = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if stray:
            raise DatasetError(f"{root} has images outside class folders (e.g. {stray[0].name}); move them into one")
        paths, labels = [], []
        for name, index in class_to_idx.items():
            for path in list_images(root / name):
                paths.append(path)
                labels.append(index)
        return cls(root, tuple(paths), tuple(labels), class_to_idx)

    def __len__(self) -> int:
        return len(self.paths)


def _existing_dir(root: str | Path) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"data folder {path} does not exist or is not a directory")
    return path


class ViewsDataset(Dataset):
    """Returns ``n_aug`` augmented, normalised views ``(n_aug, 3, H, W)`` and the label for an ``(index, seed)``."""

    def __init__(self, folder: ImageFolder, augment: ViewAugment, rgb_stats: RGBStats, n_aug: int) -> None:
        self.folder = folder
        self.augment = augment
        self.rgb_stats = rgb_stats
        self.n_aug = n_aug

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        image = load_rgb(self.folder.paths[index])
        generator = torch.Generator().manual_seed(int(seed))
        views = [normalize(self.augment.view(image, generator), self.rgb_stats) for _ in range(self.n_aug)]
        return torch.stack(views), self.folder.labels[index]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of each global batch of one epoch, starting at ``start_batch`` (for resume).

    Incomplete final batches are dropped so every step sees exactly ``global_batch`` images."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(0, self.num_samples // self.global_batch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        aug_seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g)
        local = self.global_batch // self.world_size
        for batch in range(self.start_batch, self.num_samples // self.global_batch):
            start = batch * self.global_batch + self.rank * local
            chosen = order[start : start + local].tolist()
            yield [(i, int(aug_seeds[i])) for i in chosen]


def _worker_init(_: int) -> None:
    # Workers only decode and augment one image at a time; more intra-op threads would oversubscribe cores.
    torch.set_num_threads(1)


def make_loader(dataset: ViewsDataset, sampler: SeededBatchSampler, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers > 0 else None,
    )
