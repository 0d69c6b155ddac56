"""PaDiM with BMAD's settings: wide_resnet50_2 with 550 features (``padim_r18``: resnet18 with 100)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from algorithms.anomalib_adapter import AnomalibAlgorithm
from bmad.registry import register


@register("padim_r18", backbone="resnet18", n_features=100)
@register("padim")
class Padim(AnomalibAlgorithm):
    """anomalib's ``Padim``; maps are raw Mahalanobis distances, the score is the map's maximum."""

    family = "memory bank"
    pixel_level = True
    channels = 3
    anomalib_class = "Padim"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        n_features: int = 550,
        input_size: int | tuple[int, int] | None = 224,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.n_features = n_features
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Padim``."""
        return {"backbone": self.backbone, "layers": list(self.layers), "n_features": self.n_features}
