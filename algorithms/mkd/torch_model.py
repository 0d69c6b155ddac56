"""MKD's networks (Salehi et al., CVPR 2021): the VGG16 source ("teacher"), the small cloner,
the distance + direction loss over several resolutions, and the localisation maps.

Both networks expose the outputs of their last four max-pools (pool2 ... pool5); the
cloner's channel counts there equal VGG16's (128, 256, 512, 512), so they compare directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, grey_opening
from torch import nn

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                    512, 512, 512, "M")
"""VGG16 ("configuration D"): conv widths, "M" = 2x2 max-pool."""

CLONER_CFG: tuple[int | str, ...] = (16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M",
                                     16, 16, 512, "M")
"""The paper's smaller cloner (official "configuration B"): narrow convs, VGG16's widths at the pools."""

TAPS = 4
"""Pools compared in training: the last four (pool2 ... pool5)."""

SCORE_TAPS = 3
"""Pools compared for scores and maps: the last three (pool3 ... pool5), as the official test code."""


class GuidedReLU(nn.ReLU):
    """ReLU whose backward pass follows guided backpropagation while ``guided`` is True:
    the gradient passes only where the forward output was positive *and* it is positive."""

    guided: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLUFunction.apply(x) if self.guided else F.relu(x)


class _GuidedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0)


class Teacher(nn.Module):
    """VGG16's ``features`` (same module indices as torchvision's, so its state dict loads
    with the ``features.`` prefix removed); frozen, eval mode."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                conv = nn.Conv2d(channels, int(v), 3, padding=1)
                nn.init.xavier_uniform_(conv.weight)  # random init (pretrained=False), as the official code
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU()]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:
        """Always in eval mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _pool_outputs(self.features, x)


class Cloner(nn.Module):
    """The cloner: 3x3 convs (no bias, Xavier-uniform), each followed by BatchNorm and ReLU,
    except the last conv of a stage (ReLU only, then the max-pool)."""

    def __init__(self, cfg: Sequence[int | str] = CLONER_CFG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            conv = nn.Conv2d(channels, int(v), 3, padding=1, bias=False)
            nn.init.xavier_uniform_(conv.weight)
            layers.append(conv)
            if i + 1 < len(cfg) and cfg[i + 1] != "M":
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(GuidedReLU())
            channels = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _pool_outputs(self.features, x)

    @contextmanager
    def guided_backprop(self) -> Iterator[None]:
        """Within the block, the cloner's ReLUs backpropagate guided gradients."""
        relus = [m for m in self.modules() if isinstance(m, GuidedReLU)]
        for m in relus:
            m.guided = True
        try:
            yield
        finally:
            for m in relus:
                m.guided = False


def _pool_outputs(features: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the last ``TAPS`` max-pools of ``features``."""
    pools = []
    for layer in features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            pools.append(x)
    return pools[-TAPS:]


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], lamda: float,
                      direction_only: bool = False) -> torch.Tensor:
    """Per-image loss [B]: sum over the given taps of (1 - cos) between the flattened
    per-image tensors (direction) + ``lamda`` x their mean squared difference (distance).

    The mean over a batch equals the paper's total loss (the MSE there is the mean over
    all elements, every image having the same number).
    """
    total = 0
    for s, t in zip(student, teacher, strict=True):
        s, t = s.flatten(1), t.flatten(1)
        total = total + (1 - F.cosine_similarity(s, t, dim=1))
        if not direction_only:
            total = total + lamda * (s - t).pow(2).mean(dim=1)
    return total


def feature_difference_map(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], lamda: float,
                           size: tuple[int, int], direction_only: bool = False) -> torch.Tensor:
    """[B, H, W]: per position, (1 - cos over channels) + ``lamda`` x mean squared difference,
    upsampled (bilinear) to ``size`` and summed over the taps."""
    total = 0
    for s, t in zip(student, teacher, strict=True):
        d = 1 - F.cosine_similarity(s, t, dim=1)
        if not direction_only:
            d = d + lamda * (s - t).pow(2).mean(dim=1)
        total = total + F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return total


OPENING_FOOTPRINT = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
"""The official 3x3 elliptical structuring element (OpenCV's MORPH_ELLIPSE at 3x3)."""


def saliency_map(grad: np.ndarray, sigma: float = 4.0, passes: int = 1, opening: bool = True) -> np.ndarray:
    """An input gradient [C, H, W] -> localisation map [H, W] in [0, 1].

    Sum of |grad| over channels, scaled so that its minimum is 0 and its 99th percentile
    1 (clipped above), Gaussian blur (``sigma``, ``passes`` times), then a grey-level
    morphological opening with the 3x3 elliptical element. The official code opens the
    map after thresholding it, at every threshold of its ROC; opening with a flat element
    commutes with thresholding, so opening the grey map gives the same curve.
    """
    g = np.abs(grad).sum(axis=0)
    lo, hi = g.min(), np.percentile(g, 99)
    g = np.clip((g - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(g)
    for _ in range(passes):
        g = gaussian_filter(g, sigma=sigma)
    if opening:
        g = grey_opening(g, footprint=OPENING_FOOTPRINT, mode="nearest")
    return g.astype(np.float32)
