"""BTCV + LiTS -> the ``Liver`` bench: liver-ROI axial CT slices, BTCV train, LiTS valid/test.

``bmad prepare liver --btcv BTCV --lits LITS --out DATA`` reads the BTCV abdomen
volumes (``img0001.nii.gz`` + ``label0001.nii.gz``, liver label 6) and the LiTS
volumes (``volume-N.nii`` + ``segmentation-N.nii``, liver 1, tumour 2) and writes
``DATA/Liver/`` in BMAD's layout with a ``manifest.csv``. docs/datasets/liver.md
states the protocol in full; in short:

* every volume is read in the orientation ``nibabel.as_closest_canonical`` gives it
  (RAS+), slice by slice, and an axial slice is written in the radiological view
  (anterior at the top, the patient's right on the image's left);
* pixels: HU window [-200, 250] -> 0..255, resized to 512x512 when the volume is
  not 512x512 in-plane, histogram-equalised inside the liver (``--no-equalize``
  skips it), every pixel outside the liver 0;
* only slices holding liver are used; BTCV slices are the (normal) training set,
  LiTS slices are valid/test, Ungood when they hold tumour (mask = tumour pixels);
* sizes (:func:`split_sizes`, :func:`plan_train`, :func:`plan_lits`): BMAD's
  1,542 / 166 (93 good + 73 Ungood) / 1,493 (833 + 660) for the 30 labelled BTCV
  and 131 LiTS volumes, proportional otherwise; LiTS patients go to valid or test
  whole, seeded by ``--split-seed``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bmad.errors import DataError, UsageError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import (
    Job,
    Output,
    check_nifti_size,
    input_fingerprint,
    mask_png,
    png_bytes,
    proportional,
    share_quota,
    spread,
    threaded_map,
    write_bench,
)

log = logging.getLogger(__name__)

SIZE = 512
"""Output images are SIZE x SIZE (BMAD's 512x512)."""
HU_WINDOW = (-200.0, 250.0)
"""The abdominal window, applied to both sources."""

BMAD_BTCV_VOLUMES = 30
"""Labelled BTCV volumes (``RawData/Training``); the 20 ``Testing`` volumes have no labels."""
BMAD_LITS_VOLUMES = 131
BMAD_TRAIN = 1542
BMAD_VALID = (93, 73)
"""Valid good, Ungood: BMAD's split script put the first 93 good and 73 Ungood LiTS slices in valid."""
BMAD_TEST = (833, 660)
"""Test good, Ungood: the rest of BMAD's 926 good and 733 Ungood LiTS slices."""
BMAD_PATIENTS = (13, 118)
"""LiTS patients in valid, test: 131 split as 166 : 1,493 slices (BMAD's split was not by patient)."""

CHUNK = 16
"""Raw slices read at a time when scanning a label volume."""

_BTCV_IMAGE = re.compile(r"^img(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_BTCV_LABEL = re.compile(r"^label(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_IMAGE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_LABEL = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


# -- sizes and the split ------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Slice quotas (and LiTS patient counts) for a given number of usable volumes."""

    train: int
    valid_patients: int
    test_patients: int
    valid_good: int
    valid_ungood: int
    test_good: int
    test_ungood: int

    def totals(self) -> dict[str, int]:
        """``{"train": .., "valid": .., "test": ..}``."""
        return {"train": self.train, "valid": self.valid_good + self.valid_ungood,
                "test": self.test_good + self.test_ungood}


def _round_div(num: int, den: int) -> int:
    """``num / den`` rounded half up, in integers."""
    return (2 * num + den) // (2 * den)


def split_sizes(n_btcv: int, n_lits: int) -> Sizes:
    """Quotas for ``n_btcv`` BTCV and ``n_lits`` LiTS volumes (those with liver).

    * train: ``proportional([1542], 30, n_btcv)``, i.e. 1,542 from 30 volumes on,
      ``round(1542 * n_btcv / 30)`` below (at least 1);
    * LiTS patients: ``proportional([13, 118], 131, n_lits)`` (each at least 1), from
      131 volumes on 13 valid and the rest test;
    * LiTS quotas: BMAD's slices per patient of the group times its patients, rounded
      half up: valid ``93 * p / 13`` good and ``73 * p / 13`` Ungood, test
      ``833 * p / 118`` and ``660 * p / 118`` (``p`` capped at 13 and 118).

    For 30 + 131 volumes (or more) this is BMAD's 1,542 / 166 (93 + 73) / 1,493 (833 + 660).
    """
    if n_btcv < 1:
        raise ValueError(f"the train set needs at least one BTCV volume, got {n_btcv}")
    if n_lits < 2:
        raise ValueError(f"valid and test need at least two LiTS volumes (one patient each), got {n_lits}")
    train = proportional([BMAD_TRAIN], BMAD_BTCV_VOLUMES, n_btcv)[0]
    if n_lits >= BMAD_LITS_VOLUMES:
        vp, tp = BMAD_PATIENTS[0], n_lits - BMAD_PATIENTS[0]
    else:
        vp, tp = proportional(list(BMAD_PATIENTS), BMAD_LITS_VOLUMES, n_lits)
    v, t = min(vp, BMAD_PATIENTS[0]), min(tp, BMAD_PATIENTS[1])
    return Sizes(
        train=train,
        valid_patients=vp,
        test_patients=tp,
        valid_good=_round_div(BMAD_VALID[0] * v, BMAD_PATIENTS[0]),
        valid_ungood=_round_div(BMAD_VALID[1] * v, BMAD_PATIENTS[0]),
        test_good=_round_div(BMAD_TEST[0] * t, BMAD_PATIENTS[1]),
        test_ungood=_round_div(BMAD_TEST[1] * t, BMAD_PATIENTS[1]),
    )


@dataclass(frozen=True)
class Choice:
    """One output image: slice ``slice`` (canonical axial index) of volume ``volume``."""

    volume: int
    slice: int
    split: str
    label: str


@dataclass
class Plan:
    """The chosen slices and the quotas the volumes could not fill (warned, not fatal)."""

    choices: list[Choice] = field(default_factory=list)
    shortfalls: list[str] = field(default_factory=list)


def _fill(plan: Plan, members: Sequence[int], slices: Sequence[Sequence[int]], quota: int,
          split: str, label: str) -> None:
    """Take ``quota`` slices of ``slices[m]`` over ``members`` (in that order) into ``plan``."""
    takes = share_quota(quota, [len(slices[m]) for m in members])
    for m, k in zip(members, takes, strict=True):
        plan.choices += [Choice(m, s, split, label) for s in spread(slices[m], k)]
    if sum(takes) < quota:
        kind = "tumour slices" if label == "Ungood" else "liver slices" if split == "train" else \
            "liver slices without tumour"
        plan.shortfalls.append(f"{split}/{label}: {sum(takes)} of {quota} slices "
                               f"(its {len(members)} volume(s) hold too few {kind})")


def plan_train(liver: Sequence[Sequence[int]], quota: int) -> Plan:
    """Train slices from the BTCV volumes' liver slices (volumes in sorted order).

    The quota is shared over the volumes (:func:`~datasets_prep.common.share_quota`) and each gives evenly spaced
    liver slices (:func:`~datasets_prep.common.spread`); with fewer liver slices than the quota all are taken.
    """
    plan = Plan()
    _fill(plan, range(len(liver)), liver, quota, "train", "good")
    return plan


def plan_lits(good: Sequence[Sequence[int]], tumour: Sequence[Sequence[int]], sizes: Sizes, seed: int) -> Plan:
    """Patient-level valid/test split of the LiTS volumes (in sorted order).

    ``good[i]``: volume ``i``'s liver slices without tumour, ``tumour[i]``: its tumour slices.

    1. ``order = numpy.random.default_rng(seed).permutation(n)``.
    2. Valid takes the first ``sizes.valid_patients`` volumes in that order that have
       both good and tumour slices (then, if too few have both, the next others in
       order); test takes the rest, in that order.
    3. Each group's good and Ungood quotas are shared over its volumes in that order
       (:func:`~datasets_prep.common.share_quota`) and each volume gives evenly spaced slices (:func:`~datasets_prep.common.spread`).
    """
    n = len(good)
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]
    mixed = [i for i in order if good[i] and tumour[i]]
    valid = mixed[: sizes.valid_patients]
    valid += [i for i in order if i not in valid][: sizes.valid_patients - len(valid)]
    test = [i for i in order if i not in valid]
    plan = Plan()
    _fill(plan, valid, good, sizes.valid_good, "valid", "good")
    _fill(plan, valid, tumour, sizes.valid_ungood, "valid", "Ungood")
    _fill(plan, test, good, sizes.test_good, "test", "good")
    _fill(plan, test, tumour, sizes.test_ungood, "test", "Ungood")
    return plan


# -- pixels -------------------------------------------------------------------------
def to_view(plane: np.ndarray) -> np.ndarray:
    """A RAS+ axial plane [x, y] -> image rows/cols in the radiological view:
    anterior at the top, the patient's right on the image's left (as brats2021)."""
    return plane.T[::-1, ::-1]


def window(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 255] floats: ``(clip(hu, -200, 250) + 200) * 255 / 450`` (NaN as -200)."""
    lo, hi = HU_WINDOW
    hu = np.asarray(hu, dtype=np.float64)
    if not np.isfinite(hu).all():
        hu = np.nan_to_num(hu, nan=lo, posinf=hi, neginf=lo)
    return (np.clip(hu, lo, hi) - lo) * (255.0 / (hi - lo))


def resize_image(plane: np.ndarray) -> np.ndarray:
    """A float plane resized to SIZE x SIZE (Pillow bilinear on float32); unchanged when already so."""
    if plane.shape == (SIZE, SIZE):
        return plane
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)


def resize_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean plane resized to SIZE x SIZE (Pillow nearest); unchanged when already so."""
    if mask.shape == (SIZE, SIZE):
        return mask
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8) * 255)
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.NEAREST)) > 0


