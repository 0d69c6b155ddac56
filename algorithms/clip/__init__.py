"""Shared CLIP machinery: offline model building, block-by-block encoders, learned prompts."""

from algorithms.clip.base import ClipAlgorithm
from algorithms.clip.encode import (
    VisionOutput,
    batch_first,
    encode_image,
    encode_text_embeddings,
    encode_text_layers,
    normalize,
    patch_embed,
    project_tokens,
    run_blocks,
)
from algorithms.clip.models import (
    OPENAI_MEAN,
    OPENAI_STD,
    TINY_CLIP,
    build_clip,
    freeze,
    load_clip_weights,
    register_tiny,
    tokenizer_for,
    weight_spec,
)
from algorithms.clip.prompts import TextCache, prompt_ids, with_context

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "TINY_CLIP",
    "ClipAlgorithm",
    "TextCache",
    "VisionOutput",
    "batch_first",
    "build_clip",
    "encode_image",
    "encode_text_embeddings",
    "encode_text_layers",
    "freeze",
    "load_clip_weights",
    "normalize",
    "patch_embed",
    "project_tokens",
    "prompt_ids",
    "register_tiny",
    "run_blocks",
    "tokenizer_for",
    "weight_spec",
    "with_context",
]
