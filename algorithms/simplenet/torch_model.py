"""SimpleNet's networks (Liu et al., CVPR 2023): locally aggregated features of a frozen
CNN, the feature adaptor, the Gaussian anomaly-feature generator, the discriminator, the
truncated L1 loss and the smoothed score map."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn


class PatchFeatures(nn.Module):
    """Frozen backbone levels -> one ``target_dim`` feature per position of the first level's grid.

    Per level: every position's ``patchsize x patchsize`` neighbourhood (zero padding,
    stride 1), flattened in (channel, row, column) order, is average-pooled (1-D adaptive)
    to ``pretrain_dim``; deeper levels are upsampled bilinearly to the first level's grid;
    the levels' vectors, concatenated, are average-pooled to ``target_dim``. Pooling over
    the feature axis and upsampling over the grid commute (both linear, on different
    axes), so deeper levels are pooled before being upsampled: the official order
    (upsample the C*p*p-channel map, then pool) gives the same numbers, with less memory.
    """

    def __init__(self, backbone: nn.Module, patchsize: int = 3, pretrain_dim: int = 1536, target_dim: int = 1536):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.patchsize = patchsize
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim

    def train(self, mode: bool = True) -> PatchFeatures:
        """The backbone stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images [B, 3, H, W] -> (features [B * h * w, target_dim] in (b, row, col) order, (h, w))."""
        maps = self.backbone(x)
        grid = tuple(maps[0].shape[-2:])
        levels = []
        for m in maps:
            b, _, h, w = m.shape
            patches = F.unfold(m, self.patchsize, padding=(self.patchsize - 1) // 2)  # [B, C*p*p, h*w]
            pooled = F.adaptive_avg_pool1d(patches.transpose(1, 2).reshape(b * h * w, 1, -1), self.pretrain_dim)
            pooled = pooled.reshape(b, h, w, self.pretrain_dim).permute(0, 3, 1, 2)
            if (h, w) != grid:
                pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
            levels.append(pooled.permute(0, 2, 3, 1).reshape(-1, self.pretrain_dim))
        stacked = torch.stack(levels, dim=1).reshape(-1, 1, len(levels) * self.pretrain_dim)
        return F.adaptive_avg_pool1d(stacked, self.target_dim).squeeze(1), grid


class Adaptor(nn.Linear):
    """The feature adaptor: one fully connected layer (with bias), Xavier-normal weights."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim)
        nn.init.xavier_normal_(self.weight)


class Discriminator(nn.Sequential):
    """``layers - 1`` blocks of Linear -> BatchNorm1d -> LeakyReLU(0.2), then Linear(-> 1, no bias).

    Xavier-normal weights. Positive outputs mean "normal"; the anomaly score is the negation.
    """

    def __init__(self, in_dim: int, hidden: int = 1024, layers: int = 2) -> None:
        if layers < 1:
            raise ValueError("the discriminator needs at least one layer")
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            dim = hidden
        super().__init__(*blocks, nn.Linear(dim, 1, bias=False))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)


def anomalous_features(q: torch.Tensor, std: float) -> torch.Tensor:
    """The anomaly-feature generator: ``q + eps``, eps ~ N(0, std^2 I), i.i.d. per entry."""
    return q + std * torch.randn_like(q)


def truncated_l1(true_scores: torch.Tensor, fake_scores: torch.Tensor, th_pos: float = 0.5,
                 th_neg: float = -0.5) -> torch.Tensor:
    """mean max(0, th+ - D(q)) + mean max(0, D(q-) - th-): zero once normal features score
    at least ``th_pos`` and generated anomalies at most ``th_neg``."""
    return (th_pos - true_scores).clamp_min(0).mean() + (fake_scores - th_neg).clamp_min(0).mean()


def score_maps(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> np.ndarray:
    """Patch scores [B, h, w] -> bilinear upsampling to ``size`` -> Gaussian smoothing (per image)."""
    up = F.interpolate(patch_scores[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    maps = up.cpu().numpy()
    if sigma > 0:
        maps = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    return maps.astype(np.float32)
