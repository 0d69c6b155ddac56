"""MKD (Salehi et al., CVPR 2021): Multiresolution Knowledge Distillation from a VGG16 into a small cloner, with gradient-based localisation."""

from algorithms.mkd.algorithm import Mkd

__all__ = ["Mkd"]
