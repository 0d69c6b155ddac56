"""PPAD's learnable prompts on a frozen CLIP: a generic text context and a patch-level image prompt.

Text, per view v and class c: "[sot] {view words} ctx_1 .. ctx_n {c} . [eot]", the n context
vectors shared by every view and class (CoOp's generic context), causal mask, end-of-text
feature. Image, per view v: the patch embeddings E = conv1(x) become
E' = E * m_v + P * (1 - m_v) before the class token and positional embedding are added
(m_v: 1 on the patches the view keeps, see :mod:`algorithms.ppad.views`). Logits are
exp(logit_scale) * cos(f, t_c) with CLIP's own (frozen) logit scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from algorithms.clip import encode_image, encode_text_embeddings, normalize, prompt_ids, with_context
from algorithms.ppad.views import get_view
from bmad.weights import WeightSpec, file_spec

CHEXZERO_FILE = "chexzero/best_64_0.0001_original_35000_0.864.pt"
"""CheXzero's best checkpoint, a plain state dict in OpenAI CLIP ViT-B/32 key names."""

CHEXZERO_WEIGHTS: WeightSpec = file_spec(
    CHEXZERO_FILE,
    obtain="download best_64_0.0001_original_35000_0.864.pt from the CheXzero authors' release "
    "(rajpurkarlab/CheXzero, checkpoints on Google Drive; see docs/algorithms/ppad.md)",
)
"""Where bmad looks for CheXzero: ``$BMAD_WEIGHTS/chexzero/...`` or ``--weights FILE``."""

CHEXZERO_MODEL = "ViT-B-32-quickgelu"
"""The open_clip architecture of CheXzero (OpenAI ViT-B/32, QuickGELU, context 77)."""

CHEXZERO_MEAN = (0.39799, 0.39799, 0.39799)
CHEXZERO_STD = (0.32721, 0.32721, 0.32721)
"""CheXzero's input normalisation (its grayscale mean / std, 101.48761 / 255 and 83.43944 / 255)."""

CLASSES = ("normal", "pneumonia")
"""The class words; the second is the anomaly."""


def clip_widths(clip: nn.Module) -> dict[str, int]:
    """Text width, vision width, patch side and grid side of an open_clip ViT CLIP."""
    visual = clip.visual
    patch = visual.conv1.kernel_size[0]
    grid = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
    return {"text": clip.token_embedding.weight.shape[1], "vision": visual.conv1.out_channels,
            "patch": patch, "grid": grid}


def clip_logits(clip: nn.Module, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) * cos: image features (B, E) against per-sample text features (B, C, E)."""
    return clip.logit_scale.exp() * torch.einsum("be,bce->bc", normalize(image), normalize(text))


class PositionPrompts(nn.Module):
    """PPAD's trainable prompts for one CLIP model.

    ``ctx``: the (n_ctx, text width) generic context, N(0, 0.02); ``image_prompt``: the
    (grid^2, vision width) patch prompt, N(0, 0.02) x 10, or None (CoOp: the image is never
    masked). Buffers: the token ids of the V x C prompts, where each context run starts, and
    the (V, grid^2) keep masks of the views.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        views: Sequence[str],
        *,
        classes: Sequence[str] = CLASSES,
        n_ctx: int = 16,
        image_prompt: bool = True,
    ) -> None:
        super().__init__()
        dims = clip_widths(clip)
        self.views = tuple(views)
        self.classes = tuple(classes)
        self.ctx = nn.Parameter(torch.randn(n_ctx, dims["text"]) * 0.02)
        size = dims["grid"] * dims["patch"]
        self.image_prompt = nn.Parameter(torch.randn(dims["grid"] ** 2, dims["vision"]) * 0.02 * 10) if image_prompt else None
        before = [get_view(v).words for v in self.views for _ in self.classes]
        after = [f"{c}." for _ in self.views for c in self.classes]
        ids, starts = prompt_ids(tokenizer, before, n_ctx, after)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("ctx_starts", starts, persistent=False)
        keep = [torch.from_numpy(get_view(v).patch_keep(size, dims["patch"])).flatten() for v in self.views]
        self.register_buffer("keep", torch.stack(keep).float(), persistent=False)

    def text_features(self, clip: nn.Module) -> torch.Tensor:
        """Text features (V, C, E) of every view and class (not normalised)."""
        emb = with_context(clip.token_embedding(self.token_ids), self.ctx, self.ctx_starts)
        feats = encode_text_embeddings(clip, emb, self.token_ids)
        return feats.view(len(self.views), len(self.classes), -1)

    def patch_fn(self, views: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``E -> E * m_v + P * (1 - m_v)`` for per-sample view indices ``views`` (B,); None
        without an image prompt."""
        if self.image_prompt is None:
            return None
        m = self.keep[views].unsqueeze(-1)
        prompt = self.image_prompt

        def inject(e: torch.Tensor) -> torch.Tensor:
            return e * m.to(e.dtype) + prompt.to(e.dtype) * (1 - m.to(e.dtype))

        return inject

    def image_features(self, clip: nn.Module, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Image features (B, E) of prepared images, each seen through its view (not normalised)."""
        return encode_image(clip, images, patch_fn=self.patch_fn(views)).pooled
