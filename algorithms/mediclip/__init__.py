"""MediCLIP (Zhang et al., MICCAI 2024): a frozen CLIP with adapters and learned prompts, trained on
synthetic medical anomalies from a few normal images."""

from algorithms.mediclip.algorithm import MediCLIP
from algorithms.mediclip.torch_model import ABNORMAL_WORDS, NORMAL_WORDS, ClassPrompts, MediCLIPHead

__all__ = ["ABNORMAL_WORDS", "NORMAL_WORDS", "ClassPrompts", "MediCLIP", "MediCLIPHead"]
