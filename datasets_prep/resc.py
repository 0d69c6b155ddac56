"""RESC (AI Challenger 2018 retinal edema OCT) -> the ``Retina_RESC`` bench.

``bmad prepare resc --raw RAW --out DATA`` reads the B-scans and lesion label
images as distributed (one folder per OCT cube, ``original_images/<case>.img/<k>.bmp``
beside ``label_images/<case>_labelMark/<k>.bmp``) and writes ``DATA/Retina_RESC/``
in BMAD's layout with a ``manifest.csv``. docs/datasets/resc.md states the
protocol in full; in short:

* a B-scan is **normal** (good) when its label image is all background (0) and
  **Ungood** when any pixel has a lesion value (255 REA, 191 SRF, 128 PED); its
  mask is every lesion pixel, whatever the class;
* train: every normal B-scan of the original training cases (4,297 with the full
  set, as in P-Net and BMAD);
* valid / test: the original validation cases, split by subject
  (:func:`plan_split`): the valid subject(s) give BMAD's 45 normal + 70 lesion
  B-scans (:func:`valid_quota`, proportional on subsets), every B-scan of every
  other subject goes to test;
* pixels: the stored image as 8-bit gray at its native size (1,024 rows x 512
  columns in RESC), copied value for value when it is 8-bit gray already.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bmad.errors import DataError, UsageError
from bmad.images import check_pixels
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import (
    Job,
    Output,
    input_fingerprint,
    mask_png,
    png_bytes,
    proportional,
    threaded_map,
    write_bench,
)

log = logging.getLogger(__name__)

# BMAD's RESC bench (thesis section 3.1.3; counts in BMAD's loaders).
BMAD_TRAIN = 4297
"""Normal B-scans of the 70 original training cases (P-Net's training set)."""
BMAD_VALID = (45, 70)
"""valid good, valid Ungood."""
BMAD_TEST = (1041, 764)
"""test good, test Ungood."""
BMAD_EVAL_SLICES = 1920
"""The 15 original validation cases x 128 B-scans, all of which BMAD used for valid + test."""
BMAD_TRAIN_CASES = 70
BMAD_EVAL_CASES = 15

REA, SRF, PED = 255, 191, 128
LESION_VALUES = (REA, SRF, PED)
IMAGE_SUFFIXES = (".bmp", ".png")

DEFAULT_TRAIN_DIR = "Edema_trainingset,*/Edema_trainingset,train"
DEFAULT_VALID_DIR = "Edema_validationset,*/Edema_validationset,valid,val,validation"
DEFAULT_IMAGES_DIR = "original_images"
DEFAULT_LABELS_DIR = "label_images"
DEFAULT_SUBJECT_PATTERN = r"^([A-Za-z]*\d+)_"
"""The subject of a case folder: ``P0067`` of ``P0067_MacularCube512x128_..._OS_..._cube_z.img``
(both eyes of a patient are one subject). A folder name it does not match is its own subject."""


# ---------------------------------------------------------------------------
# the size rule and the split (pure functions)
# ---------------------------------------------------------------------------
def valid_quota(n_eval_slices: int) -> tuple[int, int]:
    """(good, Ungood) B-scans of valid/ for ``n_eval_slices`` B-scans in the validation cases.

    BMAD's 45 / 70 out of 1,920; scaled by ``n / 1920`` for fewer (largest remainder,
    :func:`datasets_prep.common.proportional` over valid good, valid Ungood and test,
    at least one each), capped at 45 / 70 for more.
    """
    if n_eval_slices < 3:
        raise DataError(f"the validation cases hold {n_eval_slices} usable B-scan(s); valid/test need at least 3",
                        hint="give the original validation set (Edema_validationset) with its labels")
    good, ungood, _ = proportional((*BMAD_VALID, sum(BMAD_TEST)), BMAD_EVAL_SLICES, n_eval_slices)
    return good, ungood


def choose_valid_subjects(counts: Sequence[tuple[int, int]], quota: tuple[int, int], seed: int) -> list[int]:
    """The subjects (indices into ``counts``, in the order chosen) that go to valid/.

    ``counts[i]``: (normal, lesion) B-scans of subject ``i`` (subjects in sorted id
    order). Greedy: repeatedly take the subject that leaves the smallest unfilled
    quota (normal + lesion still missing), ties broken by
    ``numpy.random.default_rng(seed).permutation(n)``; stop when the quota is
    filled, when no subject adds anything, or when only one subject is left (it goes
    to test). With the full set one subject with at least 45 normal and 70 lesion
    B-scans fills valid/, and the seed picks which.
    """
    n = len(counts)
    if n < 2:
        raise DataError(f"the validation set has {n} subject(s); valid/ and test/ need at least 2",
                        hint="give the original validation set with all its cases")
    rank = np.random.default_rng(seed).permutation(n)
    need_g, need_u = quota
    chosen: list[int] = []
    while (need_g > 0 or need_u > 0) and len(chosen) < n - 1:
        free = [i for i in range(n) if i not in chosen]
        best = min(free, key=lambda i: (max(0, need_g - counts[i][0]) + max(0, need_u - counts[i][1]), rank[i]))
        gain_g, gain_u = min(need_g, counts[best][0]), min(need_u, counts[best][1])
        if gain_g + gain_u == 0:
            break
        chosen.append(best)
        need_g -= gain_g
        need_u -= gain_u
    if not chosen:  # nothing helps (e.g. quota already zero): still one subject for valid/
        chosen.append(min(range(n), key=lambda i: rank[i]))
    return chosen


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` of ``items`` evenly spaced and centred: positions ``floor((i + 0.5) * m / k)`` (all when ``k >= m``)."""
    m = len(items)
    if k >= m:
        return list(items)
    return [items[int(np.floor((i + 0.5) * m / k))] for i in range(k)]


@dataclass(frozen=True)
class Pick:
    """One B-scan of the validation set and where it goes: ``subject`` index, ``pos`` in its B-scan list."""

    subject: int
    pos: int
    split: str
    label: str


@dataclass
class SplitPlan:
    """valid/test picks of the validation set, the valid subjects, and what could not be met."""

    picks: list[Pick]
    valid_subjects: list[int]
    unused: int = 0
    """B-scans of valid subjects beyond the valid quota (in neither split: subject-level)."""
    shortfalls: list[str] = field(default_factory=list)


def plan_split(subjects: Sequence[Sequence[bool]], seed: int) -> SplitPlan:
    """Subject-level valid/test split of the validation cases.

    ``subjects[i]``: the lesion flags of subject ``i``'s B-scans (subjects in sorted
    id order, B-scans in case then slice order). The valid subjects
    (:func:`choose_valid_subjects`) give the quota of :func:`valid_quota`: each
    label's quota is filled from the valid subjects in the order chosen, and a
    subject giving ``k`` of its ``m`` B-scans of a label gives the evenly spaced ones
    (:func:`spread`). Every B-scan of every other subject goes to test/.
    """
    counts = [(sum(not f for f in flags), sum(bool(f) for f in flags)) for flags in subjects]
    quota = valid_quota(sum(len(flags) for flags in subjects))
    chosen = choose_valid_subjects(counts, quota, seed)
    plan = SplitPlan([], list(chosen))
    need = {"good": quota[0], "Ungood": quota[1]}
    for s in chosen:
        flags = subjects[s]
        taken = 0
        for label in ("good", "Ungood"):
            positions = [p for p, f in enumerate(flags) if bool(f) == (label == "Ungood")]
            k = min(need[label], len(positions))
            need[label] -= k
            taken += k
            plan.picks += [Pick(s, p, "valid", label) for p in spread(positions, k)]
        plan.unused += len(flags) - taken
    for label, missing in need.items():
        if missing:
            plan.shortfalls.append(f"valid/{label}: {quota[label == 'Ungood'] - missing} of "
                                   f"{quota[label == 'Ungood']} B-scans (the validation subjects hold too few)")
    for s, flags in enumerate(subjects):
        if s not in chosen:
            plan.picks += [Pick(s, p, "test", "Ungood" if f else "good") for p, f in enumerate(flags)]
    return plan


# ---------------------------------------------------------------------------
# reading pixels
# ---------------------------------------------------------------------------
def _read_hint(path: Path) -> str:
    return f"re-extract or re-download {path.name}, or move it out of --raw"


def read_gray(path: Path) -> np.ndarray:
    """An image file as uint8 [H, W], as stored (no resize, no flip).

    8-bit gray (``L``) is returned value for value; a palette or RGB image whose
    channels are equal gives that channel; other RGB goes through Pillow's
    ITU-R 601 luma; 16-bit gray is divided by 257 (rounded). DataError when the
    file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            check_pixels(img, path)
            img.load()
            mode = img.mode
            if mode == "L":
                return np.array(img, dtype=np.uint8)
            if mode == "1":
                return np.array(img, dtype=np.uint8) * 255
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.array(img, dtype=np.int64)
                if arr.min() < 0 or arr.max() > 65535:
                    raise DataError(f"{path} has pixel values outside 0..65535 (mode {mode})", hint=_read_hint(path))
                return arr.astype(np.uint8) if arr.max() <= 255 else np.floor(arr / 257 + 0.5).astype(np.uint8)
            if mode in ("P", "PA", "LA", "RGB", "RGBA"):
                rgb = np.array(img.convert("RGB"), dtype=np.uint8)
                if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
                    return rgb[..., 0].copy()
                return np.array(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
            raise DataError(f"{path} has unsupported image mode {mode}", hint="give 8-bit gray BMP or PNG files")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}", hint=_read_hint(path)) from exc


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header; DataError when the file is not an image."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}", hint=_read_hint(path)) from exc


# ---------------------------------------------------------------------------
# the raw layout
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BScan:
    """One B-scan of a case: image + label files (paths absolute)."""

    origin: str  # "train" | "valid": the original set
    case: str  # case id: the case folder name without ".img"
    subject: str
    slice: str  # the file stem, e.g. "1"
    image: Path
    label: Path


@dataclass(frozen=True)
class Problem:
    """A bad input found before writing: reported per file by the job that carries it."""

    source: str  # relative to --raw
    message: str
    hint: str

    def error(self) -> DataError:
        return DataError(self.message, hint=self.hint)


def _patterns(spec: str) -> list[str]:
    return [p.strip() for p in str(spec).split(",") if p.strip()]


def _slice_key(stem: str) -> tuple[int, int, str]:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _case_id(folder: str) -> str:
    return folder.removesuffix(".img")


def _label_candidates(folder: str) -> list[str]:
    """Label folder names for an image case folder: ``X.img`` -> ``X_labelMark`` (AI Challenger), ``X``."""
    case = _case_id(folder)
    return list(dict.fromkeys([f"{case}_labelMark", folder, case, f"{folder}_labelMark"]))


@register_reorganizer("resc")
class RESC(Reorganizer):
    """RESC retinal OCT B-scans + lesion labels -> BMAD's Retina_RESC bench."""

    name = "resc"
    bench = "resc"
    folder = "Retina_RESC"
    description = ("RESC (AI Challenger 2018 retinal edema) OCT B-scans -> Retina_RESC bench "
                   "(normal train B-scans, subject-level valid/test from the original validation set, lesion masks)")
    raw_layout = """\
RAW/ai_challenger_fl2018_trainingset/Edema_trainingset/      (or RAW/Edema_trainingset/, RAW/train/)
    original_images/<case>.img/1.bmp .. 128.bmp           B-scans, 8-bit gray, 1024 rows x 512 columns
    label_images/<case>_labelMark/1.bmp .. 128.bmp        0 background, 255 REA, 191 SRF, 128 PED
RAW/ai_challenger_fl2018_validationset/Edema_validationset/  (or RAW/Edema_validationset/, RAW/valid/)
    original_images/..., label_images/...                 as above (groundtruth/ is not used)
<case> e.g. P0067_MacularCube512x128_4-28-2014_17-15-21_OS_sn21294_cube_z; .png files are read like .bmp;
the label folder may also carry the image folder's own name. The test set (no labels) is not used."""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        train_dir: str = DEFAULT_TRAIN_DIR,
        valid_dir: str = DEFAULT_VALID_DIR,
        images_dir: str = DEFAULT_IMAGES_DIR,
        labels_dir: str = DEFAULT_LABELS_DIR,
        lesion_values: str | Sequence[int] = "255,191,128",
        subject_pattern: str = DEFAULT_SUBJECT_PATTERN,
        split_seed: int = 0,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.train_dir = train_dir
        self.valid_dir = valid_dir
        self.images_dir = images_dir
        self.labels_dir = labels_dir
        self.lesion_values = self._parse_values(lesion_values)
        try:
            self.subject_re = re.compile(subject_pattern)
        except re.error as exc:
            raise UsageError(f"--subject-pattern {subject_pattern!r} is not a regular expression: {exc}") from None
        self.subject_pattern = subject_pattern
        self.split_seed = int(split_seed)
        self.set_run_options(workers, on_error, overwrite)
        self._lut = np.zeros(256, bool)
        self._lut[list(self.lesion_values)] = True
        self._allowed = self._lut.copy()
        self._allowed[0] = True

    @staticmethod
    def _parse_values(spec: str | Sequence[int]) -> tuple[int, ...]:
        try:
            values = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        except (TypeError, ValueError):
            raise UsageError(f"--lesion-values {spec!r} is not a comma-separated list of integers",
                             hint="e.g. --lesion-values 255,191,128") from None
        if not values or any(not 1 <= v <= 255 for v in values):
            raise UsageError(f"--lesion-values {spec!r}: give label values in 1..255 (0 is background)")
        return tuple(sorted(set(values), reverse=True))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw`` plus the RESC options (``--out`` and the common options come from the CLI)."""
        parser.add_argument("--raw", type=Path, required=True,
                            help="folder holding the training and validation sets (see the raw layout)")
        parser.add_argument("--train-dir", default=DEFAULT_TRAIN_DIR,
                            help=f"comma-separated globs under --raw for the original training set, first match "
                                 f"wins (default {DEFAULT_TRAIN_DIR})")
        parser.add_argument("--valid-dir", default=DEFAULT_VALID_DIR,
                            help=f"same for the original validation set (default {DEFAULT_VALID_DIR})")
        parser.add_argument("--images-dir", default=DEFAULT_IMAGES_DIR,
                            help=f"globs of the B-scan folder inside a set (default {DEFAULT_IMAGES_DIR})")
        parser.add_argument("--labels-dir", default=DEFAULT_LABELS_DIR,
                            help=f"globs of the label folder inside a set (default {DEFAULT_LABELS_DIR})")
        parser.add_argument("--lesion-values", default="255,191,128",
                            help="label values that are lesion (default 255,191,128: REA, SRF, PED); "
                                 "0 is background, any other value is an error")
        parser.add_argument("--subject-pattern", default=DEFAULT_SUBJECT_PATTERN,
                            help="regex whose group 1, matched on a case folder name, is the subject "
                                 f"(default {DEFAULT_SUBJECT_PATTERN!r}: the patient id before the first '_')")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the valid/test subject split (default 0)")

    # -- synthetic raw data ------------------------------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 6, seed: int = 0, n_valid: int | None = None, slices: int = 128, shape: tuple[int, int] = (1024, 512),
                   ext: str = "bmp") -> Path:
        """Write a synthetic RESC raw set in the AI Challenger layout and return ``raw``.

        ``n`` OCT cubes of ``slices`` B-scans of ``shape``
        (rows, columns; RESC's is 1024 x 512), 8-bit gray ``.bmp`` (or ``ext="png"``);
        ``n_valid`` of them (default ``max(2, round(n * 15 / 85))``) in the validation
        set, the rest in the training set. Each cube has a run of lesion B-scans around
        its middle (REA 255 with SRF 191 and PED 128 inside; dark fluid in the image)
        between normal B-scans; every third training cube has no lesion at all.
        """
        return write_synthetic_raw(Path(raw), n_cases=int(n), n_valid=n_valid,
                                   seed=seed, slices=slices, shape=(int(shape[0]), int(shape[1])), ext=ext)

    # -- finding the inputs ------------------------------------------------------
    def _one_dir(self, base: Path, spec: str, option: str, what: str) -> Path:
        for pattern in _patterns(spec):
            found = sorted(p for p in base.glob(pattern) if p.is_dir())
            if len(found) > 1:
                names = ", ".join(p.relative_to(self.raw).as_posix() for p in found)
                raise DataError(f"{option} pattern {pattern!r} matches {len(found)} folders under {base}: {names}",
                                hint=f"set {option} to match exactly one")
            if found:
                return found[0]
        raise DataError(f"no {what} folder under {base} (looked for {spec})",
                        hint=f"unpack RESC there (see `bmad prepare --list`), or set {option}")

    def _subject(self, case: str) -> str:
        m = self.subject_re.search(case)
        return (m.group(1) if m and m.groups() else m.group(0) if m else "") or case

    def find(self) -> tuple[list[BScan], list[Problem], list[Path]]:
        """All B-scans of both sets (sorted), the inputs that cannot be used, and every input file."""
        if not self.raw.is_dir():
            raise DataError(f"raw folder {self.raw} does not exist",
                            hint="pass --raw pointing at the folder that holds Edema_trainingset and "
                                 "Edema_validationset")
        scans: list[BScan] = []
        problems: list[Problem] = []
        files: list[Path] = []
        for origin, spec, option, what in (("train", self.train_dir, "--train-dir", "training-set"),
                                           ("valid", self.valid_dir, "--valid-dir", "validation-set")):
            root = self._one_dir(self.raw, spec, option, what)
            images = self._one_dir(root, self.images_dir, "--images-dir", f"B-scan ({what})")
            labels = self._one_dir(root, self.labels_dir, "--labels-dir", f"label ({what})")
            s, p, f = self._find_set(origin, images, labels)
            if not s and not p:
                raise DataError(f"no B-scans (.bmp/.png in one folder per case) under {images}",
                                hint="point --raw at the unpacked RESC set")
            scans += s
            problems += p
            files += f
        return scans, problems, files

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.raw).as_posix()

    def _find_set(self, origin: str, images: Path, labels: Path) -> tuple[list[BScan], list[Problem], list[Path]]:
        scans: list[BScan] = []
        problems: list[Problem] = []
        files: list[Path] = []
        loose = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if loose:
            raise DataError(f"{images} holds image files directly ({loose[0].name}, ...): RESC has one folder "
                            "per OCT cube, which is what the subject-level split needs",
                            hint="unpack the set as distributed (original_images/<case>.img/<k>.bmp)")
        case_dirs = sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
        label_dirs = {p.name: p for p in labels.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
        used_labels: set[str] = set()
        seen: dict[str, Path] = {}
        for case_dir in case_dirs:
            case = _case_id(case_dir.name)
            if case in seen:  # "X.img" and "X": their B-scans would get the same output names
                problems.append(Problem(self._rel(case_dir), f"case folders {seen[case].name} and {case_dir.name} "
                                        f"in {images} are the same case", "keep one of them"))
                continue
            seen[case] = case_dir
            subject = self._subject(case)
            imgs = self._slices(case_dir, problems)
            files += [f for f in imgs.values() if f is not None]
            match = next((label_dirs[c] for c in _label_candidates(case_dir.name) if c in label_dirs), None)
            if match is None:
                problems.append(Problem(
                    self._rel(case_dir),
                    f"case folder {case_dir} has no label folder in {labels} "
                    f"(looked for {', '.join(_label_candidates(case_dir.name))})",
                    "add the case's label images, or move the case folder out of --raw"))
                continue
            used_labels.add(match.name)
            labs = self._slices(match, problems)
            files += [f for f in labs.values() if f is not None]
            for stem in sorted(set(imgs) | set(labs), key=_slice_key):
                if imgs.get(stem, 0) is None or labs.get(stem, 0) is None:
                    continue  # two files for the slice: reported by _slices
                if stem not in labs:
                    problems.append(Problem(self._rel(imgs[stem]), f"B-scan {imgs[stem]} has no label image "
                                            f"{stem}.bmp/.png in {match}", "add the label or remove the B-scan"))
                elif stem not in imgs:
                    problems.append(Problem(self._rel(labs[stem]), f"label {labs[stem]} has no B-scan "
                                            f"{stem}.bmp/.png in {case_dir}", "add the B-scan or remove the label"))
                else:
                    scans.append(BScan(origin, case, subject, stem, imgs[stem], labs[stem]))
        for name in sorted(set(label_dirs) - used_labels):
            if any(f.suffix.lower() in IMAGE_SUFFIXES for f in label_dirs[name].iterdir()):
                problems.append(Problem(self._rel(label_dirs[name]),
                                        f"label folder {label_dirs[name]} has no case folder in {images}",
                                        "add the case's B-scans, or move the label folder out of --raw"))
        return scans, problems, files

    def _slices(self, folder: Path, problems: list[Problem]) -> dict[str, Path | None]:
        """stem -> file of the .bmp/.png files in ``folder``; two files with one stem are a problem (-> None)."""
        found: dict[str, list[Path]] = {}
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                found.setdefault(f.stem, []).append(f)
        out: dict[str, Path | None] = {}
        for stem, paths in found.items():
            out[stem] = paths[0] if len(paths) == 1 else None
            if len(paths) > 1:
                problems.append(Problem(self._rel(paths[0]), f"{len(paths)} files for slice {stem} in {folder}: "
                                        + ", ".join(p.name for p in paths), "keep one of them"))
        return out

    # -- scanning the labels -----------------------------------------------------
    def read_label(self, scan: BScan) -> np.ndarray:
        """The label image as uint8; DataError when it holds a value other than 0 and the lesion values."""
        label = read_gray(scan.label)
        counts = np.bincount(label.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & ~self._allowed)
        if bad.size:
            raise DataError(f"label {scan.label} has value(s) {', '.join(map(str, bad[:8]))} besides background 0 "
                            f"and the lesion values {','.join(map(str, self.lesion_values))}",
                            hint="check it is a RESC label image, or set --lesion-values")
        return label

    def _check_size(self, scan: BScan, label_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> None:
        if tuple(label_shape) != tuple(image_shape):
            raise DataError(f"label {scan.label} is {label_shape[1]}x{label_shape[0]} (WxH) but its B-scan "
                            f"{scan.image.name} is {image_shape[1]}x{image_shape[0]}",
                            hint="give the label the B-scan's size, or move the pair out of --raw")

    def _scan(self, scan: BScan) -> bool | Problem:
        """Whether the B-scan has a lesion, or the Problem (on the file at fault) that makes it unusable."""
        at_fault = scan.label
        try:
            label = self.read_label(scan)
            at_fault = scan.image
            size = image_size(scan.image)
            at_fault = scan.label
            self._check_size(scan, label.shape, size)
            return bool(self._lut[label].any())
        except DataError as exc:
            if self.on_error == "fail":
                raise
            msg, _, hint = str(exc).partition("\n  fix: ")
            return Problem(self._rel(at_fault), msg, hint)

    # -- preparing ---------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {"reorganizer": "resc", "version": 1, "train_dir": self.train_dir, "valid_dir": self.valid_dir,
                "images_dir": self.images_dir, "labels_dir": self.labels_dir,
                "lesion_values": list(self.lesion_values), "subject_pattern": self.subject_pattern,
                "split_seed": self.split_seed}

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/Retina_RESC/`` (images, masks, manifest.csv) and return the summary."""
        scans, problems, files = self.find()
        problems = sorted(problems, key=lambda pr: pr.source)
        if problems and self.on_error == "fail":
            raise problems[0].error()
        flags = list(threaded_map(self._scan, scans, self.workers, "scan labels", progress, unit="B-scan"))
        usable: list[tuple[BScan, bool]] = []
        for scan, flag in zip(scans, flags, strict=True):
            if isinstance(flag, Problem):
                problems.append(flag)
            else:
                usable.append((scan, flag))

        jobs = [Job(f"train/{self._rel(s.image)}", self._rel(s.image), (s, "train", "good"))
                for s, lesion in usable if s.origin == "train" and not lesion]
        if not jobs:
            raise DataError(f"no normal (all-background) B-scan in the training set under {self.raw}",
                            hint="give the original training set with its label images")
        evaluation = [(s, f) for s, f in usable if s.origin == "valid"]
        subjects = sorted({s.subject for s, _ in evaluation})
        by_subject: dict[str, list[tuple[BScan, bool]]] = {sub: [] for sub in subjects}
        for s, f in evaluation:
            by_subject[s.subject].append((s, f))
        if not any(f for _, f in evaluation) or all(f for _, f in evaluation):
            kind = "lesion" if not any(f for _, f in evaluation) else "normal"
            raise DataError(f"the validation set under {self.raw} has no {kind} B-scan, so valid/test cannot "
                            "hold both labels", hint="give the original validation set with its label images")
        plan = plan_split([[f for _, f in by_subject[sub]] for sub in subjects], self.split_seed)
        for p in plan.picks:
            s, _ = by_subject[subjects[p.subject]][p.pos]
            jobs.append(Job(f"{p.split}/{self._rel(s.image)}", self._rel(s.image), (s, p.split, p.label)))
        unique = {pr.source: pr for pr in reversed(problems)}  # one report per file, the first found
        jobs += [Job(f"error/{src}", src, unique[src]) for src in sorted(unique)]
        self._report(usable, subjects, plan)
        return write_bench(out, self.folder, jobs, self._job, fingerprint=input_fingerprint(
            self._options(), files, self.raw), workers=self.workers, on_error=self.on_error,
            overwrite=self.overwrite, progress=progress)

    def _report(self, usable: list[tuple[BScan, bool]], subjects: list[str], plan: SplitPlan) -> None:
        train_cases = {s.case for s, _ in usable if s.origin == "train"}
        n_train = sum(1 for s, f in usable if s.origin == "train" and not f)
        if len(train_cases) == BMAD_TRAIN_CASES and n_train != BMAD_TRAIN:
            log.warning("resc: %d normal training B-scans; BMAD's (P-Net's) train has %d", n_train, BMAD_TRAIN)
        overlap = sorted({s.subject for s, _ in usable if s.origin == "train"} & set(subjects))
        if overlap:
            log.warning("resc: subject(s) %s are in both original sets (kept: the original split decides)",
                        ", ".join(overlap[:10]))
        log.info("resc: valid subject(s) %s; %d of their B-scans are beyond the valid quota and unused",
                 ", ".join(subjects[i] for i in plan.valid_subjects), plan.unused)
        for msg in plan.shortfalls:
            log.warning("resc: %s", msg)

    def _job(self, payload: tuple[BScan, str, str] | Problem) -> list[Output]:
        """Read one B-scan and its label; return the image (and mask for Ungood)."""
        if isinstance(payload, Problem):
            raise payload.error()
        scan, split, label = payload
        lab = self.read_label(scan)
        pixels = read_gray(scan.image)
        self._check_size(scan, lab.shape, pixels.shape)
        lesion = self._lut[lab]
        if bool(lesion.any()) != (label == "Ungood"):
            raise DataError(f"{scan.label} changed while it was being prepared", hint="run the command again")
        name = f"{scan.case}_{int(scan.slice):03d}.png" if scan.slice.isdigit() else f"{scan.case}_{scan.slice}.png"
        return [Output(split, label, name, png_bytes(pixels), mask_png(lesion) if label == "Ungood" else None,
                       patient=scan.subject, source=self._rel(scan.image), slice=scan.slice)]


# ---------------------------------------------------------------------------
# synthetic raw data (tests, benchmarks)
# ---------------------------------------------------------------------------
def _ellipse(rows: np.ndarray, cols: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((rows - cy) / max(ry, 1.5)) ** 2 + ((cols - cx) / max(rx, 1.5)) ** 2 <= 1.0


def synthetic_bscan(rng: np.random.Generator, shape: tuple[int, int], lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """An OCT-like B-scan (uint8, ``shape`` = rows x columns) and its RESC label image.

    A bright layered retina band over a dark background with speckle noise; with
    ``lesion`` a dark fluid region inside the retina labelled REA (255), with SRF
    (191) at its bottom and a small PED (128) under the RPE.
    """
    h, w = shape
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 2 * np.pi)
    top = (h * (0.33 + rng.uniform(-0.03, 0.03)) + h * 0.03 * np.sin(2 * np.pi * cols / w + phase)
           + h * 0.04 * np.exp(-(((cols - w / 2) / (w * 0.08)) ** 2)))
    thick = h * 0.16
    depth = (rows - top) / thick
    img = np.full((h, w), 14.0, np.float32)
    retina = (depth >= 0) & (depth < 0.9)
    img = np.where(retina, 70 + 60 * np.cos(depth * 3 * np.pi) ** 2, img)
    img = np.where((depth >= 0.9) & (depth < 1.0), 215.0, img)  # RPE
    img = np.where((depth >= 1.0) & (depth < 1.6), 110 - 80 * (depth - 1.0), img)  # choroid
    label = np.zeros((h, w), np.uint8)
    if lesion:
        cx = w * rng.uniform(0.35, 0.65)
        t = float(h * 0.33 + h * 0.03 * np.sin(2 * np.pi * cx / w + phase))
        rea = _ellipse(rows, cols, t + thick * 0.45, cx, thick * 0.3, w * rng.uniform(0.06, 0.14))
        srf = rea & _ellipse(rows, cols, t + thick * 0.7, cx, thick * 0.12, w * 0.05)
        ped = _ellipse(rows, cols, t + thick * 1.05, cx + w * 0.08, thick * 0.08, w * 0.03)
        label[rea] = REA
        label[srf] = SRF
        label[ped] = PED
        if not label.any():
            label[min(h - 1, int(t + thick * 0.45)), int(cx)] = REA
        img = np.where(label == REA, 30.0, img)
        img = np.where(label == SRF, 18.0, img)
        img = np.where(label == PED, 45.0, img)
    img = img * rng.gamma(6.0, 1 / 6.0, (h, w)).astype(np.float32) + rng.normal(0, 4, (h, w)).astype(np.float32)
    return np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8), label


def synthetic_case_name(i: int) -> str:
    """An AI Challenger-style cube name (without ``.img``), e.g. ``P1000_MacularCube512x128_..._OD_sn20000_cube_z``."""
    return (f"P{1000 + i:04d}_MacularCube512x128_{1 + i % 12}-{1 + i % 28}-2014_10-{i % 60}-{(7 * i) % 60}"
            f"_{'OD' if i % 2 == 0 else 'OS'}_sn{20000 + 37 * i}_cube_z")


def write_synthetic_raw(raw: Path, *, n_cases: int = 6, n_valid: int | None = None, seed: int = 0,
                        slices: int = 128, shape: tuple[int, int] = (1024, 512), ext: str = "bmp") -> Path:
    """The writer behind :meth:`RESC.synthesize` (see there)."""
    if ext not in ("bmp", "png"):
        raise ValueError(f"ext must be bmp or png, got {ext!r}")
    n_valid = max(2, round(n_cases * BMAD_EVAL_CASES / (BMAD_EVAL_CASES + BMAD_TRAIN_CASES))) \
        if n_valid is None else int(n_valid)
    if n_valid < 2 or n_cases - n_valid < 1 or slices < 2:
        raise ValueError(f"need at least 1 training and 2 validation cubes of 2+ B-scans "
                         f"(got {n_cases} cubes, {n_valid} for validation, {slices} B-scans)")
    sets = {"train": raw / "ai_challenger_fl2018_trainingset" / "Edema_trainingset",
            "valid": raw / "ai_challenger_fl2018_validationset" / "Edema_validationset"}
    for i in range(n_cases):
        origin = "train" if i < n_cases - n_valid else "valid"
        rng = np.random.default_rng([seed, i])
        name = synthetic_case_name(i)
        img_dir = sets[origin] / DEFAULT_IMAGES_DIR / f"{name}.img"
        lab_dir = sets[origin] / DEFAULT_LABELS_DIR / f"{name}_labelMark"
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        healthy = origin == "train" and i % 3 == 0
        length = min(slices - 1, max(1, round(slices * rng.uniform(0.25, 0.6))))
        start = int(np.clip((slices - length) // 2 + rng.integers(-(slices // 8), slices // 8 + 1), 0, slices - length))
        for k in range(slices):
            image, label = synthetic_bscan(rng, shape, not healthy and start <= k < start + length)
            Image.fromarray(image).save(img_dir / f"{k + 1}.{ext}")
            Image.fromarray(label).save(lab_dir / f"{k + 1}.{ext}")
    return raw
