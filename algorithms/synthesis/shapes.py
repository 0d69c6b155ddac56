"""Anomaly shapes: Perlin blobs and deformed rectangles/ellipses (MediCLIP), hull+Bezier lesions (PPAD's SAS).

Coordinates follow numpy: a shape is a bool array indexed (row, column). Polygons given to
:func:`fill_polygon` use (x, y) = (column, row) vertices, and a pixel is inside when its
centre (its integer coordinates) is, by the even-odd rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

SQRT2 = float(np.sqrt(2.0))


def fill_polygon(vertices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a closed polygon (N x 2 array of (x, y) vertices) into a bool mask of ``shape``.

    Scanline even-odd fill: each edge's crossings with the pixel rows are counted at the first
    column to their right, and a running sum along each row gives the parity. Cost is
    O(edges x rows + pixels), with no per-pixel Python loop.
    """
    h, w = shape
    v = np.asarray(vertices, dtype=float)
    x0, y0 = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # An edge crosses row y when min(y0, y1) <= y < max(y0, y1) (half-open, so shared vertices count once).
    first_row = np.clip(np.ceil(np.minimum(y0, y1)), 0, h).astype(int)
    end_row = np.clip(np.ceil(np.maximum(y0, y1)), 0, h).astype(int)
    n_rows = end_row - first_row
    crossing = n_rows > 0
    edges = np.repeat(np.flatnonzero(crossing), n_rows[crossing])
    starts = np.cumsum(n_rows[crossing]) - n_rows[crossing]
    rows = first_row[edges] + np.arange(edges.size) - np.repeat(starts, n_rows[crossing])
    xc = x0[edges] + (rows - y0[edges]) * (x1[edges] - x0[edges]) / (y1[edges] - y0[edges])
    right = np.clip(np.floor(xc).astype(int) + 1, 0, w)  # first column strictly right of the crossing
    counts = np.bincount(rows * (w + 1) + right, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(counts[:, :w], axis=1) % 2).astype(bool)


# ---------------------------------------------------------------------------------------------
# Perlin shapes (MediCLIP's CutPaste and GaussIntensityChange)


