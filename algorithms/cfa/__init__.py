"""CFA (Lee et al., IEEE Access 2022) through anomalib: coupled-hypersphere feature adaptation."""

from algorithms.cfa.algorithm import Cfa

__all__ = ["Cfa"]
