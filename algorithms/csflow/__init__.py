"""CS-Flow (Rudolph et al., WACV 2022) through anomalib: fully convolutional cross-scale flows."""

from algorithms.csflow.algorithm import Csflow

__all__ = ["Csflow"]
