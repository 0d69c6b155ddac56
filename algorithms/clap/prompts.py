"""CLAP's positive / negative language prompts per anatomy (Table 1 of the paper).

Each prompt is one comma-separated string, as printed in the paper ("words recommended
by ChatGPT that refer to lesions"); the text encoder reads the whole string. The bench
name is not passed to algorithms, so the anatomy is a constructor parameter
(``--param anatomy=brain``); bench keys are accepted as aliases.
"""

from __future__ import annotations

from typing import NamedTuple


class PromptPair(NamedTuple):
    """A positive (lesion) and a negative (normal) prompt."""

    positive: str
    negative: str


PROMPTS: dict[str, PromptPair] = {
    # Table 1, "Brain MRI" (BraTS2021)
    "brain": PromptPair("Glioma, Astrocytoma, Oligodendroglioma", "Normal, Healthy gray matter"),
    # Table 1, "Liver CT" (BTCV + LiTS)
    "liver": PromptPair("Malignant cells, Dysplasia, Hyperplasia", "Normal, Healthy, Benign"),
    # Table 1, "Retinal OCT" (RESC and OCT2017)
    "retina": PromptPair("Retinal fluid, Drusen, Retinal detachment", "Normal, Healthy, Clear"),
    # Table 1, "Chest X-ray" (RSNA)
    "chest": PromptPair("Consolidation, Fibrosis, Atelectasis", "Healthy, Clear fields, Normal"),
    # Table 1, "Lymph node" (Camelyon16 histopathology)
    "histopathology": PromptPair("Metastatic carcinoma, Tumor metastasis", "Normal, Healthy tissue"),
    # ASSUMED: not in the paper; the default when no anatomy is given
    "generic": PromptPair("Lesion, Tumor, Abnormality", "Normal, Healthy"),
}

ALIASES: dict[str, str] = {
    "brats2021": "brain",
    "brain_mri": "brain",
    "liver_ct": "liver",
    "resc": "retina",
    "oct2017": "retina",
    "oct": "retina",
    "retinal_oct": "retina",
    "rsna": "chest",
    "chest_xray": "chest",
    "camelyon16": "histopathology",
    "lymph_node": "histopathology",
}


def prompts_for(anatomy: str) -> PromptPair:
    """The prompt pair of ``anatomy`` (a key of :data:`PROMPTS` or a bench alias)."""
    key = anatomy.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in PROMPTS:
        known = ", ".join(sorted(PROMPTS) + sorted(ALIASES))
        raise ValueError(f"unknown CLAP anatomy {anatomy!r}; known: {known}")
    return PROMPTS[key]
