"""SimpleNet (Liu et al., CVPR 2023): adapted pretrained patch features vs. Gaussian-noised copies, told apart by a small discriminator."""

from algorithms.simplenet.algorithm import SimpleNet

__all__ = ["SimpleNet"]
