"""PPAD's structure-preserving anomaly synthesis (SAS): distance-weighted gamma correction in a random lesion.

Steps (METHODS_CLIP.md section 1): a hull+Bezier lesion (:func:`bezier_lesion_shape`) of
width and height ``randint[round(0.2 S), round(0.8 S))`` is drawn on a square canvas, centred
at a point uniform in the view region's bounding box and shifted back inside the image;
``gamma = 1 + D / max(D) * w`` with D the Euclidean distance transform inside the lesion and
w uniform in :data:`SAS_WEIGHTS`; ``I' = clamp((I / 255)^gamma * 255, 0, 255)``, rounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from algorithms.synthesis.shapes import bezier_lesion_shape

SAS_WEIGHTS: tuple[float, ...] = (-0.999, -0.99, 2.0, 3.0)


@dataclass(frozen=True)
class SASLesion:
    """One SAS draw: the lesion mask (bool, image size), the centre drawn in the region's
    bounding box (row, column) and the gamma weight w."""

    mask: np.ndarray
    centre: tuple[int, int]
    weight: float


def _bounding_box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        raise ValueError("the SAS region is empty")
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def draw_sas_lesion(
    shape: tuple[int, int],
    region: np.ndarray | None,
    rng: np.random.Generator,
    *,
    size_range: tuple[float, float] = (0.2, 0.8),
    weights: Sequence[float] = SAS_WEIGHTS,
    n_points: int = 10,
    control_std: float = 8.0,
) -> SASLesion:
    """Draw a lesion for an image of ``shape`` (H, W) inside ``region``'s bounding box (None: whole image).

    Widths are drawn from the image width, heights from its height (the same S for PPAD's 224 x 224).
    """
    height, width = shape
    if region is None:
        r0, r1, c0, c1 = 0, height - 1, 0, width - 1
    else:
        if region.shape != tuple(shape):
            raise ValueError(f"region shape {region.shape} differs from the image's {tuple(shape)}")
        r0, r1, c0, c1 = _bounding_box(np.asarray(region, dtype=bool))
    centre = (int(rng.integers(r0, r1 + 1)), int(rng.integers(c0, c1 + 1)))
    lo, hi = size_range
    w = int(rng.integers(round(lo * width), round(hi * width)))
    h = int(rng.integers(round(lo * height), round(hi * height)))
    canvas = bezier_lesion_shape(w, h, rng, n_points=n_points, control_std=control_std)
    side = canvas.shape[0]
    top = min(max(centre[0] - side // 2, 0), max(height - side, 0))
    left = min(max(centre[1] - side // 2, 0), max(width - side, 0))
    mask = np.zeros(shape, dtype=bool)
    placed = mask[top : top + side, left : left + side]
    placed[...] = canvas[: placed.shape[0], : placed.shape[1]]
    weight = float(weights[int(rng.integers(len(weights)))])
    return SASLesion(mask=mask, centre=centre, weight=weight)


def gamma_map(mask: np.ndarray, weight: float) -> np.ndarray:
    """``1 + D / max(D) * weight`` inside ``mask`` (D: Euclidean distance to the nearest
    pixel outside it, as ``scipy.ndimage.distance_transform_edt``), 1 outside. ``weight > -1``
    keeps gamma positive."""
    gamma = np.ones(mask.shape)
    if not mask.any():
        return gamma
    # The transform only needs the mask's bounding box grown by one pixel: clamping any farther
    # background pixel onto that ring gives a background pixel at least as close.
    r0, r1, c0, c1 = _bounding_box(mask)
    box = slice(max(r0 - 1, 0), r1 + 2), slice(max(c0 - 1, 0), c1 + 2)
    distance = ndimage.distance_transform_edt(mask[box])
    gamma[box] += distance / distance.max() * weight
    return gamma


def apply_sas(image: np.ndarray, lesion: SASLesion) -> np.ndarray:
    """Gamma-correct ``image`` (uint8, H x W or H x W x C) inside ``lesion``; pixels outside are copied."""
    gamma = gamma_map(lesion.mask, lesion.weight)[lesion.mask]
    out = image.copy()
    inside = image[lesion.mask].astype(np.float64) / 255.0
    if inside.ndim == 2:
        gamma = gamma[:, None]
    out[lesion.mask] = np.rint(np.clip(inside**gamma * 255.0, 0.0, 255.0)).astype(np.uint8)
    return out


def sas(
    image: np.ndarray,
    region: np.ndarray | None,
    rng: np.random.Generator,
    *,
    weights: Sequence[float] = SAS_WEIGHTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesise one SAS anomaly in ``image`` (uint8, H x W or H x W x C) within ``region``
    (bool H x W, None: whole image). Returns the new uint8 image and the bool lesion mask."""
    if image.dtype != np.uint8:
        raise TypeError(f"SAS expects a uint8 image, got {image.dtype}")
    lesion = draw_sas_lesion(image.shape[:2], region, rng, weights=weights)
    return apply_sas(image, lesion), lesion.mask
