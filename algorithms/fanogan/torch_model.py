"""f-AnoGAN's networks and losses (Schlegl et al., Medical Image Analysis 2019).

Two architectures, both for square inputs of side S (a multiple of 16), images in [-1, 1]:

- "resnet" (the paper's, from its official TF code, itself Gulrajani et al.'s 64 x 64 WGAN-GP
  ResNet): generator Linear(z -> 8d (S/16)^2) -> 4 up-sampling residual blocks (8d, 8d, 4d,
  2d, d channels) -> BN -> ReLU -> Conv3x3 -> tanh; critic Conv3x3 -> 4 down-sampling residual
  blocks (2d, 4d, 8d, 8d) with layer norm -> f(x) (8d (S/16)^2 values) -> Linear -> 1; encoder:
  the critic's layout with batch norm, then Linear -> z and tanh. d = ``dim`` (64).
- "dcgan" (BMAD's vendored PyTorch port): generator Linear(z -> 128 (S/4)^2) -> BN -> 2 x
  [upsample x2, Conv3x3, BN(eps 0.8), LeakyReLU 0.2] -> Conv3x3 -> tanh; critic 4 x [Conv3x3
  stride 2, LeakyReLU 0.2, Dropout2d 0.25, BN(eps 0.8) except the first] (16, 32, 64, 128
  channels) -> f(x) -> Linear -> 1; encoder: the same stack -> Linear -> z, tanh.

Every critic has ``features(x)`` (f(x), the izi_f loss's and the score's feature space) and
``forward(x)`` (the critic value [B]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("resnet", "dcgan")


# -- the paper's residual networks ----------------------------------------------------------
class _UpBlock(nn.Module):
    """BN -> ReLU -> upsample x2 + Conv3x3 (in -> out) -> BN -> ReLU -> Conv3x3, plus an
    upsample + Conv1x1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return self.shortcut(up) + h


class _DownBlock(nn.Module):
    """norm -> ReLU -> Conv3x3 (in -> in) -> norm -> ReLU -> Conv3x3 (in -> out) -> mean-pool 2,
    plus a mean-pool + Conv1x1 shortcut. ``layer_norm``: normalise each sample over (C, H, W)
    with a per-channel scale and shift (the critic's); else batch norm (the encoder's)."""

    def __init__(self, cin: int, cout: int, layer_norm: bool) -> None:
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.norm1 = nn.GroupNorm(1, cin) if layer_norm else nn.BatchNorm2d(cin)
        self.norm2 = nn.GroupNorm(1, cin) if layer_norm else nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = F.avg_pool2d(self.conv2(F.relu(self.norm2(h))), 2)
        return self.shortcut(F.avg_pool2d(x, 2)) + h


