"""PatchCore with BMAD's settings: wide_resnet50_2, layer2+layer3, coreset 0.1, 9 neighbours."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from algorithms.anomalib_adapter import AnomalibAlgorithm
from algorithms.patchcore.coreset import coreset
from bmad.registry import register


@register("patchcore_r18", backbone="resnet18")
@register("patchcore")
class PatchCore(AnomalibAlgorithm):
    """anomalib's ``Patchcore``; scores and maps are the raw nearest-neighbour distances."""

    family = "memory bank"
    pixel_level = True
    channels = 3
    anomalib_class = "Patchcore"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        input_size: int | tuple[int, int] | None = 224,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.coreset_sampling_ratio = coreset_sampling_ratio
        self.num_neighbors = num_neighbors
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def fit_memory_bank(self, lm: Any) -> None:
        """anomalib's ``fit()`` (stack the embeddings, k-center-greedy coreset) with the same selection
        done in place (:func:`algorithms.patchcore.coreset.coreset`): same indices, no per-point temporaries."""
        model = lm.model
        if not model.embedding_store:
            raise ValueError("PatchCore.fit: no embeddings were collected")
        embedding = torch.vstack(model.embedding_store)
        model.embedding_store.clear()
        model.memory_bank = coreset(embedding, self.coreset_sampling_ratio)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Patchcore``."""
        return {
            "backbone": self.backbone,
            "layers": list(self.layers),
            "coreset_sampling_ratio": self.coreset_sampling_ratio,
            "num_neighbors": self.num_neighbors,
        }
