"""CutPaste's model (Li et al., CVPR 2021): ResNet-18 trunk + MLP projection head + classifier,
the Gaussian density estimator on the trunk's embeddings, and the patch-level helpers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class CutPasteNet(nn.Module):
    """``backbone`` (pooled features, e.g. timm resnet18 with ``num_classes=0``) -> embedding e;
    head: ``head_layers`` x [Linear(-> 512), BN1d, ReLU] + [Linear(-> 128), BN1d, ReLU];
    then Linear(128 -> ``num_classes``). The density is fitted on e, not on the head's output."""

    def __init__(self, backbone: nn.Module, embed_dim: int = 512, head_layers: int = 2, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        prev = embed_dim
        for width in [512] * head_layers + [128]:
            layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            prev = width
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (embeddings [B, embed_dim], logits [B, num_classes])."""
        e = self.backbone(x)
        return e, self.out(self.head(e))


class GaussianDensity(nn.Module):
    """Gaussian density estimator (GDE) on L2-normalised embeddings: mean + Ledoit-Wolf precision.

    ``forward`` gives the Mahalanobis distance sqrt((e - mu)^T P (e - mu)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("precision", torch.zeros(0, 0))

    def fit(self, embeddings: torch.Tensor) -> GaussianDensity:
        """Fit on training embeddings [N, D] (L2-normalised here)."""
        from sklearn.covariance import LedoitWolf

        e = F.normalize(embeddings.detach().to(torch.float64).cpu(), dim=1)
        lw = LedoitWolf().fit(e.numpy())
        device = self.mean.device
        self.mean = torch.as_tensor(lw.location_, dtype=torch.float64).to(device)
        self.precision = torch.as_tensor(lw.precision_, dtype=torch.float64).to(device)
        return self

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances [N] of embeddings [N, D]."""
        if self.mean.numel() == 0:
            raise RuntimeError("GaussianDensity: call fit() first")
        d = F.normalize(embeddings.to(torch.float64), dim=1) - self.mean.to(embeddings.device)
        m2 = ((d @ self.precision.to(embeddings.device)) * d).sum(1)
        return m2.clamp_min(0).sqrt()


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets of the patches along one axis: every ``stride`` pixels, plus the last
    position when the stride does not land on it, so that every pixel is covered."""
    if patch > size:
        raise ValueError(f"patch size {patch} exceeds the image side {size}")
    pos = list(range(0, size - patch + 1, stride))
    if pos[-1] != size - patch:
        pos.append(size - patch)
    return pos


def extract_patches(images: torch.Tensor, ys: list[int], xs: list[int], patch: int) -> torch.Tensor:
    """Crops [B * len(ys) * len(xs), C, patch, patch] of ``images`` [B, C, H, W] (image-major, row-major)."""
    crops = [images[:, :, y : y + patch, x : x + patch] for y in ys for x in xs]
    return torch.stack(crops, 1).flatten(0, 1)


def gaussian_kernel(patch: int, sigma: float) -> torch.Tensor:
    """A [patch, patch] isotropic Gaussian centred on the patch (peak 1)."""
    r = torch.arange(patch, dtype=torch.float64) - (patch - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return (g[:, None] * g[None, :]).to(torch.float32)


def receptive_field_upsample(
    scores: torch.Tensor, ys: list[int], xs: list[int], patch: int, size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """Patch scores [B, len(ys), len(xs)] -> pixel maps [B, H, W]: every patch spreads its score
    over its own pixels with a Gaussian weight centred on the patch; each pixel is the weighted
    mean of the scores of the patches covering it (a constant score grid gives a constant map)."""
    kernel = gaussian_kernel(patch, sigma).to(scores.device)
    b = scores.shape[0]
    num = torch.zeros(b, *size, device=scores.device)
    den = torch.zeros(*size, device=scores.device)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            num[:, y : y + patch, x : x + patch] += scores[:, i, j, None, None].float() * kernel
            den[y : y + patch, x : x + patch] += kernel
    return num / den


def default_sigma(patch: int) -> float:
    """The smoothing width used when none is given: a quarter of the patch side."""
    return max(1.0, patch / 4)


def random_patch_crops(images: torch.Tensor, patch: int, rng: np.random.Generator) -> torch.Tensor:
    """One uniformly placed ``patch`` x ``patch`` crop per image of ``images`` [B, C, H, W]."""
    _, _, h, w = images.shape
    out = []
    for img in images:
        y, x = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
        out.append(img[:, y : y + patch, x : x + patch])
    return torch.stack(out)

