"""WinCLIP through anomalib 2.7's ``WinClipModel``, with a CLIP built offline (zero- and few-shot)."""

from algorithms.winclip.algorithm import CLASS_NAMES, WinClip, class_name_for, winclip_model

__all__ = ["CLASS_NAMES", "WinClip", "class_name_for", "winclip_model"]
