"""Whole-slide image helpers: OpenSlide access, tissue detection, level-0 patches, ASAP XML polygons.

Reusable by any reorganizer that reads whole-slide TIFFs (Camelyon16/17 and alike):

* :func:`open_slide` opens a slide with OpenSlide (openslide-python + openslide-bin, no
  system library) and turns every OpenSlide failure into a :class:`~bmad.errors.DataError`
  naming the file. An OpenSlide handle must not be shared between threads: open one per
  job (``with open_slide(path) as slide:``).
* :func:`read_rgb` reads a region as RGB uint8, compositing transparent pixels (areas the
  scanner did not image) onto white. Only the requested region is decoded: a whole level-0
  slide is never read.
* :func:`saturation_thumbnail` builds a low-resolution saturation image of the slide by
  reading a coarse pyramid level in chunks (block-averaged when the pyramid has no level
  near the requested downsample), :func:`tissue_threshold` picks the tissue threshold (Otsu
  on that image, or a fixed value) and :meth:`Thumbnail.fractions` gives the tissue
  fraction of level-0 rectangles from it.
* :func:`parse_asap_xml` reads ASAP / Camelyon annotation XML into tumour and exclusion
  polygons; :meth:`Annotations.contains` says which level-0 points are tumour (inside a
  tumour polygon and not inside an exclusion polygon), with :func:`points_in_polygon`
  (even-odd rule).

``openslide`` is imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bmad.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import openslide

DARK = 30
"""Pixels whose brightest channel is below this are never tissue (black scanner borders, ink)."""

TUMOUR_GROUPS = frozenset({"tumor", "tumour", "_0", "_1", "metastases", "metastasis"})
"""Annotation groups (``PartOfGroup``, case-insensitive) that mark tumour regions:
Camelyon16 training XML uses ``_0``/``_1``, the test XML ``Tumor``, Camelyon17 ``metastases``."""
EXCLUSION_GROUPS = frozenset({"exclusion", "_2", "normal"})
"""Annotation groups that mark non-tumour regions drawn inside tumour (Camelyon16 ``_2`` and
``Exclusion``, Camelyon17 ``normal``): a point inside one of them is not tumour."""
UNGROUPED = frozenset({"", "none"})
"""``PartOfGroup`` values of annotations outside any group: ignored (neither tumour nor exclusion)."""


MAX_TILE_PIXELS = 2**24
"""The largest tile a slide may have (4096 x 4096 pixels, 64 MiB decoded; scanners write 240 to 1024)."""


def _hint(path: Path) -> str:
    return f"re-download {Path(path).name} (compare its checksum with the publisher's), or move it out of --raw"


# -- slides --------------------------------------------------------------------------------
@contextmanager
def open_slide(path: str | Path) -> Iterator[openslide.OpenSlide]:
    """An OpenSlide handle on ``path`` (closed on exit); DataError when OpenSlide cannot open it.

    Use one handle per thread: OpenSlide handles are not shared between workers here.
    """
    import openslide

    path = Path(path)
    if not path.is_file():
        raise DataError(f"slide {path} does not exist", hint="check --raw and the slide's name")
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise DataError(f"OpenSlide cannot open {path}: not a whole-slide image it recognises ({exc})",
                        hint=_hint(path)) from exc
    except Exception as exc:  # noqa: BLE001 - OpenSlideError, OSError: all mean an unreadable slide
        raise DataError(f"OpenSlide cannot open {path}: {type(exc).__name__}: {exc}", hint=_hint(path)) from exc
    try:
        _check_tiles(slide, path)
        yield slide
    finally:
        slide.close()


def _check_tiles(slide: openslide.OpenSlide, path: Path) -> None:
    """DataError for a level whose tiles exceed :data:`MAX_TILE_PIXELS` (OpenSlide allocates a
    whole tile to read any pixel of it, and aborts the process when that allocation fails), or
    whose size is not level 0's divided by its downsample, give or take 5% (a corrupt size:
    a 45 kB pyramid whose level 0 claims 112,308,703 x 63 pixels is left alone by OpenSlide,
    and reading its thumbnail from level 0 takes many minutes)."""
    w0, h0 = (int(v) for v in slide.dimensions)
    for level in range(slide.level_count):
        w, h = (int(slide.properties.get(f"openslide.level[{level}].tile-{k}", 0)) for k in ("width", "height"))
        if w * h > MAX_TILE_PIXELS:
            raise DataError(f"{path}: level {level} has {w}x{h}-pixel tiles, larger than the {MAX_TILE_PIXELS:,} "
                            "pixels a tile can have here (a corrupt tile size)", hint=_hint(path))
        (lw, lh), ds = slide.level_dimensions[level], float(slide.level_downsamples[level])
        if any(abs(full / ds - size) > max(2.0, 0.05 * size) for full, size in ((w0, lw), (h0, lh))):
            raise DataError(f"{path}: level {level} is {lw}x{lh} pixels, not level 0's {w0}x{h0} downsampled "
                            f"{ds:g} times (a corrupt size)", hint=_hint(path))


def read_rgb(slide: openslide.OpenSlide, x: int, y: int, width: int, height: int, *, level: int = 0,
             path: str | Path = "") -> np.ndarray:
    """``width`` x ``height`` pixels of ``level`` whose top-left is at level-0 ``(x, y)``, as
    RGB uint8 [height, width, 3]; transparent pixels are composited onto white."""
    try:
        region = slide.read_region((int(x), int(y)), int(level), (int(width), int(height)))
    except Exception as exc:  # noqa: BLE001 - OpenSlideError: corrupt or truncated tiles
        raise DataError(f"OpenSlide cannot read {path or 'the slide'} at level {level} ({x}, {y}): "
                        f"{type(exc).__name__}: {exc}", hint=_hint(Path(path))) from exc
    rgba = np.asarray(region, dtype=np.uint8)
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if bool((alpha == 255).all()):
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the 3 channels (channel-wise ufuncs: faster than max(axis=-1))."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of RGB uint8 pixels, 0..255 (uint8); 0 where the pixel is darker than :data:`DARK`."""
    mx, mn = _max_min(rgb)
    spread = (mx - mn).astype(np.uint16) * np.uint16(255)
    sat = (spread // np.maximum(mx, 1)).astype(np.uint8)  # <= 255: spread <= 255 * mx
    sat[mx < DARK] = 0
    return sat


def tissue_pixels(rgb: np.ndarray, threshold: int) -> np.ndarray:
    """``saturation(rgb) >= threshold`` without the division (faster on every patch)."""
    mx, mn = _max_min(rgb)
    spread = (mx - mn).astype(np.int32)
    if threshold <= 0:
        return np.ones(mx.shape, dtype=bool)
    return (spread * 255 >= int(threshold) * mx.astype(np.int32)) & (mx >= DARK)


def tissue_fraction(rgb: np.ndarray, threshold: int) -> float:
    """Fraction of pixels of ``rgb`` whose saturation is at least ``threshold``."""
    return float(tissue_pixels(rgb, threshold).mean())


@dataclass(frozen=True)
class Thumbnail:
    """A low-resolution saturation image of a slide.

    ``sat[i, j]`` covers level-0 ``x`` in ``[j * px_x, (j + 1) * px_x)`` and ``y`` in
    ``[i * px_y, (i + 1) * px_y)``; ``width``/``height``: the slide's level-0 size.
    """

    sat: np.ndarray
    px_x: float
    px_y: float
    width: int
    height: int

    def fractions(self, mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
        """Fraction of ``mask`` (a boolean image the shape of ``sat``) inside each level-0
        square ``[x, x + size) x [y, y + size)``; thumbnail pixels partly covered count whole."""
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        th, tw = mask.shape
        dtype = np.int32 if th * tw < 2**31 else np.int64  # 4 bytes a thumbnail pixel for real slides
        integral = np.zeros((th + 1, tw + 1), dtype=dtype)
        np.cumsum(mask, axis=0, dtype=dtype, out=integral[1:, 1:])
        np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
        x0 = np.clip(np.floor(xs / self.px_x), 0, tw).astype(np.int64)
        x1 = np.clip(np.ceil((xs + size) / self.px_x), 0, tw).astype(np.int64)
        y0 = np.clip(np.floor(ys / self.px_y), 0, th).astype(np.int64)
        y1 = np.clip(np.ceil((ys + size) / self.px_y), 0, th).astype(np.int64)
        area = (x1 - x0) * (y1 - y0)
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return np.where(area > 0, total / np.maximum(area, 1), 0.0)


def saturation_thumbnail(slide: openslide.OpenSlide, downsample: float, *, path: str | Path = "",
                         chunk: int = 1024) -> Thumbnail:
    """The slide's saturation at about ``downsample`` times below level 0.

    Reads the coarsest pyramid level whose downsample is at most ``downsample`` in chunks
    of about ``chunk`` x ``chunk`` pixels, averaging blocks of ``f`` x ``f`` pixels when
    that level is ``f`` times finer than asked (a single-level slide is reduced from
    level 0, chunk by chunk). Memory: the thumbnail (1 byte a pixel) plus one chunk.
    """
    if downsample < 1:
        raise ValueError("downsample must be >= 1")
    # 1% slack: a level of downsample 32.0006 (odd dimensions halved) serves a request for 32
    level = int(slide.get_best_level_for_downsample(downsample * 1.01))
    level_ds = float(slide.level_downsamples[level])
    f = max(1, round(downsample / level_ds))
    lw, lh = (int(v) for v in slide.level_dimensions[level])
    width, height = (int(v) for v in slide.dimensions)
    tw, th = -(-lw // f), -(-lh // f)
    sat = np.empty((th, tw), dtype=np.uint8)
    step = f * max(1, chunk // f)
    for cy in range(0, lh, step):
        for cx in range(0, lw, step):
            w, h = min(step, lw - cx), min(step, lh - cy)
            rgb = read_rgb(slide, int(cx * width / lw), int(cy * height / lh), w, h, level=level, path=path)
            if f > 1:
                pw, ph = -(-w // f) * f, -(-h // f) * f
                if (pw, ph) != (w, h):
                    rgb = np.pad(rgb, ((0, ph - h), (0, pw - w), (0, 0)), constant_values=255)
                blocks = rgb.reshape(ph // f, f, pw // f, f, 3).astype(np.uint32).sum(axis=(1, 3))
                rgb = ((blocks + (f * f) // 2) // (f * f)).astype(np.uint8)
            sat[cy // f: cy // f + rgb.shape[0], cx // f: cx // f + rgb.shape[1]] = saturation(rgb)
    return Thumbnail(sat, f * width / lw, f * height / lh, width, height)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: the ``t`` maximising the between-class variance
    of ``values < t`` and ``values >= t`` (0 when all values are equal)."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)[:-1]  # weight of values < t for t = 1..255
    m0 = np.cumsum(hist * levels)[:-1]
    w1 = total - w0
    m_total = float((hist * levels).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0 * w1 - (m_total - m0) * w0) ** 2 / (w0 * w1)
    between[(w0 == 0) | (w1 == 0)] = -1
    if between.max() <= 0:
        return 0
    return int(np.argmax(between)) + 1


def tissue_threshold(sat: np.ndarray, threshold: str | int = "otsu", min_saturation: int = 20) -> int:
    """The saturation at or above which a pixel is tissue: ``threshold`` when it is a number,
    else Otsu's threshold of ``sat`` raised to at least ``min_saturation`` (so a slide that
    is nearly all background, or all tissue, keeps a sensible cut)."""
    if str(threshold).lower() != "otsu":
        return int(threshold)
    return max(otsu_threshold(sat), int(min_saturation))


# -- annotations -------------------------------------------------------------------------------
def points_in_polygon(points: np.ndarray, polygon: np.ndarray, *, chunk_elems: int = 1 << 21) -> np.ndarray:
    """Which of ``points`` [P, 2] (x, y) lie inside ``polygon`` [V, 2] (even-odd rule, closed
    implicitly). Points exactly on an edge may fall either side."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), dtype=bool)
    if len(poly) < 3 or len(pts) == 0:
        return inside
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    cand = np.flatnonzero((pts[:, 0] >= lo[0]) & (pts[:, 0] <= hi[0]) & (pts[:, 1] >= lo[1]) & (pts[:, 1] <= hi[1]))
    if len(cand) == 0:
        return inside
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    horizontal = y1 == y2
    slope = np.where(horizontal, 0.0, (x2 - x1) / np.where(horizontal, 1.0, y2 - y1))
    step = max(1, chunk_elems // len(poly))
    for start in range(0, len(cand), step):
        idx = cand[start: start + step]
        px = pts[idx, 0][:, None]
        py = pts[idx, 1][:, None]
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * slope
        inside[idx] = (np.count_nonzero(crosses & (px < x_at), axis=1) % 2) == 1
    return inside


def interior_point(polygon: np.ndarray) -> tuple[float, float] | None:
    """A point inside ``polygon`` (even-odd), or None for a degenerate polygon: the middle of
    the first inside run of a horizontal line through the middle of its bounding box."""
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(poly) < 3:
        return None
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    for frac in (0.5, 0.25, 0.75, 0.375, 0.625, 0.125, 0.875):
        y = lo[1] + frac * (hi[1] - lo[1]) + 1e-7 * (hi[1] - lo[1] + 1)
        x1, y1 = poly[:, 0], poly[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        crosses = (y1 > y) != (y2 > y)
        if not crosses.any():
            continue
        xs = np.sort(x1[crosses] + (y - y1[crosses]) * (x2[crosses] - x1[crosses]) / (y2[crosses] - y1[crosses]))
        for a, b in zip(xs[0::2], xs[1::2], strict=False):
            if b > a:
                return float((a + b) / 2), float(y)
    return None


@dataclass(frozen=True)
class Polygon:
    """One annotation: its name, group (``PartOfGroup``) and vertices [V, 2] in level-0 pixels."""

    name: str
    group: str
    points: np.ndarray

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.points.min(axis=0), self.points.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


@dataclass(frozen=True)
class Annotations:
    """The polygons of one annotation file, sorted into tumour and exclusion regions."""

    path: Path
    tumour: tuple[Polygon, ...]
    exclusion: tuple[Polygon, ...]
    ignored: tuple[Polygon, ...] = ()

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which level-0 ``points`` [P, 2] are tumour: inside a tumour polygon and not inside an exclusion polygon."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        inside = np.zeros(len(pts), dtype=bool)
        for poly in self.tumour:
            todo = ~inside
            inside[todo] = points_in_polygon(pts[todo], poly.points)
        for poly in self.exclusion:
            if inside.any():
                hit = np.flatnonzero(inside)
                inside[hit] = ~points_in_polygon(pts[hit], poly.points)
        return inside


MAX_COORDINATE = 2.0**31
"""The largest coordinate (absolute value, level-0 pixels) an annotation may have: far past any
slide, and small enough that sums and products of coordinates stay finite."""


def _float(value: str | None, what: str, path: Path, limit: float = math.inf) -> float:
    try:
        v = float(str(value).replace(",", "."))
    except (TypeError, ValueError):
        raise DataError(f"{path}: {what} is {value!r}, not a number", hint=_xml_hint(path)) from None
    if not math.isfinite(v):
        raise DataError(f"{path}: {what} is {value!r}, not a finite number", hint=_xml_hint(path))
    if abs(v) > limit:
        raise DataError(f"{path}: {what} is {value!r}, beyond {limit:,.0f} pixels (no slide is that large)",
                        hint=_xml_hint(path))
    return v


def _xml_hint(path: Path) -> str:
    return f"re-extract {Path(path).name} from the dataset's lesion_annotations archive, or move it out of --raw"


class _Doctype(Exception):
    """A document type declaration met while parsing."""


class _NoDoctype(ET.TreeBuilder):
    """A tree builder that stops at a document type declaration (expat calls ``doctype`` at its
    start, before any entity is declared): a DTD is where entity-expansion bombs and external
    entities live, and ASAP files have none."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise _Doctype(f"<!DOCTYPE {name}" + (f" SYSTEM {system!r}" if system else "") + ">")


def parse_asap_xml(path: str | Path) -> Annotations:
    """Read an ASAP annotation XML (the Camelyon16/17 format)::

        <ASAP_Annotations><Annotations>
          <Annotation Name="_0" Type="Polygon" PartOfGroup="Tumor">
            <Coordinates><Coordinate Order="0" X="69139.6" Y="116600.4"/>...</Coordinates>
          </Annotation>...

    Groups in :data:`TUMOUR_GROUPS` are tumour, :data:`EXCLUSION_GROUPS` exclusion,
    ungrouped annotations are ignored; any other group is a DataError (so an unknown
    convention is not silently read as normal tissue). Annotations with fewer than three
    vertices (dots) enclose nothing and are ignored; splines are read as the polygon of
    their control points. Coordinates are level-0 pixels. A document type declaration is
    refused before anything in it is read (no entity is expanded, no external file opened).
    """
    path = Path(path)
    try:
        root = ET.parse(path, parser=ET.XMLParser(target=_NoDoctype())).getroot()
    except _Doctype as exc:
        raise DataError(f"{path} has a document type declaration ({exc}); ASAP files have none, and bmad does "
                        "not read one (entity expansion, external entities)", hint=_xml_hint(path)) from None
    except (ET.ParseError, ValueError, LookupError) as exc:  # an encoding expat does not decode: Value/LookupError
        raise DataError(f"{path} is not well-formed XML ({exc})", hint=_xml_hint(path)) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}", hint=_xml_hint(path)) from exc
    if root.tag != "ASAP_Annotations":
        raise DataError(f"{path} is not an ASAP annotation file (root element <{root.tag}>, "
                        "expected <ASAP_Annotations>)", hint=_xml_hint(path))
    tumour: list[Polygon] = []
    exclusion: list[Polygon] = []
    ignored: list[Polygon] = []
    for i, ann in enumerate(root.iter("Annotation")):
        name = ann.get("Name", f"#{i}")
        group = (ann.get("PartOfGroup") or "").strip()
        coords = []
        for c in ann.iter("Coordinate"):
            order = c.get("Order")
            coords.append((
                _float(order, f"annotation {name!r} coordinate Order", path) if order is not None else len(coords),
                _float(c.get("X"), f"annotation {name!r} coordinate X", path, MAX_COORDINATE),
                _float(c.get("Y"), f"annotation {name!r} coordinate Y", path, MAX_COORDINATE),
            ))
        coords.sort(key=lambda t: t[0])
        poly = Polygon(name, group, np.array([(x, y) for _, x, y in coords], dtype=np.float64).reshape(-1, 2))
        key = group.lower()
        if len(coords) < 3 or key in UNGROUPED:
            ignored.append(poly)
        elif key in TUMOUR_GROUPS:
            tumour.append(poly)
        elif key in EXCLUSION_GROUPS:
            exclusion.append(poly)
        else:
            raise DataError(
                f"{path}: annotation {name!r} is in group {group!r}, neither tumour "
                f"({', '.join(sorted(TUMOUR_GROUPS))}) nor exclusion ({', '.join(sorted(EXCLUSION_GROUPS))})",
                hint="rename the group in the XML to one of those, or move the file out of --raw",
            )
    return Annotations(path, tuple(tumour), tuple(exclusion), tuple(ignored))


def asap_xml(polygons: Sequence[tuple[str, Sequence[tuple[float, float]]]]) -> str:
    """ASAP XML text for ``(group, vertices)`` polygons (used to write test and synthetic data)."""
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    colours = {"tumor": "#F4FA58", "_0": "#F4FA58", "_1": "#F4FA58"}
    for i, (group, pts) in enumerate(polygons):
        lines.append(f'\t\t<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" '
                     f'Color="{colours.get(group.lower(), "#64FE2E")}">')
        lines.append("\t\t\t<Coordinates>")
        lines += [f'\t\t\t\t<Coordinate Order="{j}" X="{x:.4f}" Y="{y:.4f}" />' for j, (x, y) in enumerate(pts)]
        lines += ["\t\t\t</Coordinates>", "\t\t</Annotation>"]
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for group in dict.fromkeys(g for g, _ in polygons):
        lines += [f'\t\t<Group Name="{group}" PartOfGroup="None" Color="#64FE2E">', "\t\t\t<Attributes />",
                  "\t\t</Group>"]
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>", ""]
    return "\n".join(lines)


def write_pyramid_tiff(path: str | Path, width: int, height: int, render: Any, *, tile: int = 512,
                       compression: str = "jpeg", quality: int = 90, mpp: float = 0.243) -> Path:
    """Write a tiled pyramidal RGB TIFF that OpenSlide opens as ``generic-tiff`` (tifffile + imagecodecs).

    The layout of CAMELYON16's ASAP-converted slides: one tiled page per level, level 0
    first, each level half the previous (rounded up) until the longest side fits in one
    tile; reduced levels are marked as such (NewSubfileType 1); the resolution tags carry
    ``mpp`` micrometres per level-0 pixel. ``render(x, y, w, h, downsample)`` returns the
    uint8 [h, w, 3] pixels ``[x, x + w) x [y, y + h)`` of the level with that downsample;
    it is called once per tile, so memory holds one tile at a time.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression == "jpeg":
        kw: dict[str, Any] = {"compression": "jpeg", "compressionargs": {"level": int(quality)}}
    else:
        kw = {"compression": compression}
    levels = [1]
    while max(-(-width // levels[-1]), -(-height // levels[-1])) > tile:
        levels.append(levels[-1] * 2)

    def tiles(lw: int, lh: int, ds: int) -> Iterator[np.ndarray]:
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                yield np.ascontiguousarray(render(tx, ty, tile, tile, ds), dtype=np.uint8)

    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        for i, ds in enumerate(levels):
            lw, lh = -(-width // ds), -(-height // ds)
            tw.write(tiles(lw, lh, ds), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     subfiletype=0 if i == 0 else 1, resolution=(px_per_cm / ds, px_per_cm / ds),
                     resolutionunit="CENTIMETER", metadata=None, **kw)
    return path


def slide_info(slide: openslide.OpenSlide) -> dict[str, Any]:
    """Vendor, level count and level-0 size of an open slide (for messages and tests)."""
    return {"vendor": slide.properties.get("openslide.vendor", ""), "levels": slide.level_count,
            "dimensions": tuple(int(v) for v in slide.dimensions)}
