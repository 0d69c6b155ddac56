"""Zero-shot CheXzero: softmax over "normal." / "pneumonia." — the baseline of the PPAD paper."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch

from algorithms.clip import ClipAlgorithm, TextCache, tokenizer_for
from algorithms.ppad.torch_model import CHEXZERO_MEAN, CHEXZERO_MODEL, CHEXZERO_STD, CHEXZERO_WEIGHTS, clip_logits
from bmad.algorithm import Batch, Prediction
from bmad.registry import register


@register("chexzero_zeroshot")
class CheXzeroZeroShot(ClipAlgorithm):
    """CheXzero (Tiu et al., 2022) used zero-shot: score = softmax(exp(logit_scale) * cos(f, t))
    of the second text, with the texts "normal." and "pneumonia." (the PPAD paper's baseline).

    Nothing is trained: :meth:`fit` only builds the model. Preprocessing as PPAD's (grayscale,
    224, CheXzero's mean / std on every channel).
    """

    pixel_level = False
    channels = 1
    mean: ClassVar[tuple[float, float, float]] = CHEXZERO_MEAN
    std: ClassVar[tuple[float, float, float]] = CHEXZERO_STD

    def __init__(
        self,
        clip_model: str = CHEXZERO_MODEL,
        pretrained: bool = True,
        weights: str | None = None,
        image_size: int = 224,
        texts: Sequence[str] = ("normal.", "pneumonia."),
    ) -> None:
        self.texts = tuple(texts)
        if len(self.texts) != 2:
            raise ValueError(f"two texts (normal, anomaly) are needed, got {self.texts}")
        self._text_cache = TextCache()
        self._init_clip(clip_model=clip_model, clip_weights=CHEXZERO_WEIGHTS, image_size=image_size,
                        pretrained=pretrained, weights=weights)

    def fit(self, train: Iterable[Batch], val: Iterable[Batch] | None = None) -> None:
        """Nothing to learn: build the model."""
        self.build()

    def text_features(self) -> torch.Tensor:
        """Features (2, E) of the two texts."""
        clip = self.build()
        return clip.encode_text(tokenizer_for(self.clip_model)(list(self.texts)).to(self.device))

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Image scores only: the probability of the second text."""
        clip = self.build()
        with torch.no_grad():
            x = self.prepare(images)
            text = self._text_cache.get("text", self.text_features)
            logits = clip_logits(clip, clip.encode_image(x), text.expand(x.shape[0], -1, -1))
        return Prediction(logits.softmax(dim=-1)[:, 1].cpu().numpy(), None)
