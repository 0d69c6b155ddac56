"""Language-enhanced reconstruction (BMAD thesis, Bao 2024, ch. 4): per-patch prompts + an adapter.

The frozen CLIP's patch features ``f^k`` (tokens after vision block k, through ``ln_post``
and the projection into the joint space, class token dropped) are "reconstructed" by
text features ``p`` of N per-patch prompts, one per grid position, each of M learned
tokens (Eq. 4.1); the anomaly map of a layer is ``1 - cos(f^k, p)`` per patch (Eq. 4.3).

Where the adapter ``h`` (Linear(E -> E/r) - ReLU - Linear(E/r -> D)) acts:

- ``"text"`` (Eq. 4.2, the default): ``p_i = E_text(T_i + h(f_i^last))``: the adapter maps
  the last block's projected feature of patch i into the token-embedding space and is
  added to each of the M context tokens of prompt i (CoCoOp's meta-net, which the
  thesis' wording follows). Text features then depend on the image: the frozen text
  tower encodes B x N prompts per batch.
- ``"image"`` (METHODS_CLIP.md's reading): the adapter is a residual on the last
  block's projected patch tokens, ``f^last + h(f^last)``, and ``p_i = E_text(T_i)`` does
  not depend on the image (computed once at inference).

Prompts are ``[sot] X_1 .. X_M [eot]`` (no class word) and are encoded cut after the
end-of-text token: under the causal mask the end-of-text feature does not depend on the
padding after it, so this is exact and ~4x cheaper than the 77-token context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.encode import encode_image, encode_text_embeddings, encode_text_layers, project_tokens
from algorithms.clip.prompts import with_context

ADAPTER_PLACES = ("text", "image")


class Adapter(nn.Module):
    """Linear(in -> in/reduction) - ReLU - Linear(-> out): the thesis' two-layer bottleneck."""

    def __init__(self, in_dim: int, out_dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, in_dim // reduction)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LerecHead(nn.Module):
    """The trainable parts: N x M context vectors (N(0, ``init_std``)) and the adapter.

    ``token_ids`` (1, L): the prompt template cut after its end-of-text token; ``start``:
    where the M placeholders begin. ``vision_blocks``: 0-based blocks whose tokens are
    compared (the last one is also the adapter's input); ``text_blocks``: None to use the
    text tower's output for every layer, else the 0-based text block paired with each
    vision block (the text feature then taken after that block, through ``ln_final`` and
    the text projection).
    """

    def __init__(
        self,
        *,
        n_patches: int,
        n_ctx: int,
        ctx_dim: int,
        embed_dim: int,
        token_ids: torch.Tensor,
        start: int,
        vision_blocks: Sequence[int],
        last_block: int,
        text_blocks: Sequence[int] | None = None,
        adapter_on: str = "text",
        reduction: int = 16,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if adapter_on not in ADAPTER_PLACES:
            raise ValueError(f"adapter_on must be one of {ADAPTER_PLACES}, got {adapter_on!r}")
        if adapter_on == "image" and last_block not in vision_blocks:
            raise ValueError("adapter_on='image' adapts the last block's features: include it in the layers")
        if text_blocks is not None and len(text_blocks) != len(vision_blocks):
            raise ValueError("text_blocks must pair one text block with each vision block")
        self.adapter_on = adapter_on
        self.vision_blocks = tuple(vision_blocks)
        self.last_block = last_block
        self.text_blocks = None if text_blocks is None else tuple(text_blocks)
        self.ctx = nn.Parameter(torch.randn(n_patches, n_ctx, ctx_dim) * init_std)
        self.adapter = Adapter(embed_dim, ctx_dim if adapter_on == "text" else embed_dim, reduction)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("start", torch.tensor([start]), persistent=False)

    # -- features -------------------------------------------------------------------------
    def image_features(self, clip: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Projected patch tokens (B, N, E) after each compared block, and the last block's."""
        keep = sorted({*self.vision_blocks, self.last_block})
        with torch.no_grad():  # the CLIP is frozen and the adapter acts after it: no gradient needed here
            out = encode_image(clip, x, keep=keep)
            proj = {i: project_tokens(clip, out.intermediates[i])[:, 1:] for i in keep}
        return [proj[i] for i in self.vision_blocks], proj[self.last_block]

    def text_features(self, clip: nn.Module, shift: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Text features of the N prompts, one (..., N, E) tensor per compared layer.

        ``shift`` (B, N, D): added to every context token of prompt i in image b
        (``adapter_on="text"``); None: the prompts alone, (N, E).
        """
        ctx = self.ctx if shift is None else self.ctx.unsqueeze(0) + shift.unsqueeze(2)
        lead = ctx.shape[:-2]
        ctx = ctx.reshape(-1, *ctx.shape[-2:])
        n = ctx.shape[0]
        ids = self.token_ids.expand(n, -1)
        emb = with_context(clip.token_embedding(self.token_ids).expand(n, -1, -1), ctx, self.start.expand(n))
        if self.text_blocks is None:
            feats = [encode_text_embeddings(clip, emb, ids)] * len(self.vision_blocks)
        else:
            feats = encode_text_layers(clip, emb, ids, self.text_blocks)
        return [f.reshape(*lead, f.shape[-1]) for f in feats]

    # -- the method -----------------------------------------------------------------------
    def distances(
        self, clip: nn.Module, x: torch.Tensor, text: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``1 - cos(f^k, p)`` per layer, each (B, N), for normalised images ``x``.

        ``text``: precomputed image-independent text features (``adapter_on="image"``).
        """
        feats, last = self.image_features(clip, x)
        if self.adapter_on == "text":
            text = self.text_features(clip, self.adapter(last))
        else:
            feats = [f + self.adapter(f) if b == self.last_block else f for f, b in zip(feats, self.vision_blocks)]
            text = text if text is not None else self.text_features(clip)
        return [1 - F.cosine_similarity(f, t.expand_as(f), dim=-1) for f, t in zip(feats, text)]


def reconstruction_loss(distances: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 4.5: the sum over layers of the mean distance over patches (and the batch)."""
    return torch.stack([d.mean() for d in distances]).sum()


def anomaly_map(distances: list[torch.Tensor], grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Eq. after 4.5: the layers' distance grids, bilinearly upsampled to ``size`` and summed (B, H, W)."""
    maps = [d.reshape(d.shape[0], 1, *grid) for d in distances]
    return sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)[:, 0]
