"""GANomaly with BMAD's settings: Adam lr 2e-4, betas (0.5, 0.999); loss weights adversarial 1,
reconstruction 50, encoder 1; 100 epochs; image-level only."""

from __future__ import annotations

from typing import Any

from algorithms.anomalib_adapter import AnomalibTrainedAlgorithm
from bmad.registry import register


@register("ganomaly")
class Ganomaly(AnomalibTrainedAlgorithm):
    """anomalib's ``Ganomaly``; image-level only: the raw distance between the two latent codes.

    Generator (encoder-decoder-encoder) and discriminator trained adversarially (manual
    optimisation: a generator step, then a discriminator step per batch); the score is
    the distance between the two latent codes. **Image-level only**
    (``pixel_level = False``): there is no map.

    - Epochs: 100, from anomalib's example config ``examples/configs/model/ganomaly.yaml``
      (BMAD trained with anomalib's default configs and does not state epochs).
    - Scores are raw: anomalib min-max normalises them over each validation/test run in
      its Lightning hooks, which the wrapper does not run (normalising per test set is
      monotone and does not change AUROC).
    - Input: padded with zeros to the next power of two inside the model (224 -> 256:
      the network is built for and runs at 256 px); ``input_size`` is fixed at build.
    - History: ``train_loss`` is the generator loss; ``discriminator_loss`` beside it.
    - No pretrained weights.
    """

    family = "reconstruction (GAN)"
    pixel_level = False
    channels = 3
    needs_input_size = True
    anomalib_class = "Ganomaly"

    def __init__(
        self,
        n_features: int = 64,
        latent_vec_size: int = 100,
        extra_layers: int = 0,
        add_final_conv_layer: bool = True,
        wadv: float = 1,
        wcon: float = 50,
        wenc: float = 1,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        epochs: int = 100,
        batch_size: int = 32,
        eval_every: int = 10,
        patience: int | None = None,
        input_size: int | tuple[int, int] | None = 224,
    ) -> None:
        self.n_features = n_features
        self.latent_vec_size = latent_vec_size
        self.extra_layers = extra_layers
        self.add_final_conv_layer = add_final_conv_layer
        self.wadv = wadv
        self.wcon = wcon
        self.wenc = wenc
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        super().__init__(input_size=input_size, pretrained=False, weights=None)

    def model_kwargs(self) -> dict[str, Any]:
        """Hyper-parameters of ``anomalib.models.Ganomaly`` (its optimisers read lr and betas)."""
        return {
            "batch_size": self.batch_size,
            "n_features": self.n_features,
            "latent_vec_size": self.latent_vec_size,
            "extra_layers": self.extra_layers,
            "add_final_conv_layer": self.add_final_conv_layer,
            "wadv": self.wadv,
            "wcon": self.wcon,
            "wenc": self.wenc,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
        }

    def step_losses(self, out: Any) -> dict[str, float]:
        """Generator loss as ``train_loss``, plus the discriminator loss."""
        return {"train_loss": float(out["generator_loss"].detach()),
                "discriminator_loss": float(out["discriminator_loss"].detach())}
