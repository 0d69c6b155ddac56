"""Reading a bench folder in BMAD's layout into samples, tensors and loaders.

Layout (BMAD's released data and the variants seen in the wild)::

    <bench>/train/good/[img/]*.png
    <bench>/{valid,test}/{good,Ungood}/[img/]*.png
    <bench>/{valid,test}/{good,Ungood}/{anomaly_mask|label}/*.png   (same file stem as the image)

Masks are binarised (> 0); images without a mask get an all-zero mask.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bmad.errors import DataError
from bmad.images import image_size, read_image, read_mask

SPLITS = ("train", "valid", "test")
CLASSES = ("good", "Ungood")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MASK_DIRS = ("anomaly_mask", "label")
@dataclass(frozen=True)
class Sample:
    """One image of a split: its path, label (0 good, 1 Ungood) and mask path (or None)."""

    path: Path
    label: int
    mask: Path | None
    split: str


def _image_files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{p} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})",
                hint="move non-image files out of the bench folder",
            )
        out.append(p)
    return out


def list_split(root: Path, split: str, *, required: bool = True) -> list[Sample]:
    """Samples of ``split`` under bench folder ``root``, sorted by (label, path)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    samples: list[Sample] = []
    for label, cls in enumerate(CLASSES):
        cls_dir = root / split / cls
        if not cls_dir.is_dir():
            continue
        img_dir = cls_dir / "img" if (cls_dir / "img").is_dir() else cls_dir
        masks = _mask_index(cls_dir)
        for p in _image_files(img_dir):
            mask = masks.pop(p.stem, None)
            samples.append(Sample(p, label, mask, split))
        if masks:
            orphan = sorted(masks.values())[0]
            raise DataError(
                f"mask {orphan} has no image with the same name in {img_dir}",
                hint="each mask must share its image's file stem; remove or rename the mask",
            )
    if required and not samples:
        raise DataError(
            f"split {split!r} of bench {root} is empty: no images under {root / split}/{{good,Ungood}}/",
            hint="prepare the bench with `bmad prepare` or check --data-root",
        )
    if split == "train" and any(s.label for s in samples):
        raise DataError(
            f"{root / 'train' / 'Ungood'} exists: the training split must hold normal images only",
            hint="move anomalous images to valid/ or test/",
        )
    return samples


def _mask_index(cls_dir: Path) -> dict[str, Path]:
    for name in MASK_DIRS:
        d = cls_dir / name
        if d.is_dir():
            return {p.stem: p for p in _image_files(d)}
    return {}


def check_masks(samples: Sequence[Sample]) -> None:
    """Raise DataError for a mask whose size differs from its image's (header reads only)."""
    for s in samples:
        if s.mask is None:
            continue
        isize, msize = image_size(s.path), image_size(s.mask)
        if isize != msize:
            raise DataError(
                f"mask {s.mask} is {msize[1]}x{msize[0]} but its image {s.path} is {isize[1]}x{isize[0]} (WxH)",
                hint="masks must have their image's size; re-run the reorganizer or fix the mask",
            )


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """Replicate grayscale to ``channels``, or average RGB down to 1 channel."""
    c = img.shape[-3]
    if c == channels:
        return img
    if c == 1:
        return img.expand(*img.shape[:-3], channels, *img.shape[-2:]).contiguous()
    if channels == 1:
        return img.mean(dim=-3, keepdim=True)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of [B, C, H, W] to ``size``; no-op when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of anomaly maps [B, H, W] to ``size`` (float32)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


class ImageDataset(torch.utils.data.Dataset):
    """Samples as dicts: image [C, *input_size] in [0, 1], label, mask [*eval_size] (uint8), path.

    RGB images are averaged to gray before resizing when ``channels`` is 1; grayscale
    images stay one channel (resized once, not three times) and :meth:`collate`
    replicates them while filling the batch, so a batch is ``channels`` wide.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        input_size: tuple[int, int],
        eval_size: tuple[int, int],
        channels: int,
    ) -> None:
        self.samples = list(samples)
        self.input_size = tuple(input_size)
        self.eval_size = tuple(eval_size)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        img = torch.from_numpy(read_image(s.path))
        if img.shape[0] != 1:
            img = to_channels(img, self.channels)
        img = resize_images(img[None], self.input_size)[0]
        if s.mask is not None:
            m = torch.from_numpy(read_mask(s.mask).astype(np.uint8))
            if tuple(m.shape) != self.eval_size:
                m = F.interpolate(m[None, None].float(), size=self.eval_size, mode="nearest")[0, 0].to(torch.uint8)
        else:
            m = torch.zeros(self.eval_size, dtype=torch.uint8)
        return {"image": img, "label": s.label, "mask": m, "path": str(s.path)}

    def collate(self, items: list[dict]) -> dict:
        """A batch: images copied into one [B, channels, H, W] tensor (gray replicated there)."""
        batch = torch.utils.data.default_collate([{k: v for k, v in it.items() if k != "image"} for it in items])
        images = torch.empty((len(items), self.channels, *self.input_size), dtype=torch.float32)
        for i, it in enumerate(items):
            images[i].copy_(it["image"])
        batch["image"] = images
        return batch


def make_loader(
    samples: Sequence[Sample],
    input_size: tuple[int, int],
    eval_size: tuple[int, int],
    channels: int,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``samples``; shuffling (if any) is seeded."""
    gen = torch.Generator().manual_seed(seed)
    dataset = ImageDataset(samples, input_size, eval_size, channels)
    return torch.utils.data.DataLoader(
        dataset,
        collate_fn=dataset.collate,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def few_shot(samples: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """``shots`` training samples drawn without replacement, seeded, in sorted order."""
    if shots <= 0:
        raise ValueError("shots must be positive")
    if shots > len(samples):
        raise DataError(
            f"--shots {shots} asks for more images than the training split has ({len(samples)})",
            hint=f"use --shots {len(samples)} or fewer",
        )
    idx = sorted(random.Random(seed).sample(range(len(samples)), shots))
    return [samples[i] for i in idx]
