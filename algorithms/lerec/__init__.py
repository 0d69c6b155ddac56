"""The BMAD thesis method (Bao 2024): language-enhanced reconstruction with per-patch CLIP prompts."""

from algorithms.lerec.algorithm import Lerec
from algorithms.lerec.augment import laplacian_enhance, low_frequency, pyr_down, pyr_up
from algorithms.lerec.torch_model import Adapter, LerecHead, anomaly_map, reconstruction_loss

__all__ = [
    "Adapter",
    "Lerec",
    "LerecHead",
    "anomaly_map",
    "laplacian_enhance",
    "low_frequency",
    "pyr_down",
    "pyr_up",
    "reconstruction_loss",
]