class ResNetGenerator(nn.Module):
    """The paper's generator: z [B, latent] -> images [B, C, S, S] in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, dim: int = 64) -> None:
        super().__init__()
        _check_size(image_size)
        self.start = (8 * dim, image_size // 16)
        self.fc = nn.Linear(latent_dim, 8 * dim * (image_size // 16) ** 2)
        widths = [8 * dim, 8 * dim, 4 * dim, 2 * dim, dim]
        self.blocks = nn.Sequential(*[_UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.bn = nn.BatchNorm2d(dim)
        self.out = nn.Conv2d(dim, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, s = self.start
        h = self.blocks(self.fc(z).view(-1, c, s, s))
        return torch.tanh(self.out(F.relu(self.bn(h))))


class _ResNetTrunk(nn.Module):
    """Conv3x3 (C -> d), then 4 down blocks (d -> 2d -> 4d -> 8d -> 8d), flattened."""

    def __init__(self, channels: int, image_size: int, dim: int, layer_norm: bool) -> None:
        super().__init__()
        _check_size(image_size)
        self.inp = nn.Conv2d(channels, dim, 3, padding=1)
        widths = [dim, 2 * dim, 4 * dim, 8 * dim, 8 * dim]
        self.blocks = nn.Sequential(*[_DownBlock(a, b, layer_norm) for a, b in zip(widths[:-1], widths[1:])])
        self.out_features = 8 * dim * (image_size // 16) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.inp(x)).flatten(1)


class ResNetCritic(nn.Module):
    """The paper's critic (layer norm, so the gradient penalty stays per sample)."""

    def __init__(self, channels: int, image_size: int, dim: int = 64) -> None:
        super().__init__()
        self.trunk = _ResNetTrunk(channels, image_size, dim, layer_norm=True)
        self.head = nn.Linear(self.trunk.out_features, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the flattened output of the last residual block."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Critic values [B]."""
        return self.head(self.features(x)).view(-1)


class ResNetEncoder(nn.Module):
    """The paper's izi_f encoder: the critic's layout with batch norm, Linear -> z, tanh."""

    def __init__(self, channels: int, image_size: int, latent_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.trunk = _ResNetTrunk(channels, image_size, dim, layer_norm=False)
        self.fc = nn.Linear(self.trunk.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.trunk(x)))


# -- BMAD's DCGAN-style networks ------------------------------------------------------------
class DCGANGenerator(nn.Module):
    """BMAD's generator (40.8 M parameters at S = 224, 3.5 M at 64, latent 100)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int) -> None:
        super().__init__()
        _check_size(image_size)
        self.init_size = image_size // 4
        self.fc = nn.Linear(latent_dim, 128 * self.init_size**2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(128),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.BatchNorm2d(128, 0.8),  # eps = 0.8: the PyTorch-GAN quirk BMAD inherits
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64, 0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(64, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.fc(z).view(-1, 128, self.init_size, self.init_size))


def _dcgan_stack(channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip([channels, 16, 32, 64], [16, 32, 64, 128])):
        layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(0.25)]
        if i > 0:
            layers.append(nn.BatchNorm2d(cout, 0.8))
    return nn.Sequential(*layers)


class DCGANCritic(nn.Module):
    """BMAD's critic (123 K parameters at S = 224)."""

    def __init__(self, channels: int, image_size: int) -> None:
        super().__init__()
        _check_size(image_size)
        self.stack = _dcgan_stack(channels)
        self.head = nn.Linear(128 * (image_size // 16) ** 2, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the flattened output of the conv stack."""
        return self.stack(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Critic values [B]."""
        return self.head(self.features(x)).view(-1)


class DCGANEncoder(nn.Module):
    """BMAD's encoder: the critic's stack, Linear -> z, tanh."""

    def __init__(self, channels: int, image_size: int, latent_dim: int) -> None:
        super().__init__()
        _check_size(image_size)
        self.stack = _dcgan_stack(channels)
        self.fc = nn.Linear(128 * (image_size // 16) ** 2, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(self.stack(x).flatten(1)))


def build_networks(
    architecture: str, latent_dim: int, channels: int, image_size: int, dim: int = 64
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(generator, critic, encoder) of ``architecture`` ("resnet" or "dcgan")."""
    if architecture == "resnet":
        return (ResNetGenerator(latent_dim, channels, image_size, dim), ResNetCritic(channels, image_size, dim),
                ResNetEncoder(channels, image_size, latent_dim, dim))
    if architecture == "dcgan":
        return (DCGANGenerator(latent_dim, channels, image_size), DCGANCritic(channels, image_size),
                DCGANEncoder(channels, image_size, latent_dim))
    raise ValueError(f"f-AnoGAN architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def _check_size(image_size: int) -> None:
    if image_size % 16:
        raise ValueError(f"f-AnoGAN needs a square input whose side is a multiple of 16, got {image_size}")


# -- losses and scores ----------------------------------------------------------------------
def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """WGAN-GP's penalty mean_b (||grad_x D(x_hat_b)||_2 - 1)^2 at x_hat = alpha real + (1 - alpha) fake,
    alpha ~ U(0, 1) per sample (or the given ``alpha``, broadcastable to the images)."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def izif_terms(
    generator: nn.Module, critic: nn.Module, encoder: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image residual terms of x -> G(E(x)): (image MSE [B], feature MSE [B], G(E(x)))."""
    rec = generator(encoder(x))
    img = ((rec - x) ** 2).flatten(1).mean(1)
    feat = ((critic.features(rec) - critic.features(x)) ** 2).mean(1)
    return img, feat, rec


def izif_loss(
    generator: nn.Module, critic: nn.Module, encoder: nn.Module, x: torch.Tensor, kappa: float = 1.0
) -> torch.Tensor:
    """The izi_f training loss: MSE(G(E(x)), x) + kappa MSE(f(G(E(x))), f(x)), means over the batch."""
    img, feat, _ = izif_terms(generator, critic, encoder, x)
    return img.mean() + kappa * feat.mean()


def anomaly_score(
    generator: nn.Module, critic: nn.Module, encoder: nn.Module, x: torch.Tensor, kappa: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's A(x) = A_R(x) + kappa A_D(x) per image [B], and the residual |x - G(E(x))| [B, C, S, S]."""
    img, feat, rec = izif_terms(generator, critic, encoder, x)
    return img + kappa * feat, (x - rec).abs()
