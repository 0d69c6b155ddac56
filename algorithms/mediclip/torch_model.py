"""MediCLIP's trainable parts: class-specific learned prompts and one adapter per tapped ViT block.

The frozen CLIP is not a sub-module: it is passed to the methods that need it, so a
state dict of :class:`MediCLIPHead` holds the trainable parameters only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.clip.encode import encode_text_embeddings
from algorithms.clip.prompts import prompt_ids, with_context

NORMAL_WORDS: tuple[str, ...] = (
    "normal", "healthy", "negative", "unremarkable", "clear", "asymptomatic", "normal findings",
    "no findings", "in good health", "no evidence of disease",
)
"""The paper's 10 class words for normal images (Table S1)."""

ABNORMAL_WORDS: tuple[str, ...] = (
    "abnormal", "positive", "symptomatic", "disease", "lesion", "pathological", "impaired",
    "evidence of disease", "abnormal finding", "pathological condition", "pathological abnormality",
)
"""The paper's 11 class words for anomalous images (Table S1)."""


class ClassPrompts(nn.Module):
    """One learned context per prompt "[sot] ctx_1 .. ctx_M {word}. [eot]" (CoOp's class-specific contexts).

    ``words``: the class words, one tuple per class (normal first). Contexts are (N_words, M, D)
    with D the text width, initialised N(0, 0.02) as CoOp and the official code.
    """

    def __init__(self, tokenizer: Any, ctx_dim: int, words: Sequence[Sequence[str]] = (NORMAL_WORDS, ABNORMAL_WORDS),
                 n_ctx: int = 8, init_std: float = 0.02) -> None:
        super().__init__()
        flat = [w for group in words for w in group]
        ids, starts = prompt_ids(tokenizer, [""] * len(flat), n_ctx, [f"{w}." for w in flat])
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("starts", starts, persistent=False)
        self.register_buffer("word_class", torch.cat([torch.full((len(g),), c) for c, g in enumerate(words)]),
                             persistent=False)
        self.n_classes = len(words)
        self.ctx = nn.Parameter(torch.empty(len(flat), n_ctx, ctx_dim).normal_(std=init_std))

    def forward(self, clip: nn.Module, causal: bool = True) -> torch.Tensor:
        """Class text features T (E, n_classes): eot features averaged over each class's words, L2-normalised."""
        with torch.no_grad():
            embeddings = clip.token_embedding(self.token_ids)
        embeddings = with_context(embeddings, self.ctx, self.starts)
        features = encode_text_embeddings(clip, embeddings, self.token_ids, causal=causal)
        per_class = torch.stack([features[self.word_class == c].mean(dim=0) for c in range(self.n_classes)], dim=1)
        return F.normalize(per_class, dim=0)


class MediCLIPHead(nn.Module):
    """Adapters (1x1 conv width -> embed, with bias) on the tokens after ``layers``, plus :class:`ClassPrompts`.

    ``grid``: the ViT's patch grid (rows, columns); ``temperature``: the divisor of the cosine
    similarities (None: none, as the official code); ``causal_mask``: run the text transformer
    with its causal mask (the paper's CLIP) or without (the official code).
    """

    def __init__(self, *, width: int, embed_dim: int, text_width: int, grid: Sequence[int], tokenizer: Any,
                 layers: Sequence[int], n_ctx: int = 8, temperature: float | None = 0.07,
                 causal_mask: bool = True) -> None:
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        self.grid = (int(grid[0]), int(grid[1]))
        self.temperature = temperature
        self.causal_mask = causal_mask
        self.adapters = nn.ModuleList(nn.Conv2d(width, embed_dim, kernel_size=1) for _ in self.layers)
        self.prompts = ClassPrompts(tokenizer, text_width, n_ctx=n_ctx)

    def text_features(self, clip: nn.Module) -> torch.Tensor:
        """T (E, 2): the normal and abnormal text features."""
        return self.prompts(clip, causal=self.causal_mask)

    def patch_features(self, tokens: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        """Per tapped block: tokens (B, 1+P, W) -> class token dropped -> adapter -> (B, g, g, E), L2-normalised."""
        out = []
        for layer, adapter in zip(self.layers, self.adapters):
            x = tokens[layer][:, 1:, :]
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid)
            out.append(F.normalize(adapter(x).permute(0, 2, 3, 1), dim=-1))
        return out

    def forward(self, tokens: Mapping[int, torch.Tensor], text: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Class probabilities (B, 2, H, W) at ``size``: per-layer similarities S_l = F_l . T averaged over
        layers, divided by the temperature, upsampled bilinearly (align_corners=True), softmaxed."""
        sims = torch.stack([f @ text for f in self.patch_features(tokens)]).mean(dim=0).permute(0, 3, 1, 2)
        if self.temperature is not None:
            sims = sims / self.temperature
        sims = F.interpolate(sims, size=tuple(size), mode="bilinear", align_corners=True)
        return sims.softmax(dim=1)
