"""Camelyon16 -> the ``Histopathology`` bench: 256 x 256 level-0 patches of whole-slide TIFFs.

``bmad prepare camelyon16 --raw RAW --out DATA`` reads the CAMELYON16 release as
distributed (``training/normal/normal_NNN.tif``, ``testing/images/test_NNN.tif``,
``testing/lesion_annotations/test_NNN.xml``, ``testing/reference.csv``) through OpenSlide
and writes ``DATA/Histopathology/`` in BMAD's layout (image-level: no masks) with a
``manifest.csv``. docs/datasets/camelyon16.md states the protocol in full; in short:

* slides: the normal training slides give the training patches; the test slides, minus
  ``--exclude`` (default ``test_049``, a duplicate the organisers withdrew, and
  ``test_114``, whose annotation is not exhaustive: 128 slides remain, BMAD's 13 + 115),
  are split by slide (:func:`assign_eval_slides`) into valid and test, each with normal
  and tumour slides; the slide id is the ``patient`` of the manifest;
* sizes (:func:`split_sizes`): BMAD's 5,088 train / 100 + 100 valid / 1,000 + 1,000 test
  patches for the 159 normal training and 128 test slides, proportional to the slides given
  otherwise; a group's quota is shared evenly over its slides (:func:`share`);
* tissue (:mod:`datasets_prep.wsi`): saturation of a thumbnail at ``--tissue-downsample``
  (32), threshold Otsu (at least ``--min-saturation`` 20) or ``--saturation-threshold``;
  a patch is kept when at least ``--min-tissue`` (0.5) of it is tissue, on the thumbnail
  and again on its level-0 pixels;
* good patches: tissue patches on a 256-pixel grid of normal slides (training normal
  slides for train, test slides that reference.csv calls Normal for valid/test);
  Ungood patches: patches of tumour test slides whose centre lies inside a tumour
  polygon of the slide's XML and outside every exclusion polygon;
* drawing: each slide's candidates in a seeded order (``--split-seed`` and the slide
  id), the first that pass the level-0 tissue check, as RGB PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bmad.errors import DataError, UsageError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep import wsi
from datasets_prep.common import (
    Job,
    Output,
    input_fingerprint,
    png_bytes,
    proportional,
    read_csv,
    share_quota,
    threaded_map,
    write_bench,
)

log = logging.getLogger(__name__)

PATCH = 256
"""Patch side in level-0 pixels (BMAD: 256 x 256 at 40x)."""

# BMAD's histopathology bench (thesis section 3.1.5).
BMAD_TRAIN_PATCHES = 5088
BMAD_TRAIN_SLIDES = 159
"""The normal training slides of the release: normal_001..normal_160 less normal_086 (renamed
tumor_111 by the organisers). BMAD's "160 normal WSIs" counts the numbering; 5,088 = 32 x 159."""
BMAD_VALID = (100, 100)
BMAD_TEST = (1000, 1000)
BMAD_VALID_SLIDES = 13
BMAD_TEST_SLIDES = 115
BMAD_EVAL_SLIDES = BMAD_VALID_SLIDES + BMAD_TEST_SLIDES  # 128
DEFAULT_EXCLUDE = "test_049,test_114"
"""Withdrawn (``test_049``: a duplicate) or not exhaustively annotated (``test_114``) per the
CAMELYON16 README: 130 - 2 = 128 = BMAD's 13 + 115 test slides."""

SLIDE_SUFFIXES = (".tif", ".tiff")
SLIDE_RE = re.compile(r"(normal|tumor|test)_(\d+)", re.IGNORECASE)
GOOD, UNGOOD = "good", "Ungood"


# ---------------------------------------------------------------------------
# the size rule and the split (pure functions)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Patch quotas and the number of valid slides for a given raw set."""

    train: int
    valid: tuple[int, int]
    """(good, Ungood) patches of valid/."""
    test: tuple[int, int]
    """(good, Ungood) patches of test/."""
    valid_slides: int
    """How many of the evaluation slides go to valid/ (the rest to test/)."""


