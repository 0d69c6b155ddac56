"""MaPLe's multi-modal prompts (Khattak et al., CVPR 2023) on a frozen open_clip CLIP.

Text: "[sot] ctx_1 .. ctx_n {rest of ctx_init} {class} . [eot]" — the context vectors replace
the first n tokens of ``ctx_init`` (initialised from their embeddings: "a photo" of "a photo of
a"), as MaPLe's prompt learner does. Before text blocks 1 .. depth-1 the n context rows are
replaced by fresh learned vectors (deep prompts, N(0, 0.02)). Vision: one linear coupler per
depth maps each text prompt to the vision width; the first one's output is appended as n extra
tokens after the positional embedding (so ``ln_pre`` normalises them too), and before vision
blocks 1 .. depth-1 those n tokens are replaced by the next coupler's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from algorithms.clip import encode_image, encode_text_embeddings, with_context
from algorithms.ppad.torch_model import CLASSES, clip_widths


class MultiModalPrompts(nn.Module):
    """MaPLe's prompts: ``ctx`` (n, text width), ``deep_text`` (depth - 1 of them) and ``couplers``
    (depth Linear(text width -> vision width) layers, bias included).

    ``prompt_depth`` is capped at the smaller tower's number of blocks (``depth``): the tiny test
    CLIP has 2 text blocks.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        *,
        classes: Sequence[str] = CLASSES,
        n_ctx: int = 2,
        ctx_init: str = "a photo of a",
        prompt_depth: int = 9,
    ) -> None:
        super().__init__()
        if n_ctx < 1 or prompt_depth < 1:
            raise ValueError("MaPLe needs n_ctx >= 1 and prompt_depth >= 1")
        dims = clip_widths(clip)
        self.n_ctx = n_ctx
        self.depth = min(prompt_depth, len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))
        self.classes = tuple(classes)
        prefix = ctx_init.strip() or " ".join(["X"] * n_ctx)
        ids = tokenizer([f"{prefix} {c}." for c in self.classes])
        if ctx_init.strip():
            init_ids = tokenizer([prefix])[0]
            if int((init_ids > 0).sum()) - 2 < n_ctx:  # [sot] ... [eot]
                raise ValueError(f"ctx_init {ctx_init!r} has fewer than n_ctx={n_ctx} tokens")
            with torch.no_grad():
                ctx = clip.token_embedding(init_ids[1 : 1 + n_ctx].to(clip.token_embedding.weight.device)).cpu().clone()
        else:
            ctx = torch.randn(n_ctx, dims["text"]) * 0.02
        self.ctx = nn.Parameter(ctx.float())
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, dims["text"]) * 0.02) for _ in range(self.depth - 1)]
        )
        self.couplers = nn.ModuleList([nn.Linear(dims["text"], dims["vision"]) for _ in range(self.depth)])
        self.register_buffer("token_ids", ids, persistent=False)

    def text_features(self, clip: nn.Module) -> torch.Tensor:
        """Text features (C, E), not normalised."""
        n = self.n_ctx
        starts = torch.ones(len(self.classes), dtype=torch.long)
        emb = with_context(clip.token_embedding(self.token_ids), self.ctx, starts)

        def deep(i: int, x: torch.Tensor) -> torch.Tensor:
            if not 1 <= i < self.depth:
                return x
            ctx = self.deep_text[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :1], ctx, x[:, 1 + n :]], dim=1)

        return encode_text_embeddings(clip, emb, self.token_ids, before_block=deep)

    def visual_prompts(self) -> list[torch.Tensor]:
        """The (n, vision width) prompts for vision blocks 0 .. depth-1."""
        texts = [self.ctx, *self.deep_text]
        return [coupler(t) for coupler, t in zip(self.couplers, texts)]

    def image_features(self, clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Image features (B, E) of prepared images, not normalised."""
        prompts = self.visual_prompts()
        ln_pre = clip.visual.ln_pre

        def deep(i: int, x: torch.Tensor) -> torch.Tensor:
            if i >= self.depth:
                return x
            p = prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
            if i == 0:  # appended after the positional embedding, so normalised by ln_pre like the rest
                return torch.cat([x, ln_pre(p)], dim=1)
            return torch.cat([x[:, : -self.n_ctx], p], dim=1)

        return encode_image(clip, images, before_block=deep).pooled
