"""Learned prompts: token ids with a run of placeholders, filled by context vectors.

A prompt "{before} X X ... X {after}" is tokenized once; the embeddings of the ``n_ctx``
placeholder tokens are then replaced by learned vectors (CoOp's scheme, used by PPAD,
MediCLIP and the prompt-learning baselines) and encoded with
:func:`~algorithms.clip.encode.encode_text_embeddings`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

PLACEHOLDER = "X"


def prompt_ids(tokenizer: Any, before: Sequence[str], n_ctx: int, after: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, L) of "{before[i]} X*n_ctx {after[i]}" and where each X run starts (N,)."""
    if len(before) != len(after):
        raise ValueError("before and after must have the same length")
    texts = [" ".join(p for p in (b, " ".join([PLACEHOLDER] * n_ctx), a) if p) for b, a in zip(before, after)]
    ids = tokenizer(texts)
    x_id = int(tokenizer(PLACEHOLDER)[0, 1])
    starts = []
    for row, text in zip(ids, texts):
        hits = (row == x_id).int()
        run = torch.nn.functional.conv1d(hits.view(1, 1, -1).float(), torch.ones(1, 1, n_ctx)).view(-1)
        found = (run == n_ctx).nonzero()
        if n_ctx and not len(found):
            raise ValueError(f"prompt {text!r} does not fit the tokenizer's context length")
        starts.append(int(found[0]) if n_ctx else 0)
    return ids, torch.tensor(starts)


def with_context(embeddings: torch.Tensor, ctx: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``embeddings`` (N, L, D) with rows ``starts[i] .. starts[i]+n_ctx`` replaced by ``ctx``.

    ``ctx`` is (n_ctx, D) (shared by every prompt) or (N, n_ctx, D); gradients reach it.
    """
    n, n_ctx = embeddings.shape[0], ctx.shape[-2]
    pos = starts.to(embeddings.device).view(-1, 1) + torch.arange(n_ctx, device=embeddings.device)
    rows = torch.arange(n, device=embeddings.device).view(-1, 1).expand(-1, n_ctx)
    out = embeddings.clone()
    out[rows, pos] = ctx.expand(n, -1, -1).to(embeddings.dtype) if ctx.dim() == 2 else ctx.to(embeddings.dtype)
    return out


class TextCache:
    """Text features that do not depend on the image, computed once per key.

    Methods fill it at inference (after training) and clear it whenever the learned
    prompts change; the values are detached.
    """

    def __init__(self) -> None:
        self._store: dict[Hashable, torch.Tensor] = {}

    def get(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached value of ``key``, computing it on first use."""
        if key not in self._store:
            self._store[key] = compute().detach()
        return self._store[key]

    def clear(self) -> None:
        """Forget every cached value."""
        self._store.clear()

    def __len__(self) -> int:
        return len(self._store)