def _quintic_fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Single-cell 2-D Perlin noise of ``size`` (rows, columns), values in about [-1, 1].

    Four random unit gradients sit on the cell's corners; sample (i, j) lies at (i/h, j/w) in
    the unit cell; corner contributions are blended with the quintic fade 6t^5 - 15t^4 + 10t^3
    and scaled by sqrt(2).
    """
    h, w = size
    angles = rng.uniform(0.0, 2 * np.pi, size=(2, 2))
    gx, gy = np.cos(angles), np.sin(angles)  # gradient at corner (a, b), a along rows, b along columns
    x = (np.arange(h) / h)[:, None]
    y = (np.arange(w) / w)[None, :]

    def corner(a: int, b: int) -> np.ndarray:
        return gx[a, b] * (x - a) + gy[a, b] * (y - b)

    fx, fy = _quintic_fade(x), _quintic_fade(y)
    near = corner(0, 0) + fx * (corner(1, 0) - corner(0, 0))
    far = corner(0, 1) + fx * (corner(1, 1) - corner(0, 1))
    return SQRT2 * (near + fy * (far - near))


def perlin_shape(
    size: tuple[int, int],
    rng: np.random.Generator,
    *,
    threshold: float = 0.3,
    min_fill: float = 0.2,
    max_angle: float = 90.0,
    max_tries: int = 1000,
) -> np.ndarray:
    """A Perlin blob of ``size``: noise rotated by U(-max_angle, max_angle) degrees (linear
    interpolation, zero fill, same size), thresholded ``> threshold``, redrawn until at least
    ``min_fill`` of the patch is set."""
    for _ in range(max_tries):
        noise = perlin_noise(size, rng)
        angle = rng.uniform(-max_angle, max_angle)
        noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
        mask = noise > threshold
        if mask.mean() >= min_fill:
            return mask
    raise RuntimeError(f"no Perlin shape of size {size} reached fill {min_fill} in {max_tries} draws")


# ---------------------------------------------------------------------------------------------
# Deformed rectangles and ellipses (MediCLIP's Source task)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


@dataclass(frozen=True)
class DeformedShape:
    """A sheared, rotated rectangle or ellipse rasterised on its bounding grid.

    Grid pixel p (row, column) sits at ``inverse @ (p + offset)`` in the shape's aligned frame,
    where the shape is ``|a| <= half_size`` (rectangle) or ``sum((a / half_size)^2) <= 1`` (ellipse).
    """

    mask: np.ndarray
    kind: str
    half_size: np.ndarray
    inverse: np.ndarray
    offset: np.ndarray

    def _aligned(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=float) + self.offset) @ self.inverse.T

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether each (row, column) grid point (N x 2) lies inside the shape."""
        a = self._aligned(points) / self.half_size
        if self.kind == "rectangle":
            return np.all(np.abs(a) <= 1.0, axis=-1)
        return np.sum(a * a, axis=-1) <= 1.0

    def edge_distance(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Distance from ``origin`` (an inside grid point) to the shape's edge along each unit
        direction (N x 2, grid frame). An affine map keeps the ray parameter, so it is solved in
        the aligned frame."""
        a = self._aligned(origin)
        v = np.asarray(directions, dtype=float) @ self.inverse.T
        h = self.half_size
        if self.kind == "rectangle":
            with np.errstate(divide="ignore", invalid="ignore"):
                exits = np.where(v > 0, (h - a) / v, np.where(v < 0, (-h - a) / v, np.inf))
            return np.min(exits, axis=-1)
        qa = np.sum((v / h) ** 2, axis=-1)
        qb = 2.0 * np.sum(a * v / h**2, axis=-1)
        qc = np.sum((a / h) ** 2) - 1.0
        return (-qb + np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0))) / (2.0 * qa)


def deformed_shape(
    image_size: tuple[int, int],
    bounds: tuple[float, float],
    rng: np.random.Generator,
    *,
    kind: str | None = None,
    size_offset: float = 0.03,
    size_gamma: tuple[float, float] = (2.0, 0.1),
    shear_std: float = 0.2,
    max_angle: float = np.pi / 2,
) -> DeformedShape:
    """A rectangle or ellipse (50/50 unless ``kind`` is given), sheared and rotated.

    Each side is ``clip((size_offset + Gamma(*size_gamma)) * image side, lo, hi)`` with
    ``(lo, hi) = round(bounds * image side)``; each axis is sheared by N(0, shear_std) towards the
    other, the result rotated by U(-max_angle, max_angle) radians and scaled down if its
    bounding grid exceeds ``hi``.
    """
    if kind is None:
        kind = ("rectangle", "ellipse")[int(rng.integers(2))]
    if kind not in ("rectangle", "ellipse"):
        raise ValueError(f"kind must be 'rectangle' or 'ellipse', not {kind!r}")
    sides = np.asarray(image_size, dtype=float)
    lo = np.maximum(np.round(bounds[0] * sides), 1.0)
    hi = np.maximum(np.round(bounds[1] * sides), np.maximum(lo, 3.0))  # a rotated grid spans >= 3 pixels
    size = np.floor(np.clip((size_offset + rng.gamma(size_gamma[0], size_gamma[1], size=2)) * sides, lo, hi))

    matrix = np.eye(2)
    matrix[0, 1], matrix[1, 0] = rng.normal(0.0, shear_std, size=2)
    matrix = _rotation(rng.uniform(-max_angle, max_angle)) @ matrix

    half_corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]]) * (size - 1) / 2
    corners = half_corners @ matrix.T
    low, high = np.floor(corners.min(axis=0)), np.ceil(corners.max(axis=0))
    grid = high + 1 - low
    while np.any(grid > hi):  # grid rounding can leave it a pixel too big after one rescale
        matrix = matrix * np.min(hi / grid)
        corners = half_corners @ matrix.T
        low, high = np.floor(corners.min(axis=0)), np.ceil(corners.max(axis=0))
        grid = high + 1 - low

    grid_shape = tuple(grid.astype(int))
    unmasked = DeformedShape(
        mask=np.zeros(grid_shape, dtype=bool), kind=kind, half_size=size / 2, inverse=np.linalg.inv(matrix), offset=low
    )
    inside = unmasked.contains(np.indices(grid_shape).reshape(2, -1).T).reshape(grid_shape)
    return replace(unmasked, mask=inside)


# ---------------------------------------------------------------------------------------------
# Convex hull + Bezier lesions (PPAD's SAS)


def _cubic_bezier(p0: np.ndarray, c1: np.ndarray, c2: np.ndarray, p1: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    s = 1.0 - t
    return s**3 * p0 + 3 * s * s * t * c1 + 3 * s * t * t * c2 + t**3 * p1


def bezier_lesion_shape(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    n_points: int = 10,
    control_std: float = 8.0,
    n_samples: int = 100,
    dilation: int = 5,
) -> np.ndarray:
    """SAS's irregular lesion on a square canvas of side ``max(width, height)``.

    ``n_points`` random points (x in [0, width), y in [0, height)); mask1 = their convex hull;
    each hull edge gets a cubic Bezier whose two control points are the edge midpoint plus
    N(0, control_std^2) noise (``n_samples`` samples), mask2 = union of the regions between the
    curves and their chords; the lesion is mask1 XOR mask2 dilated once by a ``dilation``-square.
    """
    side = max(width, height)
    while True:
        points = np.stack([rng.integers(0, width, n_points), rng.integers(0, height, n_points)], axis=1).astype(float)
        try:
            hull = ConvexHull(points)
            break
        except QhullError:  # all points collinear: draw again
            continue
    canvas = (side, side)
    mask1 = fill_polygon(points[hull.vertices], canvas)
    mask2 = np.zeros(canvas, dtype=bool)
    for i, j in hull.simplices:
        p0, p1 = points[i], points[j]
        mid = (p0 + p1) / 2
        c1 = mid + rng.normal(0.0, control_std, size=2)
        c2 = mid + rng.normal(0.0, control_std, size=2)
        mask2 |= fill_polygon(_cubic_bezier(p0, c1, c2, p1, n_samples), canvas)
    lesion = mask1 ^ mask2
    return ndimage.binary_dilation(lesion, structure=np.ones((dilation, dilation), dtype=bool))
