"""WinCLIP through anomalib 2.7's ``WinClipModel``, with a CLIP built offline (zero- and few-shot)."""

from algorithms.clip.benches import CLASS_NAMES, class_name_for
from algorithms.winclip.algorithm import WinClip, winclip_model

__all__ = ["CLASS_NAMES", "WinClip", "class_name_for", "winclip_model"]
