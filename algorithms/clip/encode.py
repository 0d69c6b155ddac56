"""Running open_clip's towers piece by piece: learned prompts, hooks, intermediate tokens.

open_clip has no API to encode text from token embeddings, to change the patch
embeddings before the positional embedding, or (before 3.x) to return the tokens
after given blocks. These functions run the towers of an open_clip ``CLIP`` model
(``VisionTransformer`` + text ``Transformer``) block by block, with the same maths as
its ``encode_image`` / ``encode_text`` (tests check equality), and work with both
token layouts (open_clip < 2.26 runs its transformers sequence-first, 3.x batch-first).
Tokens handed to hooks and returned are always batch-first (N, L, D).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]
"""``hook(i, tokens)`` -> tokens, called before block ``i`` (0-based) with (N, L, D) tokens."""


def batch_first(transformer: nn.Module) -> bool:
    """Whether an open_clip ``Transformer`` takes (N, L, D) tokens."""
    return bool(getattr(transformer, "batch_first", False))


def run_blocks(
    transformer: nn.Module,
    x: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    before_block: BlockHook | None = None,
    keep: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``transformer``'s residual blocks on (N, L, D) tokens.

    Returns the final tokens and ``{i: tokens after block i}`` for ``i`` in ``keep``.
    ``attn_mask`` may change size when a hook changes the sequence length (it is
    cropped to the current length).
    """
    bf = batch_first(transformer)
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(transformer.resblocks):
        if before_block is not None:
            x = before_block(i, x)
        mask = attn_mask[: x.shape[1], : x.shape[1]] if attn_mask is not None else None
        x = block(x, attn_mask=mask) if bf else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        if i in keep:
            kept[i] = x
    return x, kept


@dataclass
class VisionOutput:
    """What :func:`encode_image` returns.

    ``pooled``: the image embedding (N, E) as ``encode_image`` gives it (not normalised);
    ``tokens``: the last block's tokens after ``ln_post``, class token first (N, 1+P, W);
    ``intermediates``: ``{i: residual tokens after block i}`` (N, 1+P, W), no ``ln_post``.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    intermediates: dict[int, torch.Tensor] = field(default_factory=dict)


def patch_embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The patch embeddings ``conv1(x)`` as (N, P, W) tokens (before class token and positions)."""
    x = visual.conv1(images)
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)


def encode_image(
    model: nn.Module,
    images: torch.Tensor,
    *,
    patch_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    before_block: BlockHook | None = None,
    keep: Sequence[int] = (),
) -> VisionOutput:
    """The vision tower of an open_clip ViT CLIP, with hooks.

    ``patch_fn(E)`` may replace the (N, P, W) patch embeddings before the class token
    and positional embedding are added (PPAD's image prompts); ``before_block`` may
    change the tokens before each block (deep prompts); ``keep`` lists blocks whose
    output tokens are returned.
    """
    visual = model.visual
    x = patch_embed(visual, images)
    if patch_fn is not None:
        x = patch_fn(x)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x, kept = run_blocks(visual.transformer, x, before_block=before_block, keep=keep)
    x = visual.ln_post(x)
    pooled, _ = visual._global_pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return VisionOutput(pooled, x, kept)


def project_tokens(model: nn.Module, tokens: torch.Tensor, *, ln_post: bool = True) -> torch.Tensor:
    """Residual-stream tokens (N, L, W) mapped into the joint embedding space (N, L, E)."""
    visual = model.visual
    x = visual.ln_post(tokens) if ln_post else tokens
    return x @ visual.proj if visual.proj is not None else x


def encode_text_embeddings(
    model: nn.Module,
    embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    causal: bool = True,
    before_block: BlockHook | None = None,
) -> torch.Tensor:
    """Text features (N, E) from token embeddings (N, L, D), e.g. with learned contexts.

    Adds the positional embedding, runs the text transformer (with the causal mask
    unless ``causal=False``), applies ``ln_final`` and projects the end-of-text row
    (the argmax of ``token_ids``), as ``encode_text`` does on ``token_embedding(ids)``.
    """
    x = embeddings + model.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
    mask = model.attn_mask if causal else None
    x, _ = run_blocks(model.transformer, x, attn_mask=mask, before_block=before_block)
    return _text_head(model, x, token_ids)


def encode_text_layers(
    model: nn.Module,
    embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    blocks: Sequence[int],
    *,
    causal: bool = True,
) -> list[torch.Tensor]:
    """Text features (N, E) read after each of ``blocks`` (0-based): the end-of-text row
    of that block's tokens through ``ln_final`` and the projection (as the last block's
    are in :func:`encode_text_embeddings`)."""
    x = embeddings + model.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
    _, kept = run_blocks(model.transformer, x, attn_mask=model.attn_mask if causal else None, keep=blocks)
    return [_text_head(model, kept[b], token_ids) for b in blocks]


def _text_head(model: nn.Module, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised along the last dimension."""
    return F.normalize(x, dim=-1)
