"""MVFA (Huang et al., CVPR 2024): multi-level visual feature adapters in a frozen CLIP, scored against text
prompts and a few-shot memory bank; normal-only variant trained on synthetic anomalies."""

from algorithms.clip.benches import CLASS_NAMES, bench_key
from algorithms.mvfa.algorithm import IMAGE_LEVEL_BENCHES, MVFA, use_plain_gelu
from algorithms.mvfa.torch_model import (
    RESIDUAL,
    AdaptedFeatures,
    Adapter,
    MVFAAdapters,
    augment_views,
    memory_distance,
    prompt_texts,
    text_features,
)

__all__ = [
    "CLASS_NAMES",
    "IMAGE_LEVEL_BENCHES",
    "MVFA",
    "RESIDUAL",
    "AdaptedFeatures",
    "Adapter",
    "MVFAAdapters",
    "augment_views",
    "bench_key",
    "memory_distance",
    "prompt_texts",
    "text_features",
    "use_plain_gelu",
]
