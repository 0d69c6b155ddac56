"""CFLOW with BMAD's settings: wide_resnet50_2 layers 2-4, 128 condition vectors, 8 coupling
blocks, clamp alpha 1.9, Adam lr 1e-4; 50 epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.algorithm import Prediction
from bmad.registry import register
from bmad.weights import load_into


@register("cflow")
class Cflow(AnomalibTrainedAlgorithm):
    """anomalib's ``Cflow``; raw maps (max minus likelihood, each image scored alone), the score their maximum.

    A frozen timm encoder and one conditional normalising-flow decoder per layer,
    trained on random fibres (manual optimisation: one Adam step per fibre batch of
    ``fiber_batch_size`` feature vectors).

    - Epochs: 50, from anomalib's example config ``examples/configs/model/cflow.yaml``
      (BMAD trained with anomalib's default configs and does not state epochs).
    - Training batches: every layer must give at least ``fiber_batch_size`` fibres, i.e.
      ``batch * ceil(H / 32) * ceil(W / 32) >= 64`` for layer4 (at 224 px: 2 images).
      A smaller batch (e.g. the last one of an epoch) would make anomalib raise; it is
      skipped and counted in the epoch's ``skipped_batches``.
    - Prediction: anomalib's map is ``max - map`` over the likelihoods of the whole batch
      it is given (it subtracts the batch maximum), so scores depend on which images
      share a batch. ``predict_batch_size`` fixes that: images are scored in chunks of
      that many, 1 by default (each image on its own, independent of the test batching
      and order); None scores the incoming batch at once as anomalib's own path does.
    - Maps and scores are otherwise anomalib's raw outputs; the score is the map's maximum.
    """

    family = "flow"
    pixel_level = True
    channels = 3
    anomalib_class = "Cflow"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3", "layer4"),
        fiber_batch_size: int = 64,
        condition_vector: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        permute_soft: bool = False,
        lr: float = 1e-4,
        epochs: int = 50,
        batch_size: int = 32,
        predict_batch_size: int | None = 1,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 224,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.fiber_batch_size = fiber_batch_size
        self.condition_vector = condition_vector
        self.coupling_blocks = coupling_blocks
        self.clamp_alpha = clamp_alpha
        self.permute_soft = permute_soft
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.predict_batch_size = predict_batch_size
        self.eval_every = eval_every
        self.patience = patience
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Cflow`` (its optimiser reads ``lr``)."""
        return {
            "backbone": self.backbone,
            "layers": list(self.layers),
            "fiber_batch_size": self.fiber_batch_size,
            "decoder": "freia-cflow",
            "condition_vector": self.condition_vector,
            "coupling_blocks": self.coupling_blocks,
            "clamp_alpha": self.clamp_alpha,
            "permute_soft": self.permute_soft,
            "lr": self.lr,
        }

    def load_pretrained(self, lm: nn.Module, state_dict: dict[str, Any], source: str) -> None:
        """Into the timm encoder."""
        load_into(lm.model.encoder.feature_extractor, state_dict, source=source)

    def accepts_train_batch(self, images: torch.Tensor) -> bool:
        """At least ``fiber_batch_size`` fibres at every layer (anomalib raises otherwise)."""
        b, _, h, w = images.shape
        reductions = self.build().model.encoder.reductions
        return all(b * -(-h // r) * -(-w // r) >= self.fiber_batch_size for r in reductions)

    def predict_map(self, images: torch.Tensor) -> Prediction:
        """Raw scores and maps, computed ``predict_batch_size`` images at a time."""
        n = images.shape[0]
        chunk = self.predict_batch_size or n
        if chunk >= n:
            return super().predict_map(images)
        parts = [super(Cflow, self).predict_map(images[i : i + chunk]) for i in range(0, n, chunk)]
        return Prediction(scores=np.concatenate([p.scores for p in parts]),
                          maps=np.concatenate([p.maps for p in parts]))
