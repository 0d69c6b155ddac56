"""The thesis' training-free "data augmentation": add the Laplacian pyramid's low-frequency residual.

Thesis §4.2.3 (Eq. 4.6-4.9): the Gaussian pyramid step ``F_down`` blurs with a Gaussian
kernel and halves the size; ``F_up`` doubles it back. The structure image
``S_K = F_up^K(F_down^K(I))`` (down K times, up K times) is added to the image.

Here ``F_down`` / ``F_up`` are Burt and Adelson's (OpenCV's ``pyrDown`` / ``pyrUp``):
the 5x5 binomial kernel ``[1, 4, 6, 4, 1]^T [1, 4, 6, 4, 1] / 256`` with mirrored borders
(reflect-101); down keeps the even rows and columns of the blurred image (size
``ceil(n / 2)``), up inserts zeros between the samples and blurs with 4x the kernel,
cropped to the size of the level it returns to. ASSUMED (the thesis does not say): the
sum is halved, ``(I + S_K) / 2``, so the enhanced image stays in [0, 1] for CLIP's
normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5x5 binomial blur of [B, C, H, W] with reflect-101 borders."""
    c = x.shape[1]
    k = (_BINOMIAL * gain**0.5).to(x)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """One Gaussian-pyramid step down: blur, keep even rows/columns ([B, C, ceil(H/2), ceil(W/2)])."""
    return _blur(x)[..., ::2, ::2]


def pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One step up to ``size`` (2h or 2h-1, 2w or 2w-1): zeros between samples, blur with 4x the kernel."""
    b, c, h, w = x.shape
    z = x.new_zeros(b, c, 2 * h, 2 * w)
    z[..., ::2, ::2] = x
    return _blur(z, gain=4.0)[..., : size[0], : size[1]]


def low_frequency(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``S_K = F_up^K(F_down^K(x))``: the structure image at the input's size."""
    if min(x.shape[-2:]) < 3 * 2 ** (levels - 1):
        raise ValueError(f"{levels} pyramid levels need images of at least {3 * 2 ** (levels - 1)} px, "
                         f"got {tuple(x.shape[-2:])}")
    sizes = []
    for _ in range(levels):
        sizes.append(tuple(x.shape[-2:]))
        x = pyr_down(x)
    for size in reversed(sizes):
        x = pyr_up(x, size)
    return x


def laplacian_enhance(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``(x + S_K) / 2`` for images in [0, 1] ([B, C, H, W]); ``levels`` 0 returns ``x``."""
    if levels <= 0:
        return x
    return 0.5 * (x + low_frequency(x, levels))
