"""PatchCore (Roth et al., CVPR 2022) through anomalib: a coreset memory bank of patch features."""

from algorithms.patchcore.algorithm import PatchCore

__all__ = ["PatchCore"]
