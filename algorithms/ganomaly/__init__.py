"""GANomaly (Akcay et al., ACCV 2018) through anomalib: an encoder-decoder-encoder GAN."""

from algorithms.ganomaly.algorithm import Ganomaly

__all__ = ["Ganomaly"]
