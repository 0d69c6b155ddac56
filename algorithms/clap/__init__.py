"""CLAP (Park et al., 2024): M2IB attention from positive minus negative prompts masks
suspected lesions, which an EAR-style U-Net inpaints; the score is the MSGMS error."""

from algorithms.clap.algorithm import Clap

__all__ = ["Clap"]
