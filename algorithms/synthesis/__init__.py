"""Anomaly synthesis shared by the CLIP-based methods: PPAD's SAS and MediCLIP's multi-task synthesis.

Every draw comes from a ``numpy.random.Generator``; :func:`rng_for` makes the one for a
(seed, epoch, sample index), so the same triple always gives the same image and mask.
"""

from algorithms.synthesis.rng import rng_for
from algorithms.synthesis.sas import SAS_WEIGHTS, SASLesion, apply_sas, draw_sas_lesion, gamma_map, sas
from algorithms.synthesis.shapes import (
    DeformedShape,
    bezier_lesion_shape,
    deformed_shape,
    fill_polygon,
    perlin_noise,
    perlin_shape,
)
from algorithms.synthesis.tasks import (
    TASKS,
    MediCLIPSynthesis,
    SynthesisResult,
    close_and_fill,
    cut_paste,
    gauss_intensity_change,
    paste,
    poisson_blend,
    random_corner,
    source_deformation,
    source_patch,
)

__all__ = [
    "SAS_WEIGHTS",
    "TASKS",
    "DeformedShape",
    "MediCLIPSynthesis",
    "SASLesion",
    "SynthesisResult",
    "apply_sas",
    "bezier_lesion_shape",
    "close_and_fill",
    "cut_paste",
    "deformed_shape",
    "draw_sas_lesion",
    "fill_polygon",
    "gamma_map",
    "gauss_intensity_change",
    "paste",
    "perlin_noise",
    "perlin_shape",
    "poisson_blend",
    "random_corner",
    "rng_for",
    "sas",
    "source_deformation",
    "source_patch",
]
