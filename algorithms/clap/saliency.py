"""M2IB saliency (Wang et al., NeurIPS 2023; as used by MedCLIP-SAMv2) and CLAP's mask.

Per (image, prompt) pair, an information bottleneck replaces the output ``x`` of one
vision block by ``z = lambda * x + (1 - lambda) * eps`` with ``lambda = sigmoid(alpha)``
(one alpha per token and channel, initialised to 5) and ``eps ~ N(0, 1)``. Its capacity
is ``KL(N(lambda x, (1 - lambda)^2) || N(0, 1))`` per element. ``alpha`` is trained for a
few Adam steps on a batch of noisy copies to minimise
``beta * mean(capacity) - cos(image embedding, text embedding)``; the saliency is the
capacity of the last pass summed over channels, the class token dropped, on the patch
grid, resized bilinearly and min-max normalised. ``alpha`` lives for one call only.

The bottleneck is a forward hook on the block module, so it works with open_clip's
own ``VisionTransformer`` (blocks may run sequence-first, open_clip < 2.26) and with
timm ViTs inside open_clip's ``TimmModel`` (BiomedCLIP; always batch-first). The hook
also expands the batch: every image goes once through the blocks before the
bottleneck and is copied there into (prompts x copies) noisy samples, which gives the
same result as running each pair on its own batch of copies (Adam is element-wise
and the pairs' losses are independent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.encode import batch_first


def vision_blocks(model: nn.Module) -> tuple[Sequence[nn.Module], bool]:
    """The residual blocks of ``model``'s vision tower and whether they run batch-first."""
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):  # open_clip TimmModel around a timm ViT
        return list(trunk.blocks), True
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):  # open_clip VisionTransformer
        return list(transformer.resblocks), batch_first(transformer)
    raise TypeError(f"M2IB needs a ViT vision tower; {type(visual).__name__} has no transformer blocks")


def capacity(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(N(lambda x, (1-lambda)^2) || N(0, 1))`` with ``lambda = sigmoid(alpha)``.

    ``= -0.5 * (1 + log((1-lambda)^2) - (lambda x)^2 - (1-lambda)^2)``, with
    ``1 - lambda = sigmoid(-alpha)`` and its log computed stably.
    """
    lam = torch.sigmoid(alpha)
    one_minus = torch.sigmoid(-alpha)
    log_var = 2 * F.logsigmoid(-alpha)
    return -0.5 * (1 + log_var - (lam * x) ** 2 - one_minus**2)


class InformationBottleneck:
    """The bottleneck on one block, installed as a forward hook while used as a context.

    The hooked block receives B images; its output is repeated into ``units`` pairs per
    image (image-major), each with its own alpha (B*units, L, D) created on the first
    pass, and each pair into ``copies`` noisy samples: the tower's output batch is
    B*units*copies, ordered (image, unit, copy). ``capacity`` holds the last pass's
    capacity per pair (B*units, L, D) (identical for every copy of a pair).
    """

    def __init__(
        self,
        block: nn.Module,
        *,
        batch_first: bool,
        units: int = 1,
        copies: int = 10,
        alpha_init: float = 5.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.block = block
        self.batch_first = batch_first
        self.units = units
        self.copies = copies
        self.alpha_init = alpha_init
        self.generator = generator
        self.alpha: torch.Tensor | None = None
        self.capacity: torch.Tensor | None = None
        self._handle: Any = None

    def __enter__(self) -> InformationBottleneck:
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self._handle = None

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        x = output if self.batch_first else output.transpose(0, 1)  # (B, L, D)
        x = x.repeat_interleave(self.units, dim=0)
        if self.alpha is None:
            self.alpha = torch.full_like(x, self.alpha_init, requires_grad=True)
        alpha = self.alpha
        self.capacity = capacity(x, alpha)
        mu = (torch.sigmoid(alpha) * x).repeat_interleave(self.copies, dim=0)
        std = torch.sigmoid(-alpha).repeat_interleave(self.copies, dim=0)
        eps = torch.randn(mu.shape, generator=self.generator, device=mu.device, dtype=mu.dtype)
        z = mu + std * eps
        return z if self.batch_first else z.transpose(0, 1)


def saliency_grid(cap: torch.Tensor) -> torch.Tensor:
    """Capacity (N, L, D) -> (N, g, g): summed over channels, prefix (class) tokens dropped.

    The patch grid is assumed square: ``g = floor(sqrt(L))`` and the first ``L - g^2``
    tokens are the prefix tokens.
    """
    per_token = cap.sum(dim=-1)
    g = math.isqrt(per_token.shape[-1])
    return per_token[:, per_token.shape[-1] - g * g :].reshape(-1, g, g)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map of (..., H, W) scaled to [0, 1] (a constant map becomes zeros)."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def m2ib_saliency(
    model: nn.Module,
    images: torch.Tensor,
    text_features: torch.Tensor,
    *,
    layer: int = 7,
    beta: float = 0.1,
    steps: int = 10,
    lr: float = 1.0,
    copies: int = 10,
    alpha_init: float = 5.0,
    out_size: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """M2IB saliency of every (image, prompt) pair: (B, K, H, W) in [0, 1].

    ``images``: (B, 3, S, S) prepared for the CLIP (normalised, at its input size);
    ``text_features``: (K, E) prompt embeddings; ``layer``: 0-based vision block whose
    output is bottlenecked; ``out_size``: map size (default: the images' size).
    Gradients are enabled inside (the runner predicts under ``no_grad``).
    """
    blocks, bf = vision_blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"M2IB layer {layer} is outside the vision tower's {len(blocks)} blocks (0-based)")
    n, k = images.shape[0], text_features.shape[0]
    text = F.normalize(text_features.detach().float(), dim=-1)
    bottleneck = InformationBottleneck(blocks[layer], batch_first=bf, units=k, copies=copies,
                                       alpha_init=alpha_init, generator=generator)
    optimizer: torch.optim.Optimizer | None = None
    with torch.enable_grad(), bottleneck:
        for _ in range(steps):
            emb = model.encode_image(images)
            emb = F.normalize(emb.float(), dim=-1).view(n, k, copies, -1)
            fit = (emb * text.view(1, k, 1, -1)).sum(-1).mean(-1)  # (B, K): mean cosine over copies
            compression = bottleneck.capacity.flatten(1).mean(-1).view(n, k)
            loss = (beta * compression - fit).sum()
            if optimizer is None:
                optimizer = torch.optim.Adam([bottleneck.alpha], lr=lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if bottleneck.capacity is None:
        raise ValueError("M2IB needs at least one step")
    grid = saliency_grid(bottleneck.capacity.detach()).unsqueeze(1)
    maps = F.interpolate(grid, size=out_size or tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    return minmax(maps[:, 0]).view(n, k, *maps.shape[-2:])


def clap_attention(saliency: torch.Tensor) -> torch.Tensor:
    """CLAP's attention ``A = A_pos - A_neg`` from (B, 2, H, W) min-max normalised saliencies."""
    return saliency[:, 0] - saliency[:, 1]


def clap_mask(attention: torch.Tensor, q3_factor: float = 0.674) -> torch.Tensor:
    """The suspected-lesion mask ``A > mean(A) + q3_factor * std(A)`` per image (B, H, W) -> bool.

    ``std`` is the population standard deviation over the image's pixels.
    """
    flat = attention.flatten(1)
    mu = flat.mean(-1, keepdim=True)
    sigma = flat.std(-1, unbiased=False, keepdim=True)
    return (flat > mu + q3_factor * sigma).view_as(attention)
