"""RD4AD (Deng & Li, CVPR 2022) through anomalib: reverse distillation from a one-class embedding."""

from algorithms.rd4ad.algorithm import Rd4ad

__all__ = ["Rd4ad"]
