"""CS-Flow with BMAD's settings: clamp 3, gradient norm clipped to 1, Adam lr 2e-4,
weight decay 1e-5; 240 epochs; image-level only."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.registry import register
from bmad.weights import WeightSpec, load_into, torchvision_spec


@register("csflow")
class Csflow(AnomalibTrainedAlgorithm):
    """anomalib's ``Csflow``; image-level only (as in BMAD): the score is the mean of z**2 / 2.

    EfficientNet-B5 features at three scales (a frozen torchvision backbone) and a
    cross-scale normalising flow; the score is the mean of ``z**2 / 2`` over all scales.
    **Image-level only** (``pixel_level = False``), as BMAD evaluated it: anomalib's
    maps exist but are not returned.

    - Epochs: 240, from anomalib's example config ``examples/configs/model/csflow.yaml``
      (BMAD trained with anomalib's default configs and does not state epochs).
    - Optimiser: the module's own Adam (eps 1e-4, betas (0.5, 0.9)) with BMAD's lr 2e-4
      and weight decay 1e-5 (anomalib's values too); gradients clipped to norm 1 as
      anomalib's Trainer settings ask (``grad_clip_norm``).
    - Input sizes: the three feature scales must halve exactly, so the side must be a
      multiple of 128 (``fixed_sizes``; 224 fails): 256 by default (BMAD's 224 is not
      possible; the harness picks the nearest fixed size).
    - Pretrained weights: torchvision's ``EfficientNet_B5_Weights.IMAGENET1K_V1``
      (hard-coded in anomalib, which would download them itself).
    """

    family = "flow"
    pixel_level = False
    channels = 3
    fixed_sizes = (128, 256, 384, 512, 640, 768, 896, 1024)
    needs_input_size = True
    grad_clip_norm: ClassVar[float | None] = 1.0
    anomalib_class = "Csflow"

    def __init__(
        self,
        cross_conv_hidden_channels: int = 1024,
        n_coupling_blocks: int = 4,
        clamp: int = 3,
        lr: float = 2e-4,
        weight_decay: float = 1e-5,
        epochs: int = 240,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 256,
        pretrained: bool = True,
        weights: str | None = None,
    ) -> None:
        self.cross_conv_hidden_channels = cross_conv_hidden_channels
        self.n_coupling_blocks = n_coupling_blocks
        self.clamp = clamp
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        super().__init__(input_size=input_size, pretrained=pretrained, weights=weights)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Csflow``."""
        return {
            "cross_conv_hidden_channels": self.cross_conv_hidden_channels,
            "n_coupling_blocks": self.n_coupling_blocks,
            "clamp": self.clamp,
            "num_channels": 3,
        }

    def weights_spec(self) -> WeightSpec:
        """torchvision's EfficientNet-B5 ImageNet weights (the only ones anomalib uses)."""
        return torchvision_spec("EfficientNet_B5_Weights.IMAGENET1K_V1")

    def load_pretrained(self, lm: nn.Module, state_dict: dict[str, Any], source: str) -> None:
        """Into the EfficientNet-B5 graph up to ``features.6.8`` (the head is ignored)."""
        load_into(lm.model.feature_extractor.feature_extractor.feature_extractor, state_dict, source=source)

    def frozen_modules(self, lm: nn.Module) -> list[nn.Module]:
        """The backbone runs under ``no_grad`` in anomalib: only the flow is trained."""
        return [lm.model.feature_extractor]

    def optimizer_settings(self) -> dict[str, Any]:
        """BMAD's lr and weight decay on the module's Adam."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}