def equalize_roi(values: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Histogram equalisation of the uint8 ``values`` inside ``roi``; 0 outside.

    With ``N`` ROI pixels and ``c(v)`` the number of ROI pixels with value <= ``v``,
    a ROI pixel of value ``v`` becomes ``ceil(255 * c(v) / N)``: 1..255, the highest
    value 255, order kept. Integer arithmetic, so exact and deterministic.
    """
    out = np.zeros(values.shape, np.uint8)
    inside = values[roi].astype(np.int64)
    if inside.size:
        cdf = np.cumsum(np.bincount(inside, minlength=256))
        lut = (255 * cdf + inside.size - 1) // inside.size
        out[roi] = lut[inside].astype(np.uint8)
    return out


def slice_pixels(hu: np.ndarray, roi: np.ndarray, equalize: bool) -> np.ndarray:
    """The 8-bit image of a canonical axial HU plane [x, y] given its liver ``roi`` (view, SIZE x SIZE).

    Window, radiological view, resize (bilinear, the whole plane), round half up,
    equalise inside the ROI (optional), 0 outside the ROI.
    """
    values = np.floor(np.clip(resize_image(window(to_view(hu))), 0.0, 255.0) + 0.5).astype(np.uint8)
    if equalize:
        return equalize_roi(values, roi)
    return np.where(roi, values, 0).astype(np.uint8)


# -- reading volumes ----------------------------------------------------------------
def _hint(path: Path, option: str) -> str:
    return f"re-download or re-extract {path.name}, or move it out of {option}"


class Volume:
    """A NIfTI volume read slice by slice in the orientation ``nibabel.as_closest_canonical`` gives it.

    Only the header is read on construction. ``.nii`` data is memory-mapped (only the
    slices asked for are read); ``.nii.gz`` data is decompressed once, unscaled.
    """

    def __init__(self, path: Path, option: str) -> None:
        import nibabel as nib

        self.path = Path(path)
        self.option = option
        try:
            img = nib.load(str(self.path))
            shape = tuple(int(d) for d in img.shape)
            ornt = nib.io_orientation(img.affine)
            self._proxy = img.dataobj
            self.slope = float(self._proxy.slope)
            self.inter = float(self._proxy.inter)
        except Exception as exc:  # nibabel, gzip and zlib raise many kinds: all mean a bad file
            raise DataError(f"cannot read {self.path}: {type(exc).__name__}: {exc}",
                            hint=_hint(self.path, option)) from exc
        if len(shape) < 3 or any(d != 1 for d in shape[3:]):
            raise DataError(f"{self.path} is not a 3-D volume (shape {shape})", hint=_hint(self.path, option))
        if min(shape[:3]) < 1:  # a dimension of 0, or negative in a corrupt header
            raise DataError(f"{self.path} is empty (shape {shape})", hint=_hint(self.path, option))
        if np.isnan(ornt).any():
            raise DataError(f"{self.path} has a degenerate affine (no orientation)", hint=_hint(self.path, option))
        check_nifti_size(img, self.path, _hint(self.path, option))
        self._ndim = len(shape)
        self.shape = shape[:3]
        self.ornt = ornt
        self.zaxis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        self.zflip = bool(ornt[self.zaxis, 1] < 0)
        canonical = [0, 0, 0]
        for axis in range(3):
            canonical[int(ornt[axis, 0])] = shape[axis]
        self.canonical_shape = tuple(canonical)
        self._raw: np.ndarray | None = None

    @property
    def depth(self) -> int:
        return self.canonical_shape[2]

    def raw_index(self, k: int) -> int:
        """The stored index (along the stored axis that becomes axial) of canonical slice ``k``."""
        return self.shape[self.zaxis] - 1 - k if self.zflip else k

    def _array(self) -> np.ndarray:
        if self._raw is None:
            try:
                raw = self._proxy.get_unscaled()
            except Exception as exc:  # any failure to read means a bad file
                raise DataError(f"cannot read {self.path}: {type(exc).__name__}: {exc}",
                                hint=_hint(self.path, self.option)) from exc
            self._raw = raw[(slice(None),) * 3 + (0,) * (self._ndim - 3)]
        return self._raw

    def raw_slab(self, lo: int, hi: int) -> np.ndarray:
        """Stored slices ``lo:hi`` along the axial axis, stored (unscaled) values, stored orientation."""
        index: list[Any] = [slice(None)] * 3
        index[self.zaxis] = slice(lo, hi)
        try:
            return np.array(self._array()[tuple(index)])
        except DataError:
            raise
        except Exception as exc:  # a truncated memory-mapped file fails here
            raise DataError(f"cannot read {self.path}: {type(exc).__name__}: {exc}",
                            hint=_hint(self.path, self.option)) from exc

    def canonical_plane(self, slab: np.ndarray) -> np.ndarray:
        """One stored slice (a slab of thickness 1) -> the canonical axial plane [x, y]."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(slab, self.ornt)[:, :, 0]

    def scaled(self, raw: np.ndarray) -> np.ndarray:
        """Stored values -> real values (``scl_slope``, ``scl_inter``), float64."""
        out = raw.astype(np.float64)
        if self.slope != 1.0 or self.inter != 0.0:
            out = out * self.slope + self.inter
        return out

    def labels(self, raw: np.ndarray) -> np.ndarray:
        """Stored values -> integer labels (scaled and rounded when stored as floats or scaled)."""
        if np.issubdtype(raw.dtype, np.integer) and self.slope == 1.0 and self.inter == 0.0:
            return raw
        return np.rint(np.nan_to_num(self.scaled(raw))).astype(np.int64)

    def plane(self, k: int) -> np.ndarray:
        """Canonical axial slice ``k`` ([x, y], stored values), i.e. ``as_closest_canonical(img)[:, :, k]``."""
        r = self.raw_index(k)
        return self.canonical_plane(self.raw_slab(r, r + 1))


# -- finding the inputs -------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One image + label volume of a source (either may be missing: an error to report)."""

    kind: str  # "btcv" | "lits"
    patient: str
    root: Path
    image: Path | None
    label: Path | None
    error: str = ""

    @property
    def option(self) -> str:
        return f"--{self.kind}"

    @property
    def source(self) -> str:
        """The image (or the label when the image is missing), relative to its root."""
        return ((self.image or self.label) or self.root).relative_to(self.root).as_posix()

    def files(self) -> list[Path]:
        return [p for p in (self.image, self.label) if p is not None]


def _walk(root: Path) -> list[Path]:
    """Every file under ``root`` (not in hidden folders), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files if not f.startswith(".")]
    return sorted(found)


def find_pairs(root: Path, kind: str, image_re: re.Pattern, label_re: re.Pattern,
               unlabelled_ok: str | None = None) -> list[Pair]:
    """Pair images and labels found anywhere under ``root`` by the number in their names.

    The patient id is ``<kind>_<number as written>`` (``btcv_0001``, ``lits_42``).
    ``unlabelled_ok``: a folder name (BTCV's ``Testing``) whose images have no labels
    by design and are ignored; any other image without a label (or label without an
    image) is an error to report.
    """
    option = f"--{kind}"
    if not root.is_dir():
        what = "BTCV RawData" if kind == "btcv" else "LiTS training batches"
        raise DataError(f"{option} folder {root} does not exist", hint=f"pass {option} pointing at the unpacked {what}")
    found: dict[str, dict[str, Path]] = {"image": {}, "label": {}}
    digits: dict[str, str] = {}
    for path in _walk(root):
        for regex, what in ((image_re, "image"), (label_re, "label")):
            m = regex.match(path.name)
            if not m:
                continue
            key = str(int(m.group(1)))
            if key in found[what]:
                raise DataError(f"two {kind.upper()} {what}s numbered {key} under {root}: "
                                f"{found[what][key].relative_to(root)} and {path.relative_to(root)}",
                                hint=f"keep one copy of each file under {option}")
            found[what][key] = path
            digits.setdefault(key, m.group(1))
    images, labels = found["image"], found["label"]
    if not images:
        example = "img0001.nii.gz" if kind == "btcv" else "volume-0.nii"
        raise DataError(f"no {kind.upper()} images (like {example}) under {root}",
                        hint=f"pass {option} pointing at the folder that holds them (searched recursively)")
    pairs = []
    for key in sorted(set(images) | set(labels), key=int):
        image, label = images.get(key), labels.get(key)
        patient = f"{kind}_{digits[key]}"
        if image is not None and label is None:
            if unlabelled_ok and unlabelled_ok.lower() in (p.lower() for p in image.relative_to(root).parts[:-1]):
                log.info("liver: %s is an unlabelled %s image, not used", image, unlabelled_ok)
                continue
            want = f"label{digits[key]}.nii.gz" if kind == "btcv" else f"segmentation-{digits[key]}.nii"
            pairs.append(Pair(kind, patient, root, image, None,
                              f"{image} has no label file ({want}) under {root}"))
        elif image is None:
            pairs.append(Pair(kind, patient, root, None, label, f"{label} has no image file under {root}"))
        else:
            pairs.append(Pair(kind, patient, root, image, label))
    return pairs


# -- the reorganizer ----------------------------------------------------------------
@dataclass(frozen=True)
class Flags:
    """Per canonical axial slice: holds liver (ROI, at output size), holds tumour."""

    liver: np.ndarray
    tumour: np.ndarray


@dataclass(frozen=True)
class VolumeJob:
    """What a job writes: the chosen slices of one pair, or the error to report for it."""

    pair: Pair
    choices: tuple[Choice, ...] = ()
    error: DataError | None = None


@register_reorganizer("liver")
class Liver(Reorganizer):
    """BTCV (train) + LiTS (valid/test) CT volumes -> BMAD's Liver bench (liver-ROI slices + tumour masks)."""

    name = "liver"
    bench = "liver"
    folder = "Liver"
    description = ("BTCV + LiTS abdominal CT -> Liver bench: HU window [-200, 250], liver ROI, 512x512 axial "
                   "slices, histogram equalised; BTCV train, LiTS valid/test (tumour = Ungood)")
    raw_layout = """\
--btcv: BTCV "RawData.zip" (Synapse syn3193805), unpacked; searched recursively:
  RawData/Training/img/img0001.nii.gz ... img0040.nii.gz     (30 labelled CTs)
  RawData/Training/label/label0001.nii.gz ...                (labels 0-13, liver 6)
  RawData/Testing/img/img0061.nii.gz ...                     (no labels: ignored)
  (a flat folder of img*.nii.gz + label*.nii.gz works too)
--lits: LiTS training set (131 CTs), unpacked; searched recursively:
  Training Batch 1/volume-0.nii, segmentation-0.nii ... (0-27)
  Training Batch 2/volume-28.nii, segmentation-28.nii ... (28-130)   (liver 1, tumour 2; .nii.gz too)"""

    def __init__(
        self,
        btcv: str | os.PathLike | None = None,
        lits: str | os.PathLike | None = None,
        *,
        raw: str | os.PathLike | None = None,
        btcv_liver_label: int = 6,
        lits_liver_label: int = 1,
        lits_tumour_label: int = 2,
        equalize: bool = True,
        split_seed: int = 0,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        if raw is not None:
            btcv = Path(raw) / "BTCV" if btcv is None else btcv
            lits = Path(raw) / "LiTS" if lits is None else lits
        if btcv is None or lits is None:
            raise UsageError("liver needs both --btcv and --lits",
                             hint="pass --btcv BTCV_DIR --lits LITS_DIR (or raw= a folder holding BTCV/ and LiTS/)")
        self.btcv = Path(btcv)
        self.lits = Path(lits)
        self.btcv_liver_label = int(btcv_liver_label)
        self.lits_liver_label = int(lits_liver_label)
        self.lits_tumour_label = int(lits_tumour_label)
        if self.lits_liver_label == self.lits_tumour_label:
            raise UsageError(f"--lits-liver-label and --lits-tumour-label are both {self.lits_liver_label}",
                             hint="LiTS uses 1 for liver and 2 for tumour")
        self.equalize = bool(equalize)
        self.split_seed = int(split_seed)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--btcv``, ``--lits`` and the liver options (``--out`` etc. are added by the CLI)."""
        parser.add_argument("--btcv", type=Path, required=True,
                            help="unpacked BTCV RawData (img*.nii.gz + label*.nii.gz, searched recursively)")
        parser.add_argument("--lits", type=Path, required=True,
                            help="unpacked LiTS training set (volume-N.nii + segmentation-N.nii, searched recursively)")
        parser.add_argument("--btcv-liver-label", type=int, default=6, help="liver label in BTCV labels (default 6)")
        parser.add_argument("--lits-liver-label", type=int, default=1, help="liver label in LiTS (default 1)")
        parser.add_argument("--lits-tumour-label", type=int, default=2, help="tumour label in LiTS (default 2)")
        parser.add_argument("--no-equalize", dest="equalize", action="store_false",
                            help="no histogram equalisation (BMAD's un-equalised variant)")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the LiTS patient split (default 0)")

    # -- synthetic raw data ----------------------------------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 4, seed: int = 0, n_btcv: int | None = None, n_lits: int | None = None,
                   btcv_shape: tuple[int, int, int] = (512, 512, 100),
                   lits_shape: tuple[int, int, int] = (512, 512, 120)) -> Path:
        """Write ``n`` BTCV and ``n`` LiTS phantom CTs in their true layouts under ``raw``.

        ``raw/BTCV/RawData/Training/{img,label}/img0001.nii.gz ...`` (int16 HU, uint8
        labels with liver 6 and spleen 1, stored LPS) and ``raw/LiTS/Training Batch
        {1,2}/volume-N.nii`` + ``segmentation-N.nii`` (int16 HU, liver 1, tumour 2;
        stored LPS, RAS or LPI by ``N % 3``; volumes ``N % 5 == 4`` have no tumour).
        Prepare with ``Liver(raw=raw)``. Byte-reproducible from ``seed``.
        """
        from bmad.fsutil import write_bytes_atomic

        n_btcv = n if n_btcv is None else n_btcv
        n_lits = n if n_lits is None else n_lits
        raw = Path(raw)
        for i in range(n_btcv):
            hu, lab = phantom(btcv_shape, np.random.default_rng([seed, 0, i]), kind="btcv")
            for data, folder, name in ((hu, "img", f"img{i + 1:04d}"), (lab, "label", f"label{i + 1:04d}")):
                img = _stored(data, btcv_shape, ("L", "P", "S"), spacing_z=3.0)
                write_bytes_atomic(raw / "BTCV" / "RawData" / "Training" / folder / f"{name}.nii.gz",
                                   gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
        codes = (("L", "P", "S"), ("R", "A", "S"), ("L", "P", "I"))
        for i in range(n_lits):
            hu, lab = phantom(lits_shape, np.random.default_rng([seed, 1, i]), kind="lits", tumour=i % 5 != 4)
            batch = raw / "LiTS" / f"Training Batch {1 if i < 28 else 2}"
            for data, name in ((hu, f"volume-{i}"), (lab, f"segmentation-{i}")):
                img = _stored(data, lits_shape, codes[i % 3], spacing_z=2.5)
                write_bytes_atomic(batch / f"{name}.nii", img.to_bytes())
        return raw

    # -- scan and plan ---------------------------------------------------------------
    def _roi_labels(self, kind: str) -> list[int]:
        return [self.btcv_liver_label] if kind == "btcv" else [self.lits_liver_label, self.lits_tumour_label]

    def masks(self, label_plane: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Liver ROI and tumour masks (view, SIZE x SIZE) of a canonical label plane [x, y]."""
        view = to_view(label_plane)
        roi = resize_mask(np.isin(view, self._roi_labels(kind)))
        tumour = resize_mask(view == self.lits_tumour_label) if kind == "lits" else np.zeros_like(roi)
        return roi, tumour & roi

    def open_pair(self, pair: Pair) -> tuple[Volume, Volume]:
        """Both volumes of a pair, checked to have the same canonical shape (headers only)."""
        if pair.error:
            raise DataError(pair.error, hint=f"add the missing file or move {pair.source} out of {pair.option}")
        assert pair.image is not None and pair.label is not None
        image, label = Volume(pair.image, pair.option), Volume(pair.label, pair.option)
        if image.canonical_shape != label.canonical_shape:
            raise DataError(f"{pair.image} has shape {image.canonical_shape} but {pair.label.name} has "
                            f"{label.canonical_shape} (after reorienting)",
                            hint=f"give {pair.image.name} a label on the same grid, or move both out of {pair.option}")
        return image, label

    def scan(self, pair: Pair) -> Flags:
        """Per-slice liver and tumour flags of a pair, from its label volume (read in chunks)."""
        _, label = self.open_pair(pair)
        depth = label.depth
        liver = np.zeros(depth, bool)
        tumour = np.zeros(depth, bool)
        in_plane = tuple(a for a in range(3) if a != label.zaxis)
        roi_labels = self._roi_labels(pair.kind)
        resize = label.canonical_shape[:2] != (SIZE, SIZE)
        for lo in range(0, label.shape[label.zaxis], CHUNK):
            hi = min(label.shape[label.zaxis], lo + CHUNK)
            slab = label.labels(label.raw_slab(lo, hi))
            ks = [label.raw_index(r) for r in range(lo, hi)]
            if not resize:
                liver[ks] = np.isin(slab, roi_labels).any(axis=in_plane)
                if pair.kind == "lits":
                    tumour[ks] = (slab == self.lits_tumour_label).any(axis=in_plane)
                continue
            for j, k in enumerate(ks):
                roi, tum = self.masks(label.canonical_plane(np.take(slab, [j], axis=label.zaxis)), pair.kind)
                liver[k], tumour[k] = roi.any(), tum.any()
        return Flags(liver, tumour & liver)

    def _scan_or_error(self, pair: Pair) -> Flags | DataError:
        try:
            return self.scan(pair)
        except DataError as exc:
            if self.on_error == "fail":
                raise
            return exc

    def plan(self, pairs: Sequence[Pair], *, progress: bool = False) -> tuple[list[VolumeJob], Sizes]:
        """Scan the label volumes and choose the slices: one :class:`VolumeJob` per pair to write or report."""
        results = list(threaded_map(self._scan_or_error, pairs, self.workers, "scan", progress, unit="volume"))
        errors = [VolumeJob(p, error=r) for p, r in zip(pairs, results, strict=True) if isinstance(r, DataError)]
        usable: dict[str, list[tuple[Pair, Flags]]] = {"btcv": [], "lits": []}
        for pair, r in zip(pairs, results, strict=True):
            if isinstance(r, Flags):
                if r.liver.any():
                    usable[pair.kind].append((pair, r))
                else:
                    log.warning("liver: %s has no liver (label %s) in any slice; not used", pair.label,
                                "/".join(map(str, self._roi_labels(pair.kind))))
        if not usable["btcv"]:
            raise DataError(f"no usable BTCV volume with liver (label {self.btcv_liver_label}) under {self.btcv}",
                            hint="check --btcv and --btcv-liver-label (BTCV: 6)")
        if len(usable["lits"]) < 2:
            raise DataError(f"{len(usable['lits'])} usable LiTS volume(s) with liver under {self.lits}; valid and "
                            "test need at least 2 (one patient each)",
                            hint="check --lits, --lits-liver-label and --lits-tumour-label, or add volumes")
        sizes = split_sizes(len(usable["btcv"]), len(usable["lits"]))
        train = plan_train([np.flatnonzero(f.liver).tolist() for _, f in usable["btcv"]], sizes.train)
        lits = plan_lits([np.flatnonzero(f.liver & ~f.tumour).tolist() for _, f in usable["lits"]],
                         [np.flatnonzero(f.tumour).tolist() for _, f in usable["lits"]], sizes, self.split_seed)
        for split, label in (("valid", "good"), ("valid", "Ungood"), ("test", "good"), ("test", "Ungood")):
            if not any(c.split == split and c.label == label for c in lits.choices):
                kind = "liver slices without tumour" if label == "good" else "tumour slices inside the liver"
                raise DataError(f"{split}/{label} would be empty: its LiTS patients have no {kind} "
                                f"(tumour label {self.lits_tumour_label}) under {self.lits}",
                                hint="add LiTS volumes, or check --lits-liver-label and --lits-tumour-label")
        for msg in train.shortfalls + lits.shortfalls:
            log.warning("liver: %s", msg)
        jobs = list(errors)
        for kind, plan in (("btcv", train), ("lits", lits)):
            by_volume: dict[int, list[Choice]] = {}
            for c in sorted(plan.choices, key=lambda c: (c.volume, c.slice)):
                by_volume.setdefault(c.volume, []).append(c)
            jobs += [VolumeJob(usable[kind][v][0], tuple(cs)) for v, cs in sorted(by_volume.items())]
        return jobs, sizes

    # -- writing -----------------------------------------------------------------------
    def _write(self, job: VolumeJob) -> list[Output]:
        """Read one pair and render its chosen slices (and tumour masks)."""
        if job.error is not None:
            raise job.error
        pair = job.pair
        image, label = self.open_pair(pair)
        outputs = []
        for c in job.choices:
            r = label.raw_index(c.slice)
            roi, tumour = self.masks(label.canonical_plane(label.labels(label.raw_slab(r, r + 1))), pair.kind)
            if not roi.any() or bool(tumour.any()) != (c.label == "Ungood"):
                raise DataError(f"{pair.label} changed while it was being prepared", hint="run the command again")
            hu = image.scaled(image.plane(c.slice))
            pixels = slice_pixels(hu, roi, self.equalize)
            outputs.append(Output(
                c.split, c.label, f"{pair.patient}_{c.slice:03d}.png", png_bytes(pixels),
                mask_png(tumour) if c.label == "Ungood" else None,
                patient=pair.patient, source=pair.source, slice=str(c.slice),
            ))
        return outputs

    def find(self) -> list[Pair]:
        """BTCV then LiTS pairs, each in numeric order."""
        btcv = find_pairs(self.btcv, "btcv", _BTCV_IMAGE, _BTCV_LABEL, unlabelled_ok="Testing")
        lits = find_pairs(self.lits, "lits", _LITS_IMAGE, _LITS_LABEL)
        for pair in btcv + lits:
            if pair.error and self.on_error == "fail":
                raise DataError(pair.error, hint=f"add the missing file or move {pair.source} out of {pair.option}")
        return btcv + lits

    def options(self) -> dict[str, Any]:
        return {"bench": "liver", "format": 1, "size": SIZE, "window": list(HU_WINDOW),
                "btcv_liver_label": self.btcv_liver_label, "lits_liver_label": self.lits_liver_label,
                "lits_tumour_label": self.lits_tumour_label, "equalize": self.equalize, "split_seed": self.split_seed}

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/Liver/`` (images, masks, manifest.csv) through :func:`datasets_prep.common.write_bench`."""
        pairs = self.find()
        plan, _ = self.plan(pairs, progress=progress)
        jobs = [Job(f"{j.pair.kind}:{j.pair.source}", j.pair.source, j) for j in plan]
        files = {"btcv": [], "lits": []}
        for p in pairs:
            files[p.kind] += p.files()
        options = dict(self.options(), lits_inputs=input_fingerprint({}, files["lits"], self.lits))
        return write_bench(Path(out), self.folder, jobs, self._write,
                           fingerprint=input_fingerprint(options, files["btcv"], self.btcv),
                           workers=self.workers, on_error=self.on_error, overwrite=self.overwrite,
                           progress=progress, desc="liver")


# -- synthetic phantoms ---------------------------------------------------------------
def _stored(canonical: np.ndarray, shape: tuple[int, int, int], codes: tuple[str, str, str], spacing_z: float):
    """A Nifti1Image holding the RAS+ array ``canonical`` stored in orientation ``codes``
    (``as_closest_canonical`` gives ``canonical`` back). In-plane field of view 400 mm."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    spacing = (400.0 / shape[0], 400.0 / shape[1], spacing_z)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-200.0, -200.0, -spacing_z * shape[2] / 2]
    img = nib.Nifti1Image(canonical, affine)
    img.set_data_dtype(canonical.dtype)
    img.header.set_xyzt_units("mm")
    return img.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes)))


