"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): a WGAN-GP learns normal anatomy, an
izi_f encoder maps images into its latent space; the image + critic-feature residual of
x -> G(E(x)) is the anomaly score. Registers ``fanogan``."""

from algorithms.fanogan.algorithm import FAnoGAN
from algorithms.fanogan.torch_model import (
    ARCHITECTURES,
    DCGANCritic,
    DCGANEncoder,
    DCGANGenerator,
    ResNetCritic,
    ResNetEncoder,
    ResNetGenerator,
    anomaly_score,
    build_networks,
    gradient_penalty,
    izif_loss,
    izif_terms,
)

__all__ = [
    "ARCHITECTURES",
    "DCGANCritic",
    "DCGANEncoder",
    "DCGANGenerator",
    "FAnoGAN",
    "ResNetCritic",
    "ResNetEncoder",
    "ResNetGenerator",
    "anomaly_score",
    "build_networks",
    "gradient_penalty",
    "izif_loss",
    "izif_terms",
]
