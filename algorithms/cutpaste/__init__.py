"""CutPaste (Li et al., CVPR 2021): a ResNet-18 learns to tell normal images from CutPaste-augmented
ones (3-way: original / rectangle / scar); a Gaussian density on its embeddings of the normal
training images scores test images. Registers ``cutpaste``."""

from algorithms.cutpaste.algorithm import CutPaste
from algorithms.cutpaste.augment import VARIANTS, color_jitter, cutpaste_normal, cutpaste_scar, make_views
from algorithms.cutpaste.torch_model import (
    CutPasteNet,
    GaussianDensity,
    patch_positions,
    receptive_field_upsample,
)

__all__ = [
    "VARIANTS",
    "CutPaste",
    "CutPasteNet",
    "GaussianDensity",
    "color_jitter",
    "cutpaste_normal",
    "cutpaste_scar",
    "make_views",
    "patch_positions",
    "receptive_field_upsample",
]
