"""MaPLe (Khattak et al., CVPR 2023), multi-modal prompt learning, as PPAD's baseline on CheXzero.
Registers ``maple``."""

from algorithms.maple.algorithm import MaPLe
from algorithms.maple.torch_model import MultiModalPrompts

__all__ = ["MaPLe", "MultiModalPrompts"]
