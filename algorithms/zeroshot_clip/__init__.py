"""Zero-shot CLIP baselines: CheXzero with "normal." / "pneumonia." (``chexzero_zeroshot``)."""

from algorithms.zeroshot_clip.algorithm import CheXzeroZeroShot

__all__ = ["CheXzeroZeroShot"]
