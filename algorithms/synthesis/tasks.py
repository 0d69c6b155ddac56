"""MediCLIP's anomaly synthesis tasks (CutPaste, GaussIntensityChange, Source, Identity) and their composer.

Task functions work on one shape placed with its top-left ``corner`` (row, column): they take
an image on the 0-255 scale (any numeric dtype, H x W or H x W x C), draw what they need from
``rng`` and return a float64 copy of the same shape in which only the shape's pixels changed.
:class:`MediCLIPSynthesis` draws the task, the shapes and their positions, and returns the
image in its input dtype with a bool label mask (METHODS_CLIP.md section 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

from algorithms.synthesis.shapes import DeformedShape, deformed_shape, perlin_shape

TASKS: tuple[str, ...] = ("cut_paste", "gauss_intensity_change", "source", "identity")


def _channels_last(image: np.ndarray) -> np.ndarray:
    """A float64 H x W x C copy."""
    x = np.array(image, dtype=np.float64)
    return x[..., None] if x.ndim == 2 else x


def _patch(corner: Sequence[int], size: tuple[int, int]) -> tuple[slice, slice]:
    return slice(int(corner[0]), int(corner[0]) + size[0]), slice(int(corner[1]), int(corner[1]) + size[1])


def random_corner(size: tuple[int, int], image_size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """A top-left corner, uniform over the positions where a ``size`` patch fits in the image."""
    if size[0] > image_size[0] or size[1] > image_size[1]:
        raise ValueError(f"a {size} patch does not fit in a {image_size} image")
    return int(rng.integers(0, image_size[0] - size[0], endpoint=True)), int(
        rng.integers(0, image_size[1] - size[1], endpoint=True)
    )


# ---------------------------------------------------------------------------------------------
# CutPaste


def source_patch(
    source: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    max_rotation: float = np.pi / 4,
    scale_rate: float = 0.1,
    max_source_fraction: float = 0.8,
) -> np.ndarray:
    """Cut a ``size`` patch (float64, H x W x C) out of ``source``: rotated by U(+-max_rotation)
    radians, scaled by s = 1 + Exp(scale_rate) or 1/s (capped so the read region spans at most
    ``max_source_fraction`` of the source), read at a random place with cubic interpolation and
    clipped to the source's per-channel range."""
    src = _channels_last(source)
    angle = rng.uniform(-max_rotation, max_rotation)
    c, s = np.cos(angle), np.sin(angle)
    matrix = np.array([[c, -s], [s, c]])  # maps patch coordinates to source coordinates
    box = np.array([[0, 0], [0, size[1]], [size[0], 0], [size[0], size[1]]], dtype=float)

    def extent(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = box @ m.T
        low = np.floor(corners.min(axis=0))
        return low, np.ceil(corners.max(axis=0)) - low

    _, span = extent(matrix)
    max_scale = float(np.min(max_source_fraction * np.array(src.shape[:2]) / span))
    change = 1.0 + rng.exponential(scale_rate)
    scale = min((change, 1.0 / change)[int(rng.integers(2))], max_scale)
    matrix = matrix * scale
    low, span = extent(matrix)
    span = span.astype(int)
    origin = random_corner((int(span[0]), int(span[1])), src.shape[:2], rng)
    region = src[_patch(origin, (int(span[0]), int(span[1])))]
    channels = [
        ndimage.affine_transform(region[..., k], matrix, offset=-low, output_shape=tuple(size), order=3)
        for k in range(src.shape[2])
    ]
    patch = np.stack(channels, axis=-1)
    return np.clip(patch, src.min(axis=(0, 1)), src.max(axis=(0, 1)))


def poisson_blend(image: np.ndarray, patch: np.ndarray, mask: np.ndarray, corner: Sequence[int]) -> np.ndarray:
    """Poisson image editing (Perez et al. 2003, imported gradients): inside ``mask`` placed at
    ``corner``, the result has ``patch``'s gradients and meets ``image`` on the mask's border.

    ``image`` is H x W x C, ``patch`` h x w x C (float). Solves the discrete Poisson equation
    on the mask's pixels (4-neighbourhood; neighbours outside the image are dropped, the
    patch's gradient across its own border is taken as zero). Pixels outside the mask are
    returned unchanged.
    """
    out = image.copy()
    height, width = image.shape[:2]
    # Work on the patch grown by one pixel (within the image) so border neighbours are addressable.
    r0, c0 = max(int(corner[0]) - 1, 0), max(int(corner[1]) - 1, 0)
    r1, c1 = min(int(corner[0]) + mask.shape[0] + 1, height), min(int(corner[1]) + mask.shape[1] + 1, width)
    pr, pc = int(corner[0]) - r0, int(corner[1]) - c0  # patch origin inside the window
    target = image[r0:r1, c0:c1]
    guide = np.pad(patch, ((1, 1), (1, 1), (0, 0)), mode="edge")[
        1 - pr : 1 - pr + (r1 - r0), 1 - pc : 1 - pc + (c1 - c0)
    ]
    unknown = np.zeros(target.shape[:2], dtype=bool)
    unknown[pr : pr + mask.shape[0], pc : pc + mask.shape[1]] = mask
    index = np.full(unknown.shape, -1)
    ys, xs = np.nonzero(unknown)
    n = ys.size
    if n == 0:
        return out
    index[ys, xs] = np.arange(n)

    degree = np.zeros(n)
    rhs = np.zeros((n, target.shape[2]))
    rows, cols = [np.arange(n)], [np.arange(n)]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        qy, qx = ys + dy, xs + dx
        valid = (qy >= 0) & (qy < unknown.shape[0]) & (qx >= 0) & (qx < unknown.shape[1])
        p, qy, qx = np.flatnonzero(valid), qy[valid], qx[valid]
        degree[p] += 1
        rhs[p] += guide[ys[p], xs[p]] - guide[qy, qx]
        known = ~unknown[qy, qx]
        rhs[p[known]] += target[qy[known], qx[known]]
        rows.append(p[~known])
        cols.append(index[qy[~known], qx[~known]])
    values = np.concatenate([degree, -np.ones(sum(r.size for r in rows[1:]))])
    system = sparse.csc_matrix((values, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solution = splu(system).solve(rhs)
    out[r0 + ys, c0 + xs] = np.clip(solution, 0.0, 255.0)
    return out


def paste(
    image: np.ndarray, patch: np.ndarray, mask: np.ndarray, corner: Sequence[int], *, poisson: bool = True
) -> np.ndarray:
    """Put ``patch`` (h x w[x C]) into ``image`` (H x W[x C], 0-255) inside ``mask`` (bool h x w)
    at ``corner``: Poisson-blended (default) or hard-pasted. Returns a float64 copy."""
    x = _channels_last(image)
    p = _channels_last(patch)
    if poisson:
        out = poisson_blend(x, p, mask, corner)
    else:
        out = x.copy()
        out[_patch(corner, mask.shape)][mask] = p[mask]
    return out.reshape(np.shape(image))


def cut_paste(
    image: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    corner: Sequence[int],
    rng: np.random.Generator,
    *,
    poisson: bool = True,
    max_rotation: float = np.pi / 4,
    scale_rate: float = 0.1,
) -> np.ndarray:
    """CutPaste: a rotated, rescaled patch of ``source`` (see :func:`source_patch`) pasted into
    ``image`` inside ``mask`` at ``corner``, Poisson-blended as in the paper or hard-pasted as
    in the official code (``poisson=False``)."""
    if np.ndim(source) != np.ndim(image) or np.shape(source)[2:] != np.shape(image)[2:]:
        raise ValueError(f"source {np.shape(source)} and image {np.shape(image)} differ in channels")
    patch = source_patch(source, mask.shape, rng, max_rotation=max_rotation, scale_rate=scale_rate)
    return paste(image, patch, mask, corner, poisson=poisson)


# ---------------------------------------------------------------------------------------------
# GaussIntensityChange


def gauss_intensity_change(
    image: np.ndarray,
    mask: np.ndarray,
    corner: Sequence[int],
    rng: np.random.Generator,
    *,
    texture_sigmas: Sequence[float] = (4.0, 7.0),
    intensity_range: tuple[float, float] = (0.4, 0.6),
    blur_range: tuple[float, float] = (1.0, 4.0),
) -> np.ndarray:
    """GaussIntensityChange: inside ``mask`` at ``corner``, ``I' = clip(I/255 + texture * beta, 0, 1) * 255``.

    texture = blur(N(0, 1) >= 0, sigma from ``texture_sigmas``) over the whole image, min-max
    scaled to [0, 1], times u ~ +-U(intensity_range) (sign 50/50), clipped to [-1, 1];
    beta = the mask blurred with sigma ~ U(blur_range). All channels get the same change.
    """
    x = _channels_last(image)
    sigma = texture_sigmas[int(rng.integers(len(texture_sigmas)))]
    texture = ndimage.gaussian_filter((rng.standard_normal(x.shape[:2]) >= 0).astype(float), sigma)
    span = texture.max() - texture.min()
    texture = (texture - texture.min()) / span if span > 0 else np.zeros_like(texture)
    u = rng.uniform(*intensity_range) * (1.0 if rng.random() < 0.5 else -1.0)
    texture = np.clip(u * texture, -1.0, 1.0)
    beta = ndimage.gaussian_filter(mask.astype(float), rng.uniform(*blur_range))
    window = _patch(corner, mask.shape)
    change = (texture[window] * beta)[mask][:, None]
    target = x[window]
    target[mask] = np.clip(target[mask] / 255.0 + change, 0.0, 1.0) * 255.0
    return x.reshape(np.shape(image))


# ---------------------------------------------------------------------------------------------
# Source deformation


def source_deformation(
    image: np.ndarray,
    shape: DeformedShape,
    corner: Sequence[int],
    rng: np.random.Generator,
    *,
    exponent_range: tuple[float, float] = (0.5, 2.0),
) -> np.ndarray:
    """Source: push the content of ``shape`` (placed at ``corner``) away from a random centre c.

    A shape pixel at distance d from c along the unit direction u, with D the distance from c
    to the shape's edge along u, takes the value at ``c + u * d^f / D^(f-1)``, f = 2^U(exponent_range)
    (cubic interpolation within the shape's bounding patch, nearest at its edges), clipped to the
    image's per-channel range. Pixels outside the shape are unchanged.
    """
    x = _channels_last(image)
    window = x[_patch(corner, shape.mask.shape)]
    pixels = np.argwhere(shape.mask)
    centre = pixels[int(rng.integers(len(pixels)))].astype(float)
    exponent = 2.0 ** rng.uniform(*exponent_range)
    offsets = pixels - centre
    distance = np.linalg.norm(offsets, axis=1)
    moving = distance > 0
    pixels, offsets, distance = pixels[moving], offsets[moving], distance[moving]
    directions = offsets / distance[:, None]
    edge = shape.edge_distance(centre, directions)
    sampled = centre + directions * (distance**exponent / edge ** (exponent - 1))[:, None]
    low, high = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    values = np.stack(
        [ndimage.map_coordinates(window[..., k], sampled.T, order=3, mode="nearest") for k in range(x.shape[2])],
        axis=-1,
    )
    window[pixels[:, 0], pixels[:, 1]] = np.clip(values, low, high)
    return x.reshape(np.shape(image))


# ---------------------------------------------------------------------------------------------
# Composer


def close_and_fill(mask: np.ndarray) -> np.ndarray:
    """Label post-processing: 3 x 3 binary closing (image edges extended) then hole filling."""
    padded = np.pad(mask, 1, mode="edge")
    closed = ndimage.binary_closing(padded, structure=np.ones((3, 3), dtype=bool))[1:-1, 1:-1]
    return ndimage.binary_fill_holes(closed)


def _size_bounds(image_size: tuple[int, int], bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    sides = np.asarray(image_size, dtype=float)
    lo = np.maximum(np.round(bounds[0] * sides), 2).astype(int)
    hi = np.maximum(np.round(bounds[1] * sides).astype(int), lo + 1)
    return lo, hi


@dataclass(frozen=True)
class SynthesisResult:
    """One composed synthesis: the image (input dtype and shape), its bool label mask, the task
    drawn and how many shapes it placed."""

    image: np.ndarray
    mask: np.ndarray
    task: str
    passes: int


@dataclass(frozen=True)
class MediCLIPSynthesis:
    """MediCLIP's multi-task synthesis.

    Per image one task is drawn with ``probabilities``; it is applied for up to ``max_passes``
    shapes, stopping after each with ``stop_probability``. Shape sizes are drawn per dimension
    from ``round(bounds * image side)`` (Perlin sizes in [lo, hi); Source sides clipped to
    [lo, hi]); each shape's top-left corner is drawn so it fits. The label is the union of the
    shapes after :func:`close_and_fill`; Identity returns the image unchanged with an empty mask.
    """

    probabilities: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 0.25))
    cut_paste_bounds: tuple[float, float] = (0.1, 0.6)
    gauss_bounds: tuple[float, float] = (0.3, 0.8)
    source_bounds: tuple[float, float] = (0.2, 0.6)
    poisson: bool = True
    max_passes: int = 2
    stop_probability: float = 0.5

    def __post_init__(self) -> None:
        unknown = set(self.probabilities) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown synthesis tasks {sorted(unknown)}; known: {TASKS}")
        if any(p < 0 for p in self.probabilities.values()) or not np.isclose(sum(self.probabilities.values()), 1.0):
            raise ValueError(f"task probabilities must be non-negative and sum to 1, got {dict(self.probabilities)}")
        if self.max_passes < 1:
            raise ValueError("max_passes must be at least 1")

    def __call__(
        self, image: np.ndarray, support: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Synthesise on ``image`` (uint8 H x W or H x W x 3); ``support`` holds the CutPaste
        sources (other normal images; may include ``image`` itself, as the official code does).
        Returns the image (same dtype and shape) and the bool H x W label."""
        result = self.synthesize(image, support, rng)
        return result.image, result.mask

    def synthesize(self, image: np.ndarray, support: Sequence[np.ndarray], rng: np.random.Generator) -> SynthesisResult:
        """As :meth:`__call__`, also telling which task was drawn and how many shapes it placed."""
        if image.dtype != np.uint8:
            raise TypeError(f"MediCLIP synthesis expects a uint8 image, got {image.dtype}")
        if self.probabilities.get("cut_paste", 0.0) > 0 and len(support) == 0:
            raise ValueError("CutPaste needs at least one support image")
        names = list(self.probabilities)
        task = names[int(rng.choice(len(names), p=np.array([self.probabilities[k] for k in names], dtype=float)))]
        size = image.shape[:2]
        mask = np.zeros(size, dtype=bool)
        if task == "identity":
            return SynthesisResult(image=image.copy(), mask=mask, task=task, passes=0)
        x = image.astype(np.float64)
        passes = 0
        while passes < self.max_passes:
            x, placed = self._one_shape(task, x, support, rng)
            mask |= placed
            passes += 1
            if rng.random() < self.stop_probability:
                break
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return SynthesisResult(image=out, mask=close_and_fill(mask), task=task, passes=passes)

    def _one_shape(
        self, task: str, x: np.ndarray, support: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply ``task`` once; returns the new float image and the placed shape (image-sized)."""
        size = x.shape[:2]
        if task == "source":
            shape = deformed_shape(size, self.source_bounds, rng)
            corner = random_corner(shape.mask.shape, size, rng)
            shape_mask = shape.mask
            x = source_deformation(x, shape, corner, rng)
        else:
            lo, hi = _size_bounds(size, self.cut_paste_bounds if task == "cut_paste" else self.gauss_bounds)
            shape_mask = perlin_shape((int(rng.integers(lo[0], hi[0])), int(rng.integers(lo[1], hi[1]))), rng)
            corner = random_corner(shape_mask.shape, size, rng)
            if task == "cut_paste":
                source = support[int(rng.integers(len(support)))]
                x = cut_paste(x, source, shape_mask, corner, rng, poisson=self.poisson)
            else:
                x = gauss_intensity_change(x, shape_mask, corner, rng)
        placed = np.zeros(size, dtype=bool)
        placed[_patch(corner, shape_mask.shape)] = shape_mask
        return x, placed
