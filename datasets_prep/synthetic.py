"""Synthetic BraTS-like raw data: smooth brain phantoms with ellipsoid tumours.

Used by the tests and by ``bmad demo``. :func:`write_raw` writes
``raw/<id>/<id>_flair.nii.gz`` + ``<id>_seg.nii.gz`` in BraTS's layout (int16
FLAIR, uint8 labels 0/1/2/4, an LPS affine like BraTS2021's), so the real
``brats2021`` reorganizer prepares it. Everything is a function of ``seed`` and
the case index: case ``i`` is the same whatever ``n_cases`` is.

Each case is a skull-stripped ellipsoidal brain with a cortical ribbon, a thin
bright rim at its edge, lateral ventricles (dark, as CSF is on FLAIR), smooth
texture, a bias field and noise; size, shape, position, tilt, intensity scale and
texture vary between patients. Tumour cases carry one or two flattened-ellipsoid
tumours: hyperintense oedema (label 2) around an enhancing core (label 4) that may
hold necrosis (label 1), of varied size, place and contrast. Three cases in seven
(index % 7 in 0, 2, 5) have no tumour inside the slice range (:func:`slice_range`):
0 and 2 none at all, 5 a small one just outside the range where the brain reaches.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bmad.fsutil import write_bytes_atomic

DEMO_CASES = 36
DEMO_SHAPE = (128, 128, 64)


def slice_range(depth: int) -> str:
    """The axial range (``"START:STOP"``) to prepare synthetic volumes of ``depth`` slices with.

    The central 40/64 of the volume (``12:52`` for the demo's 64 slices), which like
    BraTS's 60..99 of 155 keeps the slices with substantial brain.
    """
    return f"{round(depth * 12 / 64)}:{round(depth * 52 / 64)}"


DEMO_SLICES = slice_range(DEMO_SHAPE[2])


def _ellipsoid_radius(grid: tuple[np.ndarray, ...], centre: np.ndarray, axes: np.ndarray, angle: float,
                      power: float = 2.0) -> np.ndarray:
    """Normalised radius of an ellipsoid tilted by ``angle`` in the axial plane (< 1 inside).

    ``power`` > 2 flattens its top and bottom (axial sections stay large nearer the ends).
    """
    dx, dy, dz = (g - c for g, c in zip(grid, centre, strict=True))
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / axes[0]
    v = (-sin * dx + cos * dy) / axes[1]
    return ((u * u + v * v) ** (power / 2) + np.abs(dz / axes[2]) ** power) ** (1 / power)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _tumour(rng: np.random.Generator, grid: tuple[np.ndarray, ...], shape: tuple[int, int, int],
            z_centre: float, z_axis: float, head: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One tumour centred at axial ``z_centre``: its FLAIR gain (0 outside) and labels (2 oedema,
    4 enhancing core, 1 necrosis; 0 outside). It reaches slices ``k`` with ``|k - z_centre| < z_axis``."""
    X, Y, _ = shape
    head_centre, head_axes = head
    # the head's cross-section at this height bounds where the tumour centre may go
    reach = np.sqrt(max(1.0 - ((z_centre - head_centre[2]) / head_axes[2]) ** 2, 0.0))
    offset = rng.uniform(-0.45, 0.45, 2) * head_axes[:2] * reach
    centre = np.array([head_centre[0] + offset[0], head_centre[1] + offset[1], z_centre])
    axes = np.array([rng.uniform(0.07, 0.18) * X, rng.uniform(0.07, 0.18) * Y, z_axis])
    r = _ellipsoid_radius(grid, centre, axes, rng.uniform(0, np.pi), power=4.0)
    core = rng.uniform(0.35, 0.65)
    necrosis = core * rng.uniform(0.0, 0.6)
    # hyperintense oedema ramping up from the rim; core and necrosis with contrasts of their own
    gain = rng.uniform(0.45, 1.1) * np.clip((1 - r) / 0.08, 0, 1)
    gain = np.where(r < core, rng.uniform(0.2, 0.9), gain)
    gain = np.where(r < necrosis, rng.uniform(-0.3, 0.5), gain)
    labels = np.where(r < necrosis, 1, np.where(r < core, 4, 2))
    inside = r < 1
    return np.where(inside, gain, 0).astype(np.float32), np.where(inside, labels, 0).astype(np.uint8)


def make_case(seed: int, index: int, shape: tuple[int, int, int] = DEMO_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR (int16) and segmentation (uint8, labels 0/1/2/4) of synthetic case ``index``, in RAS+ voxel order."""
    rng = np.random.default_rng([seed, index])
    X, Y, Z = shape
    grid = tuple(np.asarray(a, dtype=np.float32) for a in np.meshgrid(
        np.arange(X), np.arange(Y), np.arange(Z), indexing="ij", sparse=True))
    centre = np.array([X / 2 + rng.uniform(-0.04, 0.04) * X, Y / 2 + rng.uniform(-0.04, 0.04) * Y,
                       Z / 2 + rng.uniform(-0.03, 0.03) * Z])
    size = rng.uniform(0.82, 1.0)
    half_length = rng.uniform(0.42, 0.46)  # front to back; the width is 1/1.12 to 1/1.25 of it
    axes = np.array([half_length / rng.uniform(1.12, 1.25) * X, half_length * Y, rng.uniform(0.42, 0.47) * Z]) * size
    axes[2] = max(axes[2], 0.40 * Z)
    tilt = rng.uniform(-0.15, 0.15)
    r_head = _ellipsoid_radius(grid, centre, axes, tilt)
    brain = r_head < 1

    # tissue: white matter 1, cortical ribbon brighter, a thin bright rim at the brain's edge
    # (CSF / dura partial volume left by skull stripping), ventricles dark
    factor = np.ones(shape, np.float32)
    ribbon = rng.uniform(0.09, 0.13)
    factor[(r_head > 1 - ribbon) & brain] = rng.uniform(1.08, 1.2)
    factor[(r_head > 1 - rng.uniform(0.02, 0.035)) & brain] = rng.uniform(1.6, 1.9)
    vent_size = rng.uniform(0.8, 1.2)
    for side in (-1, 1):
        v_centre = centre + np.array([side * 0.12 * axes[0], 0.05 * axes[1], 0.1 * axes[2]])
        v_axes = np.array([0.09 * axes[0], 0.38 * axes[1], 0.28 * axes[2]]) * vent_size
        factor[_ellipsoid_radius(grid, v_centre, v_axes, tilt + side * 0.12) < 1] = rng.uniform(0.25, 0.4)

    seg = np.zeros(shape, np.uint8)
    start, stop = (int(v) for v in slice_range(Z).split(":"))
    tumours = []
    if index % 7 not in (0, 2, 5):  # one or two tumours inside the range
        for _ in range(1 + (rng.random() < 0.3)):
            tumours.append((rng.uniform(start + 6, stop - 6), rng.uniform(12, 24) * Z / 64))
    elif index % 7 == 5:  # a small tumour just outside the range, if the brain reaches there
        z_axis = rng.uniform(3, 5) * Z / 64
        above, below = stop + z_axis + 0.5, start - z_axis - 0.5
        if above < centre[2] + 0.9 * axes[2]:
            tumours.append((above, z_axis))
        elif below > centre[2] - 0.9 * axes[2]:
            tumours.append((below, z_axis))
    for z_centre, z_axis in tumours:
        gain, labels = _tumour(rng, grid, shape, z_centre, z_axis, (centre, axes))
        factor *= 1 + gain * brain
        # enhancing core and necrosis win over another tumour's oedema
        seg = np.where(brain & (labels > 0) & ((seg == 0) | (labels != 2)), labels, seg)

    scale = rng.uniform(150, 600)
    texture = _smooth_noise(rng, shape, rng.uniform(2.0, 2.5)) * rng.uniform(0.04, 0.06)
    u, v, w = ((g - c) / a for g, c, a in zip(grid, centre, axes, strict=True))
    bias = 1 + rng.uniform(-0.08, 0.08) * u + rng.uniform(-0.08, 0.08) * v + rng.uniform(-0.06, 0.06) * w
    noise = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.025, 0.04)
    flair = scale * (factor * bias * (1 + texture) + noise)
    flair = np.where(brain, np.clip(np.rint(flair), 1, 32000), 0).astype(np.int16)
    return flair, seg


def _save(volume: np.ndarray, path: Path) -> None:
    """Save a RAS+ array as a gzipped NIfTI with BraTS2021's LPS affine, byte-reproducibly."""
    X, Y, _ = volume.shape
    affine = np.array([[-1, 0, 0, 0], [0, -1, 0, Y - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(volume[::-1, ::-1, :]), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_raw(raw: Path, *, n_cases: int = DEMO_CASES, seed: int = 0,
              shape: tuple[int, int, int] = DEMO_SHAPE) -> Path:
    """Write ``n_cases`` synthetic cases ``Synth_00000``.. under ``raw`` (BraTS layout); return ``raw``."""
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 sizes >= 16, got {shape}")
    raw = Path(raw)
    for i in range(n_cases):
        case_id = f"Synth_{i:05d}"
        flair, seg = make_case(seed, i, tuple(int(s) for s in shape))
        _save(flair, raw / case_id / f"{case_id}_flair.nii.gz")
        _save(seg, raw / case_id / f"{case_id}_seg.nii.gz")
    return raw
