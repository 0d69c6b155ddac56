"""UTRAD (Chen et al., Neural Networks 2022): a U-shaped transformer autoencoder over frozen CNN feature tokens."""

from algorithms.utrad.algorithm import Utrad

__all__ = ["Utrad"]
