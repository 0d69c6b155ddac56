"""RD4AD with BMAD's settings: wide_resnet50_2 layer1-3, Adam lr 0.005, betas (0.5, 0.99),
multiplied layer maps, score = max of the map; 200 epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.registry import register
from bmad.weights import load_into


@register("rd4ad")
class Rd4ad(AnomalibTrainedAlgorithm):
    """anomalib's ``ReverseDistillation``; maps are cosine distances multiplied over layers, the score their maximum.

    A frozen pretrained encoder (teacher), a trained one-class bottleneck and a decoder
    (student) that reconstructs the encoder's features.

    - Epochs: 200, from anomalib's example config
      ``examples/configs/model/reverse_distillation.yaml`` (BMAD trained with anomalib's
      default configs and does not state epochs).
    - ``anomaly_map_mode="multiply"`` (BMAD's; anomalib 2.7 defaults to "add").
    - Optimiser: the module's own Adam on bottleneck + decoder with BMAD's lr 0.005 and
      betas (0.5, 0.99) (anomalib's values too).
    - H and W multiples of 32 (``size_multiple``); the map size is fixed at build.
    """

    family = "teacher-student"
    pixel_level = True
    channels = 3
    size_multiple = 32
    needs_input_size = True
    anomalib_class = "ReverseDistillation"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        anomaly_map_mode: str = "multiply",
        lr: float = 0.005,
        betas: Sequence[float] = (0.5, 0.99),
        epochs: int = 200,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 224,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        if anomaly_map_mode not in ("multiply", "add"):
            raise ValueError(f"anomaly_map_mode must be 'multiply' or 'add', got {anomaly_map_mode!r}")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.anomaly_map_mode = anomaly_map_mode
        self.lr = lr
        self.betas = tuple(float(b) for b in betas)
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.ReverseDistillation``."""
        from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode

        return {
            "backbone": self.backbone,
            "layers": list(self.layers),
            "anomaly_map_mode": AnomalyMapGenerationMode(self.anomaly_map_mode),
        }

    def load_pretrained(self, lm: nn.Module, state_dict: dict[str, Any], source: str) -> None:
        """Into the timm encoder (the teacher)."""
        load_into(lm.model.encoder.feature_extractor, state_dict, source=source)

    def frozen_modules(self, lm: nn.Module) -> list[nn.Module]:
        """The encoder runs under ``no_grad`` in anomalib: only bottleneck and decoder are trained."""
        return [lm.model.encoder]

    def optimizer_settings(self) -> dict[str, Any]:
        """BMAD's lr and betas on the module's Adam."""
        return {"lr": self.lr, "betas": self.betas}
