"""CFLOW-AD (Gudovskiy et al., WACV 2022) through anomalib: conditional normalising flows."""

from algorithms.cflow.algorithm import Cflow

__all__ = ["Cflow"]
