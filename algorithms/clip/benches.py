"""The object word CLIP prompts use per BMAD bench, read from an image's bench folder."""

from __future__ import annotations

import os
from pathlib import Path

CLASS_NAMES: dict[str, str] = {
    "brain": "Brain",
    "brats2021": "Brain",
    "liver": "Liver",
    "retina_resc": "retinal OCT",
    "resc": "retinal OCT",
    "retina_oct2017": "retinal OCT",
    "oct2017": "retinal OCT",
    "chest": "Chest X-ray film",
    "rsna": "Chest X-ray film",
    "histopathology": "histopathological image",
    "camelyon16": "histopathological image",
    "zhanglab": "Chest X-ray film",
    "chexpert": "Chest X-ray film",
    "vindr": "Chest X-ray film",
    "brainmri": "Brain",
    "busi": "breast ultrasound",
}
"""Prompt word per bench (BMAD's folder names and bench keys, lower case; the CLIP papers' benches'
folder names are their keys), as WinCLIP's and MVFA's medical prompts name them ("breast
ultrasound": our word, neither names BUSI)."""

FALLBACK_CLASS = "object"
"""The word for benches not in :data:`CLASS_NAMES` (anomalib's own fallback)."""


def bench_key(path: str | os.PathLike) -> str | None:
    """The lower-case bench folder of an image in BMAD's layout (``<Bench>/train/...``), or None."""
    parts = Path(path).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in ("train", "valid", "test"):
            return parts[i - 1].lower()
    return None


def class_name_for(path: str | os.PathLike) -> str:
    """The prompt word for an image of a bench in BMAD's layout, from its bench folder."""
    return CLASS_NAMES.get(bench_key(path) or "", FALLBACK_CLASS)
