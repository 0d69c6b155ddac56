"""PPAD's five position views: a pixel region each, and the patches its image prompt keeps.

The regions are defined on a 224 x 224 image (METHODS_CLIP.md section 1, from the official
code's masks): "left lung" = columns 0-111, "right lung" = columns 112-223, "upper lung"
= rows 0-119, "lower lung" = rows 120-223, "" (the empty position) = the whole image. Other
sizes scale the boundaries. A patch is kept (its embedding stays) if any of its pixels is in
the region; the other patches are replaced by the learned image prompt. With patch 32 at 224
the halves overlap by one patch row or column (patch 3 = pixels 96-127 touches both sides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_SIZE = 224
"""The image side the view boundaries are given for."""


@dataclass(frozen=True)
class View:
    """A position view: its words in the text prompt and its pixel region at 224 x 224.

    ``rows`` / ``cols``: inclusive pixel ranges (first, last) at :data:`REFERENCE_SIZE`.
    """

    words: str
    rows: tuple[int, int] = (0, REFERENCE_SIZE - 1)
    cols: tuple[int, int] = (0, REFERENCE_SIZE - 1)

    def region(self, height: int, width: int | None = None) -> np.ndarray:
        """The view's pixel region (bool, height x width), boundaries scaled from 224."""
        width = height if width is None else width
        out = np.zeros((height, width), dtype=bool)
        r0, r1 = _scaled(self.rows, height)
        c0, c1 = _scaled(self.cols, width)
        out[r0 : r1 + 1, c0 : c1 + 1] = True
        return out

    def patch_keep(self, size: int, patch: int) -> np.ndarray:
        """Which patches of a ``size`` x ``size`` image cut in ``patch`` x ``patch`` patches are kept.

        A (grid x grid) bool array, grid = size // patch (the conv drops a remainder); a patch is
        kept if any of its pixels lies in :meth:`region`.
        """
        grid = size // patch
        region = self.region(size)[: grid * patch, : grid * patch]
        return region.reshape(grid, patch, grid, patch).any(axis=(1, 3))


def _scaled(bounds: tuple[int, int], side: int) -> tuple[int, int]:
    first, last = bounds
    return round(first * side / REFERENCE_SIZE), round((last + 1) * side / REFERENCE_SIZE) - 1


VIEWS: dict[str, View] = {
    "": View(""),
    "left lung": View("left lung", cols=(0, 111)),
    "right lung": View("right lung", cols=(112, 223)),
    "upper lung": View("upper lung", rows=(0, 119)),
    "lower lung": View("lower lung", rows=(120, 223)),
}
"""The five views by their words; "" is the whole image."""

VIEW_NAMES: tuple[str, ...] = tuple(VIEWS)
"""The view words in PPAD's order: the whole image first."""


def get_view(words: str) -> View:
    """The view named ``words``, or a ValueError listing the known ones."""
    try:
        return VIEWS[words]
    except KeyError:
        raise ValueError(f"unknown PPAD view {words!r}; known: {', '.join(map(repr, VIEW_NAMES))}") from None