def phantom(shape: tuple[int, int, int], rng: np.random.Generator, *, kind: str,
            tumour: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An abdominal CT phantom in RAS+ ``[x, y, z]`` (x towards the patient's right): int16 HU and uint8 labels.

    Air outside an elliptic body (fat, a muscle wall), a vertebra posteriorly, the
    liver (an ellipsoid on the right, upper part of the volume, ~100 HU with noise),
    the spleen on the left; ``kind="btcv"`` labels liver 6 and spleen 1,
    ``kind="lits"`` liver 1 and 1-2 hypodense tumours (label 2, inside the liver)
    when ``tumour``. Some livers carry a small calcification (~600 HU).
    """
    nx, ny, nz = shape
    x = ((np.arange(nx) + 0.5) / nx * 2 - 1)[:, None]
    y = ((np.arange(ny) + 0.5) / ny * 2 - 1)[None, :]
    body = rng.uniform(0.72, 0.85), rng.uniform(0.52, 0.62)
    liver_c = np.array([rng.uniform(0.28, 0.4), rng.uniform(0.0, 0.15), rng.uniform(0.05, 0.3)])
    liver_r = np.array([rng.uniform(0.25, 0.32), rng.uniform(0.28, 0.36), rng.uniform(0.45, 0.6)])
    liver_hu = rng.uniform(85, 115)
    spleen_c, spleen_r = np.array([-0.45, -0.1, 0.3]), np.array([0.13, 0.15, 0.3])
    spots = []
    if kind == "lits" and tumour:
        for _ in range(int(rng.integers(1, 3))):
            d = rng.normal(size=3)
            d = d / np.linalg.norm(d) * rng.uniform(0, 0.45)
            spots.append((liver_c + d * liver_r, np.array([rng.uniform(0.08, 0.14)] * 2 + [rng.uniform(0.15, 0.3)]),
                          rng.uniform(25, 60), 2))
    if rng.random() < 0.5:
        spots.append((liver_c + np.array([0.0, -0.1, 0.1]) * liver_r, np.array([0.025, 0.025, 0.06]), 600.0, 0))
    liver_label, spleen_label = (6, 1) if kind == "btcv" else (1, 0)
    hu = np.empty(shape, np.int16)
    lab = np.zeros(shape, np.uint8)

    def ellipse(c: np.ndarray, r: np.ndarray, z: float) -> np.ndarray:
        dz = (z - c[2]) / r[2]
        if abs(dz) >= 1:
            return np.zeros((nx, ny), bool)
        s = np.sqrt(1 - dz * dz)
        return ((x - c[0]) / (r[0] * s)) ** 2 + ((y - c[1]) / (r[1] * s)) ** 2 < 1

    for k in range(nz):
        z = (k + 0.5) / nz * 2 - 1
        e = (x / body[0]) ** 2 + (y / body[1]) ** 2
        plane = np.where(e < 1, np.where(e > 0.8, 45.0, -95.0), -1000.0)
        plane[(x / 0.09) ** 2 + ((y + body[1] * 0.6) / 0.09) ** 2 < 1] = 650.0
        labels = np.zeros((nx, ny), np.uint8)
        spleen = ellipse(spleen_c, spleen_r, z)
        plane[spleen] = 95.0
        labels[spleen] = spleen_label
        liver = ellipse(liver_c, liver_r, z)
        plane[liver] = liver_hu
        labels[liver] = liver_label
        for c, r, value, label in spots:
            inside = ellipse(c, r, z) & liver
            plane[inside] = value
            if label:
                labels[inside] = label
        plane += rng.normal(0.0, 12.0, (nx, ny)) * (plane > -900)
        hu[:, :, k] = np.clip(np.rint(plane), -1024, 3071).astype(np.int16)
        lab[:, :, k] = labels
    return hu, lab