def split_sizes(n_train_slides: int, n_eval_slides: int) -> Sizes:
    """Quotas for ``n_train_slides`` normal training slides and ``n_eval_slides`` test slides.

    * train: 5,088 x n_train / 159 (rounded, at least 1), i.e. BMAD's 5,088 (32 a slide) for
      the 159 normal training slides of the release (or more);
    * valid / test patches: BMAD's (100, 100, 1000, 1000) x n_eval / 128 by the largest
      remainder method, each at least 1 (:func:`datasets_prep.common.proportional`),
      BMAD's exactly for the 128 test slides (or more);
    * valid slides: 13 x n_eval / 128 rounded half up, at least 2 (a normal and a tumour
      slide), i.e. BMAD's 13 of 128.
    """
    if n_train_slides < 1:
        raise ValueError("need at least one normal training slide")
    if n_eval_slides < 4:
        raise ValueError("need at least four test slides (two normal, two tumour)")
    train = proportional([BMAD_TRAIN_PATCHES], BMAD_TRAIN_SLIDES, n_train_slides)[0]
    vg, vu, tg, tu = proportional([*BMAD_VALID, *BMAD_TEST], BMAD_EVAL_SLIDES, n_eval_slides)
    valid_slides = max(2, (2 * BMAD_VALID_SLIDES * n_eval_slides + BMAD_EVAL_SLIDES) // (2 * BMAD_EVAL_SLIDES))
    return Sizes(max(1, train), (vg, vu), (tg, tu), valid_slides)


def assign_eval_slides(normal: Sequence[str], tumour: Sequence[str], valid_slides: int,
                       seed: int) -> dict[str, str]:
    """Slide-level valid/test split of the evaluation slides: ``{slide id: "valid" | "test"}``.

    ``valid_slides`` are shared between normal and tumour slides in proportion to their
    numbers (largest remainder), with at least one of each in valid and in test. The
    slides of each kind, in sorted order, are permuted by ``numpy.random.default_rng(seed)``
    (normal first, then tumour) and the first ones go to valid.
    """
    normal, tumour = sorted(normal), sorted(tumour)
    if len(normal) < 2 or len(tumour) < 2:
        raise ValueError("need at least two normal and two tumour evaluation slides")
    total = len(normal) + len(tumour)
    n_valid = min(max(2, valid_slides), total - 2)
    vn, vt = proportional([len(normal), len(tumour)], total, n_valid, minimum=1)
    vn, vt = min(vn, len(normal) - 1), min(vt, len(tumour) - 1)
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for ids, k in ((normal, vn), (tumour, vt)):
        for rank, i in enumerate(rng.permutation(len(ids))):
            out[ids[int(i)]] = "valid" if rank < k else "test"
    return out


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    """The generator that orders one slide's candidate patches (independent of the other slides)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(slide_id.encode())])


def grid_origins(width: int, height: int, size: int = PATCH) -> np.ndarray:
    """Top-left corners [N, 2] of the ``size`` grid cells lying wholly inside a level-0 slide."""
    xs = np.arange(0, width - size + 1, size, dtype=np.int64)
    ys = np.arange(0, height - size + 1, size, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tumour_origins(ann: wsi.Annotations, width: int, height: int, size: int = PATCH) -> np.ndarray:
    """Top-left corners [N, 2] of patches whose centre is tumour in ``ann``.

    Candidate centres: the centres of the ``size`` grid cells inside a tumour polygon's
    bounding box (clipped to the slide), plus one interior point of every tumour polygon
    that holds no grid centre (small metastases); kept when :meth:`~datasets_prep.wsi.Annotations.contains` says
    tumour and the patch lies wholly inside the slide.
    """
    half = size // 2
    centres = []
    for poly in ann.tumour:
        x0, y0, x1, y1 = poly.bbox
        x1, y1 = min(x1, width), min(y1, height)  # no patch lies past the slide: a corrupt polygon's grid stays small
        gx = np.arange(max(0, int(np.floor((x0 - half) / size))), int(np.ceil((x1 - half) / size)) + 1)
        gy = np.arange(max(0, int(np.floor((y0 - half) / size))), int(np.ceil((y1 - half) / size)) + 1)
        mx, my = np.meshgrid(gx * size + half, gy * size + half)
        pts = np.stack([mx.ravel(), my.ravel()], axis=1)
        pts = pts[wsi.points_in_polygon(pts, poly.points)]
        if len(pts) == 0:
            p = wsi.interior_point(poly.points)
            if p is not None:
                pts = np.array([[int(np.floor(p[0])), int(np.floor(p[1]))]], dtype=np.int64)
        centres.append(pts.astype(np.int64))
    if not centres:
        return np.zeros((0, 2), dtype=np.int64)
    pts = np.unique(np.concatenate(centres), axis=0)
    pts = pts[ann.contains(pts)]
    origins = pts - half
    inside = (origins[:, 0] >= 0) & (origins[:, 1] >= 0) & (origins[:, 0] + size <= width) & \
             (origins[:, 1] + size <= height)
    return origins[inside]


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideItem:
    """One slide the protocol may use."""

    slide_id: str
    path: Path
    pool: str
    """``train`` (normal training slide) or ``eval`` (test slide)."""
    label: str | None
    """good | Ungood (None: the test slide has no row in reference.csv)."""
    xml: Path | None = None


@dataclass(frozen=True)
class Inputs:
    raw: Path
    train: list[SlideItem]
    eval: list[SlideItem]
    reference: Path
    excluded: list[str]


@dataclass
class Scanned:
    """A slide's tissue scan: its threshold and its candidate patches in drawing order."""

    item: SlideItem
    threshold: int
    capacity: int
    candidates: np.ndarray


@dataclass
class Bad:
    """An unusable input found while planning: reported through write_bench (skipped.csv)."""

    item: SlideItem
    source: str
    error: DataError


@dataclass(frozen=True)
class SlideJob:
    """What the job function writes for one slide."""

    path: Path
    source: str
    slide_id: str
    split: str
    label: str
    quota: int
    threshold: int
    min_tissue: float
    candidates: np.ndarray


def read_reference(path: Path) -> dict[str, str]:
    """``{slide id: "good" | "Ungood"}`` from CAMELYON16's ``testing/reference.csv``.

    The file as distributed has no header: ``test_001,Tumor,Macro,...`` / ``test_003,Normal,...``
    (columns after the second are ignored). A header row is accepted when it names the id
    column (image, name, slide, id, image_id, slide_id, ...) and the label column (label,
    class, diagnosis). Anything else is a DataError naming the file.
    """
    hint = "use testing/reference.csv from the CAMELYON16 download (rows: test_NNN,Normal|Tumor,...), or --reference"
    rows = [r for r in read_csv(path, hint) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} is empty", hint=hint)
    id_col, label_col = 0, 1
    first = [c.strip().lower() for c in rows[0]]
    if not SLIDE_RE.fullmatch(first[0] if first else ""):
        ids = [i for i, c in enumerate(first) if c in {"image", "name", "slide", "id", "image_id", "slide_id",
                                                         "image_name", "slide_name", "filename", "file"}]
        labels = [i for i, c in enumerate(first) if c in {"label", "class", "diagnosis", "ground_truth", "type"}]
        labels = [i for i in labels if first[i] != "type"] or labels
        if not ids or not labels:
            raise DataError(f"{path} has unexpected columns {rows[0]}: expected no header and rows "
                            "'test_NNN,Normal|Tumor,...', or a header naming the slide id and label columns",
                            hint=hint)
        id_col, label_col = ids[0], labels[0]
        rows = rows[1:]
    out: dict[str, str] = {}
    for n, row in enumerate(rows, start=1):
        if len(row) <= max(id_col, label_col):
            raise DataError(f"{path} row {n} {row} has {len(row)} column(s); expected the slide id and "
                            "Normal/Tumor", hint=hint)
        sid, label = row[id_col].strip(), row[label_col].strip().lower()
        m = SLIDE_RE.fullmatch(Path(sid).stem)
        if not m:
            raise DataError(f"{path} row {n}: {sid!r} is not a slide id like test_001", hint=hint)
        if label not in ("normal", "tumor", "tumour"):
            raise DataError(f"{path} row {n}: label {row[label_col]!r} of {sid} is neither Normal nor Tumor",
                            hint=hint)
        out[f"{m.group(1).lower()}_{m.group(2)}"] = GOOD if label == "normal" else UNGOOD
    return out


# ---------------------------------------------------------------------------
# the reorganizer
# ---------------------------------------------------------------------------
@register_reorganizer("camelyon16")
class Camelyon16(Reorganizer):
    """CAMELYON16 whole-slide TIFFs -> BMAD's Histopathology bench (256 x 256 level-0 patches)."""

    name = "camelyon16"
    bench = "camelyon16"
    folder = "Histopathology"
    description = ("Camelyon16 WSIs -> Histopathology bench: 256x256 level-0 tissue patches, normal training "
                   "slides for train, slide-level valid/test split of the test slides, tumour = patch centre "
                   "inside an annotation polygon")
    raw_layout = """\
training/normal/normal_001.tif ... normal_160.tif     whole-slide TIFFs, read with OpenSlide (159)
training/tumor/tumor_001.tif ...                      (not used: BMAD trains on normal slides only)
testing/images/test_001.tif ... test_130.tif
testing/lesion_annotations/test_001.xml ...           ASAP XML of every tumour test slide
testing/reference.csv                                 test_001,Tumor,... / test_003,Normal,...
(slides and XML are found by name anywhere under --raw, e.g. the AWS layout images/ + annotations/)"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        reference: str | os.PathLike | None = None,
        exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
        split_seed: int = 0,
        train_patches: int | None = None,
        valid_patches: int | None = None,
        test_patches: int | None = None,
        tissue_downsample: float = 32,
        saturation_threshold: str | int = "otsu",
        min_saturation: int = 20,
        min_tissue: float = 0.5,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.reference = Path(reference) if reference else None
        items = exclude.split(",") if isinstance(exclude, str) else list(exclude or ())
        self.exclude = sorted({s.strip().lower() for s in items if s.strip()})
        self.split_seed = int(split_seed)
        for opt, v in (("--train-patches", train_patches), ("--valid-patches", valid_patches),
                       ("--test-patches", test_patches)):
            if v is not None and int(v) < 1:
                raise UsageError(f"{opt} must be at least 1, got {v}")
        self.train_patches = None if train_patches is None else int(train_patches)
        self.valid_patches = None if valid_patches is None else int(valid_patches)
        self.test_patches = None if test_patches is None else int(test_patches)
        if float(tissue_downsample) < 1:
            raise UsageError(f"--tissue-downsample must be at least 1, got {tissue_downsample}")
        self.tissue_downsample = float(tissue_downsample)
        thr = str(saturation_threshold).strip().lower()
        if thr != "otsu":
            try:
                value = int(thr)
            except ValueError:
                raise UsageError(f"--saturation-threshold must be 'otsu' or an integer 0..255, got "
                                 f"{saturation_threshold!r}") from None
            if not 0 <= value <= 255:
                raise UsageError(f"--saturation-threshold must be in 0..255, got {value}")
            thr = str(value)
        self.saturation_threshold = thr
        self.min_saturation = int(min_saturation)
        if not 0.0 <= float(min_tissue) <= 1.0:
            raise UsageError(f"--min-tissue must be in [0, 1], got {min_tissue}")
        self.min_tissue = float(min_tissue)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw`` plus the Camelyon16 options (``--out`` and the common options come from the CLI)."""
        with contextlib.suppress(argparse.ArgumentError):  # a CLI that adds --raw itself
            parser.add_argument("--raw", type=Path, required=True,
                                help="the CAMELYON16 folder (training/, testing/; see the raw layout)")
        parser.add_argument("--reference", type=Path, default=None,
                            help="the test labels CSV (default RAW/testing/reference.csv, else the one "
                                 "reference.csv under --raw)")
        parser.add_argument("--exclude", default=DEFAULT_EXCLUDE,
                            help=f"comma-separated slide ids left out (default {DEFAULT_EXCLUDE}: withdrawn "
                                 "duplicate and not exhaustively annotated; '' keeps all)")
        parser.add_argument("--split-seed", type=int, default=0,
                            help="seed of the valid/test slide split and of the patch draws (default 0)")
        parser.add_argument("--train-patches", type=int, default=None,
                            help="training patches (default 5,088 x normal training slides / 159)")
        parser.add_argument("--valid-patches", type=int, default=None,
                            help="valid patches per label (default 100 x test slides / 128)")
        parser.add_argument("--test-patches", type=int, default=None,
                            help="test patches per label (default 1,000 x test slides / 128)")
        parser.add_argument("--tissue-downsample", type=float, default=32,
                            help="downsample of the thumbnail the tissue is detected on (default 32)")
        parser.add_argument("--saturation-threshold", default="otsu",
                            help="saturation 0..255 at or above which a pixel is tissue, or 'otsu' (default: "
                                 "Otsu's threshold on each slide's thumbnail, at least --min-saturation)")
        parser.add_argument("--min-saturation", type=int, default=20,
                            help="lowest threshold Otsu may give (default 20)")
        parser.add_argument("--min-tissue", type=float, default=0.5,
                            help="fraction of a patch that must be tissue, on the thumbnail and at level 0 "
                                 "(default 0.5)")

    # -- inputs ------------------------------------------------------------------
    def find_inputs(self) -> Inputs:
        """The slides, annotation XML and reference CSV under ``raw`` (found by name), validated."""
        raw = self.raw
        if not raw.is_dir():
            raise DataError(f"raw folder {raw} does not exist",
                            hint="pass --raw pointing at the CAMELYON16 folder (training/, testing/)")
        slides: dict[str, Path] = {}
        xmls: dict[str, Path] = {}
        references: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(raw, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                stem, ext = os.path.splitext(name)
                ext = ext.lower()
                if name.lower() == "reference.csv":
                    references.append(path)
                m = SLIDE_RE.fullmatch(stem)
                if not m:
                    continue
                sid = f"{m.group(1).lower()}_{m.group(2)}"
                table = slides if ext in SLIDE_SUFFIXES else xmls if ext == ".xml" else None
                if table is None:
                    continue
                if sid in table:
                    raise DataError(f"two files for {sid} under {raw}: {table[sid]} and {path}",
                                    hint="keep one copy of each slide and annotation under --raw")
                table[sid] = path
        excluded = sorted(s for s in slides if s in self.exclude)
        train_ids = sorted(s for s in slides if s.startswith("normal_") and s not in self.exclude)
        eval_ids = sorted(s for s in slides if s.startswith("test_") and s not in self.exclude)
        if not train_ids:
            raise DataError(f"no normal training slides (normal_NNN.tif) under {raw}",
                            hint="unpack CAMELYON16 so that --raw/training/normal/normal_001.tif exists")
        if not eval_ids:
            raise DataError(f"no test slides (test_NNN.tif) under {raw}",
                            hint="unpack CAMELYON16 so that --raw/testing/images/test_001.tif exists")
        reference = self._reference_path(references)
        labels = read_reference(reference)
        train = [SlideItem(s, slides[s], "train", GOOD) for s in train_ids]
        evals = [SlideItem(s, slides[s], "eval", labels.get(s), xmls.get(s)) for s in eval_ids]
        return Inputs(raw, train, evals, reference, excluded)

    def _reference_path(self, found: list[Path]) -> Path:
        if self.reference is not None:
            if not self.reference.is_file():
                raise DataError(f"--reference {self.reference} does not exist",
                                hint="pass the CAMELYON16 testing/reference.csv")
            return self.reference
        default = self.raw / "testing" / "reference.csv"
        if default.is_file():
            return default
        if len(found) == 1:
            return found[0]
        if not found:
            raise DataError(f"the test labels {default} are missing (no reference.csv under {self.raw})",
                            hint="copy testing/reference.csv from the CAMELYON16 download, or pass --reference")
        raise DataError(f"{len(found)} reference.csv files under {self.raw}: {', '.join(map(str, found))}",
                        hint="pass --reference to say which one holds the test labels")

    # -- planning -----------------------------------------------------------------
    def sizes(self, n_train: int, n_eval: int) -> Sizes:
        """:func:`split_sizes` with the ``--*-patches`` overrides applied."""
        s = split_sizes(n_train, n_eval)
        return Sizes(
            self.train_patches or s.train,
            (self.valid_patches, self.valid_patches) if self.valid_patches else s.valid,
            (self.test_patches, self.test_patches) if self.test_patches else s.test,
            s.valid_slides,
        )

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.raw).as_posix()
        except ValueError:
            return str(path)

    def _scan(self, job: tuple[SlideItem, int]) -> Scanned | Bad:
        """Open one slide (its own OpenSlide handle), detect its tissue and list its candidates."""
        item, cap = job
        source = self._rel(item.path)
        try:
            if item.label is None:
                raise DataError(f"test slide {item.slide_id} has no row in the reference CSV",
                                hint="use the reference.csv of the same CAMELYON16 release, or --exclude it")
            if item.label == UNGOOD and item.xml is None:
                raise DataError(f"tumour slide {item.slide_id} has no annotation XML "
                                f"(expected testing/lesion_annotations/{item.slide_id}.xml)",
                                hint="unpack testing/lesion_annotations.zip under --raw, or --exclude the slide")
            with wsi.open_slide(item.path) as slide:
                thumb = wsi.saturation_thumbnail(slide, self.tissue_downsample, path=item.path)
        except DataError as exc:
            return self._bad(item, source, exc)
        threshold = wsi.tissue_threshold(thumb.sat, self.saturation_threshold, self.min_saturation)
        mask = thumb.sat >= threshold
        if item.label == GOOD:
            origins = grid_origins(thumb.width, thumb.height)
        else:
            try:
                ann = wsi.parse_asap_xml(item.xml)
                if not ann.tumour:
                    raise DataError(f"{item.xml} has no tumour polygon (groups {sorted(wsi.TUMOUR_GROUPS)}) but "
                                    f"reference.csv calls {item.slide_id} Tumor",
                                    hint="use the annotation of the same CAMELYON16 release, or --exclude the slide")
            except DataError as exc:
                return self._bad(item, self._rel(item.xml), exc)
            origins = tumour_origins(ann, thumb.width, thumb.height)
        if len(origins):
            frac = thumb.fractions(mask, origins[:, 0], origins[:, 1], PATCH)
            origins = origins[frac >= self.min_tissue]
        order = slide_rng(self.split_seed, item.slide_id).permutation(len(origins))
        return Scanned(item, threshold, len(origins), origins[order[:cap]])

    def _bad(self, item: SlideItem, source: str, exc: DataError) -> Bad:
        if self.on_error == "fail":
            raise exc
        log.warning("camelyon16: skipping %s: %s", source, str(exc).replace("\n", " "))
        return Bad(item, source, exc)

    def plan(self, inputs: Inputs, *, progress: bool = False) -> tuple[list[Job], list[str]]:
        """Scan every slide and build the write jobs (and the error jobs of unusable inputs).

        Returns the jobs and the human-readable shortfalls (groups given fewer candidates
        than their quota).
        """
        n_normal = sum(it.label == GOOD for it in inputs.eval)
        n_tumour = sum(it.label == UNGOOD for it in inputs.eval)
        if n_normal < 2 or n_tumour < 2:
            raise DataError(
                f"{inputs.raw} has {n_normal} normal and {n_tumour} tumour test slide(s) (after --exclude "
                f"{','.join(self.exclude) or 'nothing'}); the slide-level valid/test split needs at least two of each",
                hint="give more test slides (testing/reference.csv labels them)",
            )
        sizes = self.sizes(len(inputs.train), len(inputs.eval))
        cap_train = 2 * sizes.train + 64
        cap_good = 2 * max(sizes.valid[0], sizes.test[0]) + 64
        cap_ungood = 2 * max(sizes.valid[1], sizes.test[1]) + 64
        todo = [(it, cap_train) for it in inputs.train] + [
            (it, cap_ungood if it.label == UNGOOD else cap_good) for it in inputs.eval]
        results = list(threaded_map(self._scan, todo, self.workers, "scan slides", progress, unit="slide"))
        scanned = {r.item.slide_id: r for r in results if isinstance(r, Scanned)}
        bad = [r for r in results if isinstance(r, Bad)]

        train = [scanned[it.slide_id] for it in inputs.train if it.slide_id in scanned]
        normal = [it.slide_id for it in inputs.eval if it.slide_id in scanned and it.label == GOOD]
        tumour = [it.slide_id for it in inputs.eval if it.slide_id in scanned and it.label == UNGOOD]
        if not train:
            raise DataError(f"no usable normal training slide under {inputs.raw}", hint="see the reasons above")
        if len(normal) < 2 or len(tumour) < 2:
            raise DataError(
                f"{inputs.raw} has {len(normal)} usable normal and {len(tumour)} usable tumour test slide(s); "
                "the slide-level valid/test split needs at least two of each",
                hint="give more test slides (reference.csv labels them), or fix the skipped ones",
            )
        where = assign_eval_slides(normal, tumour, sizes.valid_slides, self.split_seed)
        groups = [("train", GOOD, sizes.train, train)]
        for split, quotas in (("valid", sizes.valid), ("test", sizes.test)):
            for label, quota in zip((GOOD, UNGOOD), quotas, strict=True):
                members = [scanned[s] for s in sorted(where) if where[s] == split and scanned[s].item.label == label]
                groups.append((split, label, quota, members))

        jobs: list[Job] = []
        shortfalls: list[str] = []
        for split, label, quota, members in groups:
            takes = share_quota(quota, [m.capacity for m in members])
            if sum(takes) < quota:
                shortfalls.append(f"{split}/{label}: {sum(takes)} of {quota} patches (its {len(members)} slide(s) "
                                  f"hold too few {'tissue' if label == GOOD else 'tumour'} patches)")
            for m, k in zip(members, takes, strict=True):
                if k == 0:
                    continue
                source = self._rel(m.item.path)
                jobs.append(Job(source, source, SlideJob(m.item.path, source, m.item.slide_id, split, label, k,
                                                         m.threshold, self.min_tissue, m.candidates)))
        for b in bad:
            jobs.append(Job(self._rel(b.item.path), b.source, b))
        return jobs, shortfalls

    # -- writing ----------------------------------------------------------------------
    @staticmethod
    def write_slide(job: SlideJob | Bad) -> list[Output]:
        """Read one slide's patches (its own OpenSlide handle): the first ``quota`` candidates,
        in drawing order, whose level-0 pixels are at least ``min_tissue`` tissue."""
        if isinstance(job, Bad):
            raise job.error
        outputs: list[Output] = []
        rejected = 0
        with wsi.open_slide(job.path) as slide:
            for x, y in job.candidates.tolist():
                if len(outputs) == job.quota:
                    break
                rgb = wsi.read_rgb(slide, x, y, PATCH, PATCH, path=job.path)
                if wsi.tissue_fraction(rgb, job.threshold) < job.min_tissue:
                    rejected += 1
                    continue
                outputs.append(Output(job.split, job.label, f"{job.slide_id}_x{x:06d}_y{y:06d}.png",
                                      png_bytes(rgb), None, job.slide_id, job.source, f"x{x}_y{y}"))
        if len(outputs) < job.quota:
            log.warning("camelyon16: %s gave %d of %d %s/%s patches (%d candidates failed the level-0 tissue check)",
                        job.source, len(outputs), job.quota, job.split, job.label, rejected)
        return outputs

    def options(self, inputs: Inputs) -> dict[str, Any]:
        """What the bench depends on besides the input listing (the fingerprint's options)."""
        return {
            "protocol": "camelyon16/1", "patch": PATCH, "exclude": self.exclude, "split_seed": self.split_seed,
            "train_patches": self.train_patches, "valid_patches": self.valid_patches,
            "test_patches": self.test_patches, "tissue_downsample": self.tissue_downsample,
            "saturation_threshold": self.saturation_threshold, "min_saturation": self.min_saturation,
            "min_tissue": self.min_tissue,
            "reference_sha256": hashlib.sha256(inputs.reference.read_bytes()).hexdigest(),
        }

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/Histopathology/`` (patches + manifest.csv) and say what was written."""
        inputs = self.find_inputs()
        if inputs.excluded:
            log.info("camelyon16: left out %s (--exclude)", ", ".join(inputs.excluded))
        jobs, shortfalls = self.plan(inputs, progress=progress)
        for msg in shortfalls:
            log.warning("camelyon16: %s", msg)
        files = [it.path for it in inputs.train + inputs.eval]
        files += [it.xml for it in inputs.eval if it.xml is not None]
        files = [p for p in files if _under(p, self.raw)]
        fingerprint = input_fingerprint(self.options(inputs), files, self.raw)
        return write_bench(Path(out), self.folder, jobs, self.write_slide, fingerprint=fingerprint,
                           workers=self.workers, on_error=self.on_error, overwrite=self.overwrite,
                           progress=progress, desc="write patches")

    # -- synthetic raw data ----------------------------------------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 8, seed: int = 0, size: tuple[int, int] = (16384, 12288),
                   tile: int = 512, compression: str = "jpeg") -> Path:
        """Write a synthetic CAMELYON16 raw set of ``n`` slides (at least 5) and return ``raw``.

        Pyramidal tiled TIFFs that OpenSlide opens as ``generic-tiff`` (as ASAP's converter
        wrote CAMELYON16; ``tile`` x ``tile`` tiles, ``compression`` jpeg or zlib, levels
        halving down to about one tile) of ``size`` (width, height) level-0 pixels at
        0.243 um/pixel: white background with pink tissue sections, tumour slides with a
        purple tumour region annotated by a ``Tumor``/``_0`` polygon holding an
        ``Exclusion``/``_2`` polygon, plus one small (ITC-like) tumour polygon.
        ``n_test = max(4, n // 2)`` test slides (half tumour) and the rest normal training
        slides; one small training tumour slide and its XML complete the layout (unused by
        the protocol). Real CAMELYON16 slides are ~100,000 pixels a side: the patch rate
        does not depend on the slide size, the tissue scan grows with its area.
        """
        return write_synthetic_raw(Path(raw), n=n, seed=seed, size=size, tile=tile, compression=compression)


# ---------------------------------------------------------------------------
# synthetic CAMELYON16-like slides
# ---------------------------------------------------------------------------
BACKGROUND = (244, 243, 245)
EOSIN = (234, 158, 200)
NUCLEUS = (112, 62, 150)
TUMOUR_BASE = (176, 96, 178)
TUMOUR_NUCLEUS = (88, 42, 128)


def _hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """A well-mixed uint32 per (a, b) pair (deterministic texture noise)."""
    h = (a.astype(np.uint32) * np.uint32(0x9E3779B1)) ^ (b.astype(np.uint32) * np.uint32(0x85EBCA77))
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    """A closed, star-shaped wavy polygon [n, 2] around (cx, cy) of mean radius ``r``."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    rad = r * (1 + 0.12 * np.sin(3 * t + p1) + 0.06 * np.sin(5 * t + p2))
    return np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)


def _fill(polygons: Sequence[np.ndarray], x: int, y: int, w: int, h: int, ds: int) -> np.ndarray:
    """Pixels of ``[x, x + w) x [y, y + h)`` (level ``ds``) whose centre is inside any of
    ``polygons`` (level-0 vertices, even-odd rule): an exact scanline fill, so a region
    renders the same whichever tiles it is cut into."""
    mask = np.zeros((h, w), dtype=bool)
    yc = (np.arange(y, y + h, dtype=np.float64) + 0.5) * ds
    for poly in polygons:
        x1, y1 = poly[:, 0], poly[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        cross = (y1[None, :] > yc[:, None]) != (y2[None, :] > yc[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = x1[None, :] + (yc[:, None] - y1[None, :]) * ((x2 - x1) / (y2 - y1))[None, :]
        xs = np.where(cross, xs, np.inf)
        xs.sort(axis=1)
        for i in np.flatnonzero(cross.any(axis=1)):
            row = xs[i][np.isfinite(xs[i])]
            for a, b in zip(row[0::2], row[1::2], strict=False):
                j0 = max(0, int(np.ceil(a / ds - 0.5)) - x)
                j1 = min(w, int(np.ceil(b / ds - 0.5)) - x)
                if j1 > j0:
                    mask[i, j0:j1] = True
    return mask


@dataclass
class SyntheticSlide:
    """A procedural H&E-like slide: tissue ellipses, tumour polygons minus exclusion polygons."""

    width: int
    height: int
    ellipses: list[tuple[float, float, float, float, float]]
    tumour: list[np.ndarray]
    exclusion: list[np.ndarray]
    salt: int

    @classmethod
    def make(cls, width: int, height: int, *, tumour: bool, seed: int) -> SyntheticSlide:
        rng = np.random.default_rng(seed)
        cx, cy = width * rng.uniform(0.40, 0.46), height * rng.uniform(0.46, 0.54)
        a, b = width * rng.uniform(0.34, 0.37), height * rng.uniform(0.40, 0.43)
        ellipses = [(cx, cy, a, b, float(rng.uniform(-0.15, 0.15)))]
        ellipses.append((width * 0.86, height * 0.22, width * 0.09, height * 0.13, float(rng.uniform(0, np.pi))))
        tum: list[np.ndarray] = []
        exc: list[np.ndarray] = []
        if tumour:
            r = 0.72 * min(a, b)
            tum.append(_blob(rng, cx, cy, r))
            exc.append(_blob(rng, cx + 0.3 * r, cy - 0.2 * r, 0.22 * r, n=24))
            # a small (ITC-like) metastasis inside the second tissue section
            tum.append(_blob(rng, width * 0.86, height * 0.22, min(0.3 * width * 0.09, 90.0), n=12))
        return cls(width, height, ellipses, tum, exc, int(rng.integers(1 << 31)))

    def xml(self, style: int) -> str:
        """ASAP XML of the tumour and exclusion polygons (Camelyon16 test style ``Tumor``/``Exclusion``
        when ``style`` is even, training style ``_0``/``_2`` when odd)."""
        tgroup, egroup = ("Tumor", "Exclusion") if style % 2 == 0 else ("_0", "_2")
        polys = [(tgroup, [tuple(p) for p in t]) for t in self.tumour]
        polys += [(egroup, [tuple(p) for p in e]) for e in self.exclusion]
        return wsi.asap_xml(polys)

    TEXTURE = 512
    """Period of the texture (pixels of any level): pixel (x, y) shows texture[y % 512, x % 512]."""

    def _textures(self, x: int, y: int, w: int, h: int, ds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Background, tissue and tumour colours of the pixels ``[x, x + w) x [y, y + h)`` of level ``ds``."""
        period = self.TEXTURE
        cache = self.__dict__.setdefault("_cache", {})
        if ds not in cache:
            gy, gx = np.mgrid[0:period, 0:period]
            noise = _hash(gx, gy, self.salt + ds)
            cell = max(1, 6 // ds)
            blobs = _hash(gx // cell, gy // cell, self.salt * 7 + ds) % np.uint32(100)
            jitter = ((noise % np.uint32(13)).astype(np.int16) - 6)[..., None]
            grain = ((noise >> np.uint32(8)) % np.uint32(5)).astype(np.int16)[..., None] - 2
            bg = np.array(BACKGROUND, np.int16) + grain
            out = [np.clip(bg, 0, 255).astype(np.uint8)]
            for base, nucleus, density in ((EOSIN, NUCLEUS, 14), (TUMOUR_BASE, TUMOUR_NUCLEUS, 45)):
                colour = np.where((blobs < density)[..., None], np.array(nucleus, np.int16), np.array(base, np.int16))
                out.append(np.clip(colour + jitter, 0, 255).astype(np.uint8))
            cache[ds] = tuple(out)
        if x % period == 0 and y % period == 0 and w == h == period:
            return cache[ds]
        rows, cols = np.arange(y, y + h) % period, np.arange(x, x + w) % period
        return tuple(t[rows][:, cols] for t in cache[ds])

    def render(self, x: int, y: int, w: int, h: int, ds: int) -> np.ndarray:
        """Pixels ``[x, x + w) x [y, y + h)`` of the level with downsample ``ds``."""
        bg, tissue_colour, tumour_colour = self._textures(x, y, w, h, ds)
        X = ((np.arange(x, x + w, dtype=np.float32) + 0.5) * ds)[None, :]
        Y = ((np.arange(y, y + h, dtype=np.float32) + 0.5) * ds)[:, None]
        x0, x1, y0, y1 = x * ds, (x + w) * ds, y * ds, (y + h) * ds
        tissue = None
        for cx, cy, a, b, th in self.ellipses:
            r = max(a, b)
            if cx + r < x0 or cx - r > x1 or cy + r < y0 or cy - r > y1:
                continue
            c, s = np.float32(np.cos(th)), np.float32(np.sin(th))
            dx, dy = X - np.float32(cx), Y - np.float32(cy)
            u = (dx * (c / np.float32(a))) + (dy * (s / np.float32(a)))
            v = (dy * (c / np.float32(b))) - (dx * (s / np.float32(b)))
            inside = u * u + v * v <= 1.0
            tissue = inside if tissue is None else tissue | inside
        if tissue is None:
            return bg.copy()
        img = np.where(tissue[..., None], tissue_colour, bg)
        hits = [p for p in self.tumour if p[:, 0].max() >= x0 and p[:, 0].min() <= x1 and p[:, 1].max() >= y0
                and p[:, 1].min() <= y1]
        if hits:
            tumour = _fill(hits, x, y, w, h, ds) & ~_fill(self.exclusion, x, y, w, h, ds)
            img = np.where(tumour[..., None], tumour_colour, img)
        return img


def write_synthetic_raw(raw: Path, *, n: int = 8, seed: int = 0, size: tuple[int, int] = (16384, 12288),
                        tile: int = 512, compression: str = "jpeg") -> Path:
    """The generator behind :meth:`Camelyon16.synthesize` (see there)."""
    if n < 5:
        raise ValueError("a synthetic CAMELYON16 set needs at least 5 slides (1 training, 4 test)")
    raw = Path(raw)
    width, height = (int(v) for v in size)
    n_eval = max(4, n // 2)
    n_train = n - n_eval
    n_tumour = n_eval // 2
    rng = np.random.default_rng(seed)
    tumour_ids = {int(i) for i in rng.choice(n_eval, size=n_tumour, replace=False)}

    def slide(path: Path, is_tumour: bool, w: int, h: int) -> SyntheticSlide:
        spec = SyntheticSlide.make(w, h, tumour=is_tumour, seed=int(rng.integers(1 << 31)))
        wsi.write_pyramid_tiff(path, w, h, spec.render, tile=tile, compression=compression)
        return spec

    for i in range(1, n_train + 1):
        slide(raw / "training" / "normal" / f"normal_{i:03d}.tif", False, width, height)
    small = (max(2048, width // 8), max(2048, height // 8))
    spec = slide(raw / "training" / "tumor" / "tumor_001.tif", True, *small)
    (raw / "training" / "lesion_annotations").mkdir(parents=True, exist_ok=True)
    (raw / "training" / "lesion_annotations" / "tumor_001.xml").write_text(spec.xml(1))
    rows = []
    (raw / "testing" / "lesion_annotations").mkdir(parents=True, exist_ok=True)
    for i in range(1, n_eval + 1):
        sid = f"test_{i:03d}"
        is_tumour = (i - 1) in tumour_ids
        spec = slide(raw / "testing" / "images" / f"{sid}.tif", is_tumour, width, height)
        if is_tumour:
            (raw / "testing" / "lesion_annotations" / f"{sid}.xml").write_text(spec.xml(i))
            rows.append(f"{sid},Tumor,Macro")
        else:
            rows.append(f"{sid},Normal,")
    (raw / "testing" / "reference.csv").write_text("\n".join(rows) + "\n")
    return raw


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False
