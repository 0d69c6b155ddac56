"""DRAEM with BMAD's settings: two sub-networks, Adam lr 1e-4; 700 epochs; Perlin-noise
anomalies unless a texture folder is given."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.registry import register


@register("draem")
class Draem(AnomalibTrainedAlgorithm):
    """anomalib's ``Draem``; maps are the discriminator's anomaly probability, the score their maximum.

    A reconstructive U-Net and a discriminative U-Net trained on images with synthetic
    anomalies.

    - Epochs: 700, from anomalib's example config ``examples/configs/model/draem.yaml``
      (BMAD trained with anomalib's default configs and does not state epochs); the
      module's own Adam (BMAD's lr 1e-4, anomalib's too) and its MultiStepLR (x0.1 at
      epochs 400 and 600), stepped once per epoch as Lightning does.
    - Input: [0, 1], not ImageNet-normalised (``imagenet_normalize = False``), as
      anomalib's DRAEM pre-processor; H and W multiples of 32 (``size_multiple``).
    - Synthetic anomalies: anomalib's Perlin generator with textures from ``dtd_dir``
      (any folder of images, e.g. the DTD dataset) when given; with None, Perlin noise
      textures (anomalib would download DTD; bmad never downloads). A ``dtd_dir`` that
      does not exist is an error.
    - No pretrained weights: both sub-networks start from random initialisation.
    """

    family = "reconstruction"
    pixel_level = True
    channels = 3
    size_multiple = 32
    imagenet_normalize = False
    anomalib_class = "Draem"

    def __init__(
        self,
        dtd_dir: str | None = None,
        beta: float | Sequence[float] = (0.1, 1.0),
        enable_sspcab: bool = False,
        sspcab_lambda: float = 0.1,
        lr: float = 1e-4,
        epochs: int = 700,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 224,
    ) -> None:
        if dtd_dir is not None and not Path(dtd_dir).expanduser().is_dir():
            raise FileNotFoundError(f"DRAEM texture folder {dtd_dir} does not exist (bmad does not download DTD; "
                                    "leave dtd_dir unset for Perlin-noise textures)")
        self.dtd_dir = dtd_dir
        self.beta = beta if isinstance(beta, (int, float)) else tuple(float(b) for b in beta)
        self.enable_sspcab = enable_sspcab
        self.sspcab_lambda = sspcab_lambda
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        self._texture_dir: str | None = None
        super().__init__(input_size=input_size, pretrained=False, weights=None)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Draem``."""
        return {
            "dtd_dir": self._texture_dir,
            "beta": self.beta,
            "enable_sspcab": self.enable_sspcab,
            "sspcab_lambda": self.sspcab_lambda,
        }

    def build(self) -> nn.Module:
        """Build with ``dtd_dir``, or with an empty folder (anomalib then uses Perlin noise)."""
        if self._lm is None:
            if self.dtd_dir is not None:
                self._texture_dir = str(Path(self.dtd_dir).expanduser())
                return super().build()
            with tempfile.TemporaryDirectory(prefix="bmad-draem-no-textures-") as empty:
                self._texture_dir = empty
                try:
                    return super().build()
                finally:
                    self._texture_dir = None
        return self._lm

    def optimizer_settings(self) -> dict[str, Any]:
        """BMAD's lr on the module's Adam."""
        return {"lr": self.lr}
