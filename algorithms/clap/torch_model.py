"""EAR-style reconstruction-by-inpainting parts: the U-Net, mosaic obfuscation, MSGMS.

The CLAP paper follows EAR (Park et al., Sci. Rep. 2024) and gives only "a U-Net with
five convolutional blocks in the encoder and decoder, with skip connections"; the
layout below is ASSUMED (RIAD-style): per level two 3x3 conv + BatchNorm + LeakyReLU
(the first with stride 2 below the top level), decoder levels nearest-upsample + conv,
concatenate the skip, two convs; a 1x1 conv and a sigmoid give the [0, 1] image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GMS_C = 0.0026
"""The GMS stability constant of RIAD / EAR (for images in [0, 1])."""


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.2, inplace=True)]


class UNet(nn.Module):
    """A U-Net image -> image with one level per entry of ``widths`` (default 64/128/256/512).

    Any input size works: each decoder level upsamples to its skip's size.
    """

    def __init__(self, channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths:
            raise ValueError("the U-Net needs at least one level")
        self.down = nn.ModuleList()
        cin = channels
        for i, w in enumerate(widths):
            self.down.append(nn.Sequential(*_conv(cin, w, stride=1 if i == 0 else 2), *_conv(w, w)))
            cin = w
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.Sequential(*_conv(cin, w)))
            self.fuse.append(nn.Sequential(*_conv(2 * w, w), *_conv(w, w)))
            cin = w
        self.head = nn.Conv2d(cin, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1])):
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
            x = fuse(torch.cat([x, skip], dim=1))
        return torch.sigmoid(self.head(x))


def mosaic(images: torch.Tensor, block: int) -> torch.Tensor:
    """Block averages of ``block`` x ``block`` pixels, upsampled back by repetition (nearest).

    Edge blocks that do not fit average the pixels they cover.
    """
    h, w = images.shape[-2:]
    pooled = F.avg_pool2d(images, block, stride=block, ceil_mode=True, count_include_pad=False)
    return pooled.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w]


def obfuscate(images: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """``x * (1 - M) + mosaic(x) * M`` for images (B, C, H, W) and masks (B, H, W)."""
    m = mask.to(images.dtype).unsqueeze(1)
    return images * (1 - m) + mosaic(images, block) * m


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Per-channel Prewitt gradient magnitude (3x3 kernels / 3, replicate padding), same size.

    A tiny epsilon under the square root keeps the gradient finite on flat regions.
    """
    c = images.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0]] * 3, device=images.device, dtype=images.dtype) / 3
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels, groups=c)
    g = g.view(images.shape[0], c, 2, *images.shape[-2:])
    return torch.sqrt((g**2).sum(2) + 1e-12)


def gms(x: torch.Tensor, y: torch.Tensor, c: float = GMS_C) -> torch.Tensor:
    """Gradient-magnitude similarity ``(2 g_x g_y + c) / (g_x^2 + g_y^2 + c)`` per channel."""
    gx, gy = gradient_magnitude(x), gradient_magnitude(y)
    return (2 * gx * gy + c) / (gx**2 + gy**2 + c)


def _scaled(x: torch.Tensor, s: int) -> torch.Tensor:
    return x if s == 1 else F.avg_pool2d(x, s, stride=s)


def msgms_map(x: torch.Tensor, y: torch.Tensor, scales: Sequence[int] = (1, 2, 4), c: float = GMS_C) -> torch.Tensor:
    """MSGMS error (B, H, W): 1 - the mean over ``scales`` (average-pool factors) of the GMS
    maps, each upsampled bilinearly to full size, averaged over channels."""
    size = x.shape[-2:]
    total = torch.zeros_like(x)
    for s in scales:
        g = gms(_scaled(x, s), _scaled(y, s), c)
        total = total + (g if s == 1 else F.interpolate(g, size=size, mode="bilinear", align_corners=False))
    return (1 - total / len(scales)).mean(1)


def msgms_loss(x: torch.Tensor, y: torch.Tensor, scales: Sequence[int] = (1, 2, 4), c: float = GMS_C) -> torch.Tensor:
    """The MSGMS training loss: the mean over ``scales`` of the mean of ``1 - GMS`` at that scale."""
    return torch.stack([(1 - gms(_scaled(x, s), _scaled(y, s), c)).mean() for s in scales]).mean()


def mean_filter(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, H, W) maps smoothed by a ``kernel`` x ``kernel`` box filter (borders: mean of the valid part)."""
    if kernel <= 1:
        return maps
    return F.avg_pool2d(maps.unsqueeze(1), kernel, stride=1, padding=kernel // 2,
                        count_include_pad=False)[:, 0, : maps.shape[-2], : maps.shape[-1]]
