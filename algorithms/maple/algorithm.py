"""MaPLe as a PPAD baseline: multi-modal prompts on CheXzero, trained like PPAD on normal shots + SAS."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from algorithms.clip import tokenizer_for
from algorithms.maple.torch_model import MultiModalPrompts
from algorithms.ppad.algorithm import PromptAnomalyAlgorithm
from algorithms.ppad.torch_model import CHEXZERO_MODEL, CHEXZERO_WEIGHTS, CLASSES
from bmad.registry import register


@register("maple")
class MaPLe(PromptAnomalyAlgorithm):
    """MaPLe (Khattak et al., CVPR 2023) with the classes "normal" / "pneumonia".

    MaPLe's own settings: 2 context tokens initialised from "a photo of a", prompt depth 9, one
    512 -> 768 coupler per depth (3,555,072 trainable parameters on ViT-B/32). The PPAD paper
    trains it on CheXzero with SAS for 100 epochs on 64 shots; ASSUMED beyond that: PPAD's
    recipe — the whole image as the only view, SAS with probability 0.5, BCE on the two
    logits, SGD lr 1e-3 momentum 0.9, cosine, batch 64, fp32. Score: the anomaly probability.
    """

    def __init__(
        self,
        clip_model: str = CHEXZERO_MODEL,
        pretrained: bool = True,
        weights: str | None = None,
        image_size: int = 224,
        classes: Sequence[str] = CLASSES,
        n_ctx: int = 2,
        ctx_init: str = "a photo of a",
        prompt_depth: int = 9,
        epochs: int = 100,
        lr: float = 1e-3,
        momentum: float = 0.9,
        batch_size: int = 64,
        anomaly_prob: float = 0.5,
    ) -> None:
        self.n_ctx = int(n_ctx)
        self.ctx_init = ctx_init
        self.prompt_depth = int(prompt_depth)
        self._init_prompting(views=("",), classes=classes, epochs=epochs, lr=lr, momentum=momentum,
                             batch_size=batch_size, anomaly_prob=anomaly_prob)
        self._init_clip(clip_model=clip_model, clip_weights=CHEXZERO_WEIGHTS, image_size=image_size,
                        pretrained=pretrained, weights=weights)

    def build_modules(self, clip: nn.Module) -> None:
        """MaPLe's prompts and couplers, sized from ``clip``."""
        self.prompts = MultiModalPrompts(clip, tokenizer_for(self.clip_model), classes=self.classes,
                                         n_ctx=self.n_ctx, ctx_init=self.ctx_init, prompt_depth=self.prompt_depth)

    def text_features(self) -> torch.Tensor:
        """Text features (1, 2, E): one view, the whole image."""
        return self.prompts.text_features(self.build()).unsqueeze(0)

    def image_features(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Image features (B, E) with the coupled deep prompts (``views`` is always the whole image)."""
        return self.prompts.image_features(self.build(), images)
