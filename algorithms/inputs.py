"""Input conventions shared by the built-in algorithms: sizes and ImageNet normalisation."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_hw(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``224`` -> ``(224, 224)``; ``(H, W)`` (or a JSON list) -> ``(H, W)``; None stays None."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def three_channels(images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """[0, 1] images -> float32 on ``device``, grayscale expanded to 3 channels (a view)."""
    x = images.to(device, torch.float32)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def imagenet_normalize(images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """[0, 1] images -> 3 channels on ``device``, normalised with ImageNet's mean and std."""
    x = three_channels(images, device)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
