"""PaDiM (Defard et al., ICPR 2021) through anomalib: a Gaussian per patch position."""

from algorithms.padim.algorithm import Padim

__all__ = ["Padim"]
