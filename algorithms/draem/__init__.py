"""DRAEM (Zavrtanik et al., ICCV 2021) through anomalib: reconstruction + discriminative sub-networks."""

from algorithms.draem.algorithm import Draem

__all__ = ["Draem"]
