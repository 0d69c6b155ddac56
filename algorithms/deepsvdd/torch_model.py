"""Deep SVDD's networks and pieces (Ruff et al., ICML 2018), written from the paper and METHODS_NATIVE §3.

- :class:`LeNetEncoder`: phi, the bias-free CIFAR-10 LeNet (three Conv5x5 -> BN(affine=False)
  -> LeakyReLU -> MaxPool2 stages, then a bias-free Linear), sized for the input.
- :class:`LeNetAutoencoder`: the pretraining autoencoder; its ``encoder`` is a
  :class:`LeNetEncoder`, so its weights (and BN statistics) copy straight into phi.
- :func:`init_center`: the hypersphere centre c and its near-zero fix.
- :func:`gcn_l1`: the paper's per-image global contrast normalisation (L1).

No layer has a bias and no BatchNorm has an affine shift: with either, phi could map every
input to c (the paper's "hypersphere collapse", Propositions 2-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-4
LEAKY_SLOPE = 0.01


class LeNetEncoder(nn.Module):
    """phi: C -> 32 -> 64 -> 128 channels, each Conv5x5 (pad 2, no bias) -> BN(eps 1e-4,
    affine=False) -> LeakyReLU(0.01) -> MaxPool2, then Linear(128 (H/8)(W/8) -> rep_dim, no bias).

    At 32 x 32 x 3 with rep_dim 128 this is the official CIFAR-10 LeNet (520,544 parameters).
    """

    def __init__(
        self,
        in_channels: int = 3,
        input_size: tuple[int, int] = (32, 32),
        rep_dim: int = 128,
        widths: tuple[int, ...] = (32, 64, 128),
    ) -> None:
        super().__init__()
        h, w = input_size
        k = 2 ** len(widths)
        if h % k or w % k:
            raise ValueError(f"LeNetEncoder: input size {input_size} must be a multiple of {k}")
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(prev, width, 5, padding=2, bias=False),
                nn.BatchNorm2d(width, eps=BN_EPS, affine=False),
                nn.LeakyReLU(LEAKY_SLOPE),
                nn.MaxPool2d(2, 2),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        self.grid = (h // k, w // k)
        self.fc = nn.Linear(prev * self.grid[0] * self.grid[1], rep_dim, bias=False)
        self.rep_dim = rep_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, rep_dim]."""
        return self.fc(self.features(x).flatten(1))


class LeNetAutoencoder(nn.Module):
    """The pretraining autoencoder: :class:`LeNetEncoder` (convs Xavier-uniform with the
    leaky-ReLU gain) + BatchNorm1d(rep_dim, affine=False) on the code; decoder: code ->
    (rep_dim/16) x 4 x 4 (nearest-resized to (H/8) x (W/8) when the input is not 32 x 32),
    LeakyReLU, three ConvT5x5 -> BN(affine=False) -> LeakyReLU -> upsample x2 blocks
    (128 -> 64 -> 32 channels), ConvT5x5 -> C, sigmoid. Bias-free throughout.
    """

    def __init__(
        self,
        in_channels: int = 3,
        input_size: tuple[int, int] = (32, 32),
        rep_dim: int = 128,
        widths: tuple[int, ...] = (32, 64, 128),
    ) -> None:
        super().__init__()
        if rep_dim % 16:
            raise ValueError(f"LeNetAutoencoder: rep_dim ({rep_dim}) must be a multiple of 16")
        self.encoder = LeNetEncoder(in_channels, input_size, rep_dim, widths)
        self.code_norm = nn.BatchNorm1d(rep_dim, eps=BN_EPS, affine=False)
        gain = nn.init.calculate_gain("leaky_relu")
        blocks: list[nn.Module] = []
        prev = rep_dim // 16
        for width in reversed(widths):
            blocks += [
                nn.ConvTranspose2d(prev, width, 5, padding=2, bias=False),
                nn.BatchNorm2d(width, eps=BN_EPS, affine=False),
                nn.LeakyReLU(LEAKY_SLOPE),
                nn.Upsample(scale_factor=2),
            ]
            prev = width
        self.decoder = nn.Sequential(*blocks, nn.ConvTranspose2d(prev, in_channels, 5, padding=2, bias=False))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` in (0, 1)."""
        code = self.code_norm(self.encoder(x))
        z = code.view(code.shape[0], -1, 4, 4)
        if tuple(self.encoder.grid) != (4, 4):
            z = F.interpolate(z, size=self.encoder.grid, mode="nearest")
        return torch.sigmoid(self.decoder(F.leaky_relu(z, LEAKY_SLOPE)))


def init_center(features: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """c = mean of ``features`` [N, D]; coordinates with 0 < |c_i| < eps become +-eps (sign kept).

    Exact zeros stay zero, as in the official code (a coordinate near zero could be matched
    trivially by zero weights).
    """
    c = features.mean(0)
    small = c.abs() < eps
    c = torch.where(small & (c < 0), torch.full_like(c, -eps), c)
    return torch.where(small & (c > 0), torch.full_like(c, eps), c)


def svdd_scores(features: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Squared distances ``||phi(x) - c||^2`` [N]: the one-class loss terms and the anomaly scores."""
    return ((features - center) ** 2).sum(1)


def gcn_l1(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation per image (L1 scale): subtract the image mean, divide by
    the mean absolute deviation (over all channels and pixels). A constant image maps to zeros."""
    flat = x.flatten(1)
    centred = flat - flat.mean(1, keepdim=True)
    scale = centred.abs().mean(1, keepdim=True).clamp_min(1e-12)
    return (centred / scale).view_as(x)
