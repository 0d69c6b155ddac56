"""CFA with BMAD's settings: wide_resnet50_2, 3 neighbours, 3 hard negatives, radius 1e-5,
lr 1e-3, weight decay 5e-4; 30 epochs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.algorithm import Batch
from bmad.registry import register
from bmad.weights import WeightSpec, load_into, torchvision_spec

# torchvision weight enums of the backbones anomalib's CFA supports
_TV_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
    "vgg19_bn": "VGG19_BN_Weights",
}


@register("cfa")
class Cfa(AnomalibTrainedAlgorithm):
    """anomalib's ``Cfa``; maps are raw soft-min distances to the memory bank, the score their maximum.

    A frozen torchvision CNN, a trained CoordConv patch descriptor and a memory bank of
    target-oriented features (the centroid of the training features, computed before
    the first epoch as anomalib's ``on_train_start`` does).

    - Epochs: 30, from anomalib's example config ``examples/configs/model/cfa.yaml``
      (BMAD trained with anomalib's default configs and does not state epochs).
    - Optimiser: the module's own AdamW (amsgrad) with BMAD's lr 1e-3 and weight decay
      5e-4 (anomalib's values too); the module's own ``backward`` (it keeps the graph).
    - Square input only (the descriptor resizes features to a square): ``square = True``.
    - Pretrained weights: torchvision's ``IMAGENET1K_V1`` (what the original code and
      the anomalib versions BMAD used loaded; anomalib 2.7 itself loads ``DEFAULT``,
      which is V2 for wide_resnet50_2). Another file can be given with ``weights``.
    """

    family = "memory bank"
    pixel_level = True
    channels = 3
    square = True
    anomalib_class = "Cfa"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        gamma_c: int = 1,
        gamma_d: int = 1,
        num_nearest_neighbors: int = 3,
        num_hard_negative_features: int = 3,
        radius: float = 1e-5,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        epochs: int = 30,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 224,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        if backbone not in _TV_WEIGHTS:
            raise ValueError(f"CFA backbone must be one of {sorted(_TV_WEIGHTS)}, got {backbone!r}")
        self.backbone = backbone
        self.gamma_c = gamma_c
        self.gamma_d = gamma_d
        self.num_nearest_neighbors = num_nearest_neighbors
        self.num_hard_negative_features = num_hard_negative_features
        self.radius = radius
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Cfa``."""
        return {
            "backbone": self.backbone,
            "gamma_c": self.gamma_c,
            "gamma_d": self.gamma_d,
            "num_nearest_neighbors": self.num_nearest_neighbors,
            "num_hard_negative_features": self.num_hard_negative_features,
            "radius": self.radius,
        }

    def weights_spec(self) -> WeightSpec:
        """torchvision's V1 ImageNet weights of the backbone."""
        return torchvision_spec(f"{_TV_WEIGHTS[self.backbone]}.IMAGENET1K_V1")

    def load_pretrained(self, lm: nn.Module, state_dict: dict[str, Any], source: str) -> None:
        """Into the torchvision feature extractor (anomalib would download DEFAULT weights)."""
        load_into(lm.model.feature_extractor, state_dict, source=source)

    def frozen_modules(self, lm: nn.Module) -> list[nn.Module]:
        """The backbone runs under ``no_grad`` in anomalib: only the descriptor is trained."""
        return [lm.model.feature_extractor]

    def optimizer_settings(self) -> dict[str, Any]:
        """BMAD's lr and weight decay on the module's AdamW."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def on_fit_start(self, lm: nn.Module, train: Iterable[Batch]) -> None:
        """anomalib's ``on_train_start``: the memory bank is the centroid of the training features."""
        lm.model.initialize_centroid(data_loader=self.image_batches(train))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2] != images.shape[-1]:
            raise ValueError(f"CFA needs square input, got {tuple(images.shape[-2:])} (the harness makes it "
                             "square when it honours the algorithm's `square` attribute)")
        return super()._prepare(images)
