"""PPAD (Sun et al., MICCAI 2024): position-guided text and image prompts on frozen CheXzero,
trained on normal chest X-rays with structure-preserving synthetic anomalies (SAS).
Registers ``ppad`` and ``coop`` (CoOp: the whole-image view, text context only)."""

from algorithms.ppad.algorithm import PPAD, PromptAnomalyAlgorithm, combine_views
from algorithms.ppad.torch_model import CHEXZERO_FILE, CHEXZERO_MODEL, CHEXZERO_WEIGHTS, PositionPrompts
from algorithms.ppad.views import VIEW_NAMES, VIEWS, View, get_view

__all__ = [
    "CHEXZERO_FILE",
    "CHEXZERO_MODEL",
    "CHEXZERO_WEIGHTS",
    "PPAD",
    "VIEWS",
    "VIEW_NAMES",
    "PositionPrompts",
    "PromptAnomalyAlgorithm",
    "View",
    "combine_views",
    "get_view",
]
