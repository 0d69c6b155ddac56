"""UTRAD's networks (Chen et al., Neural Networks 2022): CNN feature tokens, the U-shaped
transformer autoencoder over them, its reconstruction and error-scale heads, the loss and
the multi-scale anomaly map.

Token grid: every position of ``concat(layer1, up2(layer2), up4(layer3))`` of a frozen
ResNet is one token (448 channels for ResNet-18; a 64 x 64 grid at 256 px input).

U-shape: level ``l`` cuts its grid into non-overlapping ``p_l x p_l`` windows; each window
(plus a zero summary token in front) goes through that level's transformer encoder. The
summary outputs form the next level's grid (``p_l`` times coarser); the other outputs,
through a small bottleneck, are the level's latents. Going up, each window of level ``l``
is decoded from ``p_l^2`` learned queries attending to [the coarser level's decoded token
for that window, the window's own bottlenecked latents] - the skip connection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FeatureTokens(nn.Module):
    """A frozen backbone's (layer1, layer2, layer3) -> concat(l1, up2(l2), up4(l3)) [B, C, H/4, W/4].

    ``backbone`` returns the three maps (timm ``features_only`` with ``out_indices=(1, 2, 3)``);
    the deeper ones are upsampled to layer1's grid by nearest neighbour.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureTokens:
        """The backbone stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(x)
        size = maps[0].shape[-2:]
        return torch.cat([maps[0], *(F.interpolate(m, size=size, mode="nearest") for m in maps[1:])], dim=1)


def partition(grid: torch.Tensor, p: int) -> torch.Tensor:
    """[B, H, W, D] -> [B * (H/p) * (W/p), p*p, D]: non-overlapping p x p windows.

    Windows are in row-major (b, window row, window column) order and the tokens of a
    window in row-major order: token (h, w) = (ph*p + sh, pw*p + sw) is token sh*p + sw
    of window (ph, pw).
    """
    b, h, w, d = grid.shape
    x = grid.reshape(b, h // p, p, w // p, p, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // p) * (w // p), p * p, d)


def merge(windows: torch.Tensor, b: int, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of :func:`partition`: [B * (H/p) * (W/p), p*p, D] -> [B, H, W, D]."""
    d = windows.shape[-1]
    x = windows.reshape(b, h // p, w // p, p, p, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, d)


class UTransformer(nn.Module):
    """The U-shaped transformer autoencoder with its two heads.

    ``in_channels`` feature channels on a ``grid`` (H, W) token grid; both sides must be
    divisible by the product of ``patch_sizes``. Defaults are the paper's: d 512, 8 heads,
    FFN 2048, dropout 0.1, GELU, post-norm, 4 encoder + 4 decoder layers per level,
    windows (4, 4, 4), bottleneck 128.

    As the official code: the positional tables (one global [D, H, W], one [p^2, D] per
    level) are N(0, 1) and never trained (``train_positions=True`` trains them, as the
    official class name "LearnedPositionEncoding" suggests was meant); the summary token is a fixed zero; one final
    LayerNorm is shared by the three encoders and one by the three decoders; Conv/Linear
    weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02).
    """

    def __init__(
        self,
        in_channels: int,
        grid: tuple[int, int],
        d_model: int = 512,
        n_heads: int = 8,
        ff_dim: int = 2048,
        dropout: float = 0.1,
        n_layers: int = 4,
        patch_sizes: Sequence[int] = (4, 4, 4),
        bottleneck_dim: int = 128,
        train_positions: bool = False,
    ) -> None:
        super().__init__()
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        total = math.prod(self.patch_sizes)
        if grid[0] % total or grid[1] % total:
            raise ValueError(f"token grid {grid} is not divisible by the window product {total} of {self.patch_sizes}")
        if d_model % 8:
            raise ValueError("d_model must be a multiple of 8 (the scale head narrows it by 8)")
        self.grid = (int(grid[0]), int(grid[1]))
        self.pre_conv = nn.Conv2d(in_channels, d_model, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.pos_global = nn.Parameter(torch.randn(d_model, *self.grid), requires_grad=train_positions)
        self.pos_levels = nn.ParameterList(
            nn.Parameter(torch.randn(p * p, d_model), requires_grad=train_positions) for p in self.patch_sizes
        )
        enc_norm, dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)  # one each, shared by the levels

        def encoder() -> nn.TransformerEncoder:
            layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout, "gelu", batch_first=True)
            return nn.TransformerEncoder(layer, n_layers, norm=enc_norm, enable_nested_tensor=False)

        def decoder() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(d_model, n_heads, ff_dim, dropout, "gelu", batch_first=True)
            return nn.TransformerDecoder(layer, n_layers, norm=dec_norm)

        def bottleneck() -> nn.Sequential:
            return nn.Sequential(nn.Linear(d_model, bottleneck_dim), nn.LayerNorm(bottleneck_dim), nn.GELU(),
                                 nn.Linear(bottleneck_dim, d_model), nn.LayerNorm(d_model))

        self.encoders = nn.ModuleList(encoder() for _ in self.patch_sizes)
        self.bottlenecks = nn.ModuleList(bottleneck() for _ in self.patch_sizes)
        self.queries = nn.ModuleList(nn.Embedding(p * p, d_model) for p in self.patch_sizes)
        self.decoders = nn.ModuleList(decoder() for _ in self.patch_sizes)
        self.recon_head = nn.Conv2d(d_model, in_channels, 1, bias=False)
        widths = [d_model, d_model, d_model // 2, d_model // 4, d_model // 8]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.scale_head = nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 1, bias=False))
        self.apply(_init_weights)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature tokens [B, C, H, W] -> (reconstruction [B, C, H, W], error scale [B, 1, H, W])."""
        b = feats.shape[0]
        x = self.dropout(self.pre_conv(feats) + self.pos_global).permute(0, 2, 3, 1)  # [B, H, W, D]
        latents, sizes = [], []
        for level, p in enumerate(self.patch_sizes):  # down: windows -> summaries (next grid) + latents
            h, w = x.shape[1:3]
            windows = self.dropout(partition(x, p) + self.pos_levels[level])
            summary = windows.new_zeros(windows.shape[0], 1, windows.shape[2])
            out = self.encoders[level](torch.cat([summary, windows], dim=1))
            latents.append(self.bottlenecks[level](out[:, 1:]))
            x = out[:, 0].reshape(b, h // p, w // p, -1)
            sizes.append((h, w))
        for level in reversed(range(len(self.patch_sizes))):  # up: one token per window + its skip latents
            p, (h, w) = self.patch_sizes[level], sizes[level]
            memory = torch.cat([x.reshape(-1, 1, x.shape[-1]), latents[level]], dim=1)
            queries = self.queries[level].weight.expand(memory.shape[0], -1, -1)
            x = merge(self.decoders[level](queries, memory), b, h, w, p)
        x = x.permute(0, 3, 1, 2)
        return self.recon_head(x), self.scale_head(x.detach())


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: Conv/Linear weights N(0, 0.02); BatchNorm N(1, 0.02), bias 0."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def utrad_loss(feats: torch.Tensor, recon: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MSE(recon, feats) + MSE(scale, ||recon - feats||_2 over channels, detached)."""
    error = (recon - feats).norm(dim=1, keepdim=True).detach()
    return F.mse_loss(recon, feats) + F.mse_loss(scale, error)


SCALE_EPS = 1e-8
"""Floor on |scale| in the map's division (the official code has none and can give inf)."""


def anomaly_map(
    feats: torch.Tensor, recon: torch.Tensor, scale: torch.Tensor | None, pools: Sequence[int],
    size: tuple[int, int],
) -> torch.Tensor:
    """[B, H, W] map at ``size``: the scaled error averaged over several pooling scales.

    ``d = ||recon - feats||_2 / |scale|`` per token (the plain error when ``scale`` is
    None); for each ``k`` in ``pools`` it is average-pooled in k x k windows and upsampled
    back (bilinear); the mean of these maps is upsampled (bilinear) to ``size``.
    """
    d = (recon - feats).norm(dim=1, keepdim=True)
    if scale is not None:
        d = d / scale.abs().clamp_min(SCALE_EPS)
    grid = d.shape[-2:]
    maps = [F.interpolate(F.avg_pool2d(d, k), size=grid, mode="bilinear", align_corners=False) for k in pools]
    mean = torch.stack(maps).mean(0)
    return F.interpolate(mean, size=size, mode="bilinear", align_corners=False)[:, 0]
