"""STFPM (Wang et al., BMVC 2021) through anomalib: student-teacher feature pyramid matching."""

from algorithms.stfpm.algorithm import Stfpm

__all__ = ["Stfpm"]
