"""CutPaste's augmentations (Li et al., CVPR 2021) on [0, 1] image tensors, seeded by a numpy Generator.

- :func:`color_jitter`: torchvision's ColorJitter (brightness, contrast, saturation, hue, in a
  random order) with factors drawn from ``rng``.
- :func:`cutpaste_normal`: cut a rectangle (area 2-15 % of the image, aspect ratio in
  [0.3, 1/0.3], log-uniform), jitter it, paste it at another uniform position of the same image.
- :func:`cutpaste_scar`: cut a thin rectangle (2-16 x 10-25 px), jitter it, rotate it by
  U(-45, 45) degrees (nearest, expanded canvas), paste its rotated footprint.
- :func:`make_views`: one jitter of each image, then the variant's views and class labels
  ("3way": original 0, cutpaste 1, scar 2; "normal"/"scar": original 0, augmented 1;
  "union": original 0, cutpaste or scar (p = 1/2) 1).

Each augmentation returns the image and the boolean mask of the pixels it may have changed:
outside the mask the output equals the input exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

VARIANTS = ("3way", "normal", "scar", "union")
JITTER = 0.1


def color_jitter(img: torch.Tensor, rng: np.random.Generator, strength: float = JITTER) -> torch.Tensor:
    """ColorJitter(brightness=s, contrast=s, saturation=s, hue=s) on ``img`` [C, H, W] in [0, 1]:
    factors U(1-s, 1+s) (hue shift U(-s, s)), the four applied in a random order."""
    factors = rng.uniform(1 - strength, 1 + strength, 3)
    hue = rng.uniform(-strength, strength)
    out = img
    for op in rng.permutation(4):
        if op == 0:
            out = TF.adjust_brightness(out, float(factors[0]))
        elif op == 1:
            out = TF.adjust_contrast(out, float(factors[1]))
        elif op == 2 and out.shape[0] == 3:
            out = TF.adjust_saturation(out, float(factors[2]))
        elif op == 3 and out.shape[0] == 3:
            out = TF.adjust_hue(out, float(hue))
    return out


def cutpaste_normal(
    img: torch.Tensor,
    rng: np.random.Generator,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
    jitter: float = JITTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste (rectangle): returns the augmented copy of ``img`` [C, H, W] and the pasted box's mask [H, W]."""
    _, h, w = img.shape
    area = rng.uniform(*area_ratio) * h * w
    aspect = math.exp(rng.uniform(math.log(aspect_ratio), math.log(1 / aspect_ratio)))
    cw = min(w, max(1, int(round(math.sqrt(area * aspect)))))
    ch = min(h, max(1, int(round(math.sqrt(area / aspect)))))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    patch = color_jitter(img[:, y0 : y0 + ch, x0 : x0 + cw], rng, jitter)
    y1, x1 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = img.clone()
    out[:, y1 : y1 + ch, x1 : x1 + cw] = patch
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y1 : y1 + ch, x1 : x1 + cw] = True
    return out, mask


def cutpaste_scar(
    img: torch.Tensor,
    rng: np.random.Generator,
    width: tuple[int, int] = (2, 16),
    height: tuple[int, int] = (10, 25),
    rotation: tuple[float, float] = (-45.0, 45.0),
    jitter: float = JITTER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-scar: returns the augmented copy of ``img`` [C, H, W] and the rotated scar's mask [H, W]."""
    c, h, w = img.shape
    cw = min(w, int(rng.integers(width[0], width[1] + 1)))
    ch = min(h, int(rng.integers(height[0], height[1] + 1)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    patch = color_jitter(img[:, y0 : y0 + ch, x0 : x0 + cw], rng, jitter)
    with_alpha = torch.cat([patch, torch.ones(1, ch, cw, dtype=patch.dtype)])
    rotated = TF.rotate(with_alpha, float(rng.uniform(*rotation)), InterpolationMode.NEAREST, expand=True, fill=0.0)
    rh, rw = min(h, rotated.shape[1]), min(w, rotated.shape[2])
    rotated = rotated[:, :rh, :rw]
    alpha = rotated[c] > 0.5
    y1, x1 = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    out = img.clone()
    region = out[:, y1 : y1 + rh, x1 : x1 + rw]
    out[:, y1 : y1 + rh, x1 : x1 + rw] = torch.where(alpha, rotated[:c], region)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y1 : y1 + rh, x1 : x1 + rw] = alpha
    return out, mask


def make_views(
    images: torch.Tensor, variant: str, rng: np.random.Generator, jitter: float = JITTER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training views of a batch [B, C, H, W] in [0, 1] -> (views [K B, C, H, W], labels [K B]).

    Each image is colour-jittered once; the views are stacked view-major (all originals, then
    all first augmentations, ...), labelled 0..K-1 as Runinho's (and BMAD's) training does.
    """
    if variant not in VARIANTS:
        raise ValueError(f"CutPaste variant must be one of {VARIANTS}, got {variant!r}")
    cpu = images.detach().to("cpu", torch.float32)
    originals, first, second = [], [], []
    for img in cpu:
        base = color_jitter(img, rng, jitter)
        originals.append(base)
        if variant == "3way":
            first.append(cutpaste_normal(base, rng, jitter=jitter)[0])
            second.append(cutpaste_scar(base, rng, jitter=jitter)[0])
        elif variant == "normal" or (variant == "union" and rng.random() < 0.5):
            first.append(cutpaste_normal(base, rng, jitter=jitter)[0])
        else:
            first.append(cutpaste_scar(base, rng, jitter=jitter)[0])
    groups = [originals, first] + ([second] if second else [])
    views = torch.stack([v for group in groups for v in group]).to(images.device)
    labels = torch.arange(len(groups)).repeat_interleave(len(cpu)).to(images.device)
    return views, labels
