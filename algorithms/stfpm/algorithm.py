"""STFPM with BMAD's settings: SGD lr 0.4, momentum 0.9, weight decay 1e-4; 100 epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.registry import register
from bmad.weights import load_into


@register("stfpm_r18", backbone="resnet18")
@register("stfpm")
class Stfpm(AnomalibTrainedAlgorithm):
    """anomalib's ``Stfpm``: a pretrained teacher, a randomly initialised student trained to
    match its features; maps are the raw feature distances."""

    family = "teacher-student"
    pixel_level = True
    channels = 3
    anomalib_class = "Stfpm"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        epochs: int = 100,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 224,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Stfpm``."""
        return {"backbone": self.backbone, "layers": list(self.layers)}

    def load_pretrained(self, lm: nn.Module, state_dict: dict[str, Any], source: str) -> None:
        """The teacher gets the pretrained weights (anomalib would download them itself)."""
        load_into(lm.model.teacher_model.feature_extractor, state_dict, source=source)

    def make_optimizers(self, lm: nn.Module) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """BMAD's SGD (anomalib's default weight decay is 1e-3) on the student only."""
        opt = torch.optim.SGD(lm.model.student_model.parameters(), lr=self.lr, momentum=self.momentum,
                              dampening=0.0, weight_decay=self.weight_decay)
        return [opt], []
