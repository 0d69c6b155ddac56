"""VinDr-CXR (the VinBigData Kaggle training set) -> the ``VinDr`` bench, with DDAD's split as PPAD used it.

``bmad prepare vindr --raw RAW --out DATA`` reads the DICOMs of the VinBigData Chest X-ray
Abnormalities Detection training set (``RAW/train/<image_id>.dicom``) and writes ``DATA/VinDr/``
in BMAD's layout with a ``manifest.csv``. docs/datasets/vindr.md states the protocol in full;
in short:

* the split is DDAD's published repartition file (Cai et al., MICCAI 2022;
  ``datasets_prep/splits/vindr/vin_data.json``, MIT, see SOURCE.md there), read as is:
  train = its 4,000 known normal images; test = its 1,000 normal + 1,000 abnormal images;
  its labels (normal = every radiologist said "No finding") are the bench's labels;
* valid (:func:`plan_split`): a seeded draw of 100 normal + 100 abnormal images from DDAD's
  "unlabeled" pool (5,606 normal + 3,394 abnormal images that a one-class method never sees),
  so neither the training nor the test set of the protocol changes;
* a label CSV found in ``RAW`` (Kaggle's ``train.csv`` or PhysioNet's
  ``annotations/image_labels_train.csv``) is checked against DDAD's labels (warnings only);
* images: :func:`datasets_prep.dicom.read_dicom_8bit` (the DICOM display pipeline), native
  size; ``--pixels ddad --size 512 512`` gives DDAD's own preprocessing instead
  (:func:`ddad_pixels`: min-max of the stored values, MONOCHROME1 inverted, 512x512 bilinear).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bmad.errors import DataError, UsageError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import (
    Job,
    Output,
    input_fingerprint,
    parse_size,
    png_bytes,
    proportional,
    read_csv,
    write_bench,
)
from datasets_prep.dicom import decode_pixels, read_dataset, read_dicom_8bit

log = logging.getLogger(__name__)

SPLIT_FILE = Path(__file__).resolve().parent / "splits" / "vindr" / "vin_data.json"
SPLIT_SHA256 = "72d7d17cc2145d0a9adb98f1166ddc93bc1413d0b4dbd828874637df1e9afce2"
"""sha256 of the shipped copy of DDAD's ``data/vin_data.json`` (commit e286f3a of caiyu6666/DDAD)."""

GROUPS = ("train/good", "unlabeled/good", "unlabeled/Ungood", "test/good", "test/Ungood")
"""The five groups of DDAD's file: ``train.0``, ``train.unlabeled.0``, ``train.unlabeled.1``,
``test.0``, ``test.1`` (0 = normal, 1 = abnormal)."""
DDAD_COUNTS = {"train/good": 4000, "unlabeled/good": 5606, "unlabeled/Ungood": 3394,
               "test/good": 1000, "test/Ungood": 1000}
"""Images per group in DDAD's file: the 15,000 Kaggle training images (10,606 normal, 4,394 abnormal)."""
VALID_PER_LABEL = 100
"""Valid images per label drawn from DDAD's unlabeled pool (default of ``--valid``)."""
IMAGES = "train"
DICOM_SUFFIXES = (".dicom", ".dcm")
KAGGLE_LABELS = "train.csv"
PHYSIONET_LABELS = "annotations/image_labels_train.csv"
NO_FINDING = "No finding"
PIXEL_MODES = ("dicom", "ddad")
FORMAT_VERSION = 1


# -- DDAD's split file ---------------------------------------------------------------------
def read_split(path: Path, *, sha256: str | None = None) -> dict[str, list[str]]:
    """DDAD's repartition file -> group (one of :data:`GROUPS`) -> image ids, in the file's order.

    ``sha256``: when given, the file must have it (the shipped copy). DataError naming the file
    when it is not DDAD's structure: the keys above, lists of ``<image_id>.png``, no id twice.
    """
    hint = "pass DDAD's data/vin_data.json (https://github.com/caiyu6666/DDAD) as --split-file, or omit it"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the split file {path}: {exc}", hint=hint) from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"the shipped split file {path} is altered (its sha256 is not DDAD's {sha256[:12]}...)",
                        hint="reinstall bmad, or restore the file from datasets_prep/splits/vindr/ of the source")
    try:
        doc = json.loads(data)
        lists = {"train/good": doc["train"]["0"], "unlabeled/good": doc["train"]["unlabeled"]["0"],
                 "unlabeled/Ungood": doc["train"]["unlabeled"]["1"], "test/good": doc["test"]["0"],
                 "test/Ungood": doc["test"]["1"]}
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise DataError(f"{path} is not DDAD's split file: it needs train.0, train.unlabeled.{{0,1}} and "
                        f"test.{{0,1}} lists ({type(exc).__name__}: {exc})", hint=hint) from None
    groups: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for group, names in lists.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and n.endswith(".png") for n in names):
            raise DataError(f"{path}: the {group} list must hold '<image_id>.png' names", hint=hint)
        ids = [n[: -len(".png")] for n in names]
        for i in ids:
            if i in seen:
                raise DataError(f"{path}: image {i} is in both {seen[i]} and {group}", hint=hint)
            seen[i] = group
        groups[group] = ids
    return groups


@dataclass
class SplitPlan:
    """Where each available image goes, and how much of DDAD's protocol the raw set covers."""

    assign: dict[str, tuple[str, str]]
    """image id -> (split, label)."""
    missing: dict[str, int] = field(default_factory=dict)
    """group -> images DDAD lists there that the raw set lacks (train and test groups only)."""


def plan_split(groups: Mapping[str, Sequence[str]], available: Collection[str], *,
               valid_per_label: int = VALID_PER_LABEL, seed: int = 0) -> SplitPlan:
    """The bench's split of the ``available`` images under DDAD's ``groups``.

    train/good and test/{good,Ungood}: DDAD's groups as they are (the available part of each).
    valid/{good,Ungood}: ``valid_per_label`` images of each label of DDAD's unlabeled pool
    (fewer when fewer are available): with ``rng = numpy.random.default_rng(seed)``, the
    available normal pool images, sorted by id, are put in ``rng.permutation`` order and
    the first ones taken; then the abnormal ones with the next permutation. Nothing else
    of the pool is used.
    """
    if valid_per_label < 0:
        raise UsageError(f"--valid must be 0 or more, got {valid_per_label}")
    avail = set(available)
    plan = SplitPlan({})
    for group in ("train/good", "test/good", "test/Ungood"):
        split, label = group.split("/")
        have = [i for i in groups[group] if i in avail]
        plan.assign.update((i, (split, label)) for i in have)
        if len(have) < len(groups[group]):
            plan.missing[group] = len(groups[group]) - len(have)
    rng = np.random.default_rng(seed)
    for label in ("good", "Ungood"):
        pool = sorted(i for i in groups[f"unlabeled/{label}"] if i in avail)
        order = rng.permutation(len(pool))
        plan.assign.update((pool[int(k)], ("valid", label)) for k in order[:valid_per_label])
    return plan


# -- optional label CSVs ---------------------------------------------------------------------
def read_labels(raw: Path) -> tuple[Path, dict[str, str]] | None:
    """image id -> good | Ungood from the label CSV in ``raw``, or None when there is none.

    Kaggle's ``train.csv`` (``image_id,class_name,...``, one row per radiologist finding):
    good when every row of the image is "No finding". PhysioNet's
    ``annotations/image_labels_train.csv`` (``image_id,rad_id,<28 labels>``, one row per
    radiologist): good when every row has "No finding" = 1. DataError for a file at one of
    these names without the columns needed.
    """
    for rel, column in ((KAGGLE_LABELS, "class_name"), (PHYSIONET_LABELS, NO_FINDING)):
        path = raw / rel
        if not path.is_file():
            continue
        hint = "re-download it, or move it out of --raw (DDAD's labels are used then)"
        rows = iter(read_csv(path, hint, "the label CSV"))
        fields = [f.strip() for f in next(rows, [])]
        if "image_id" not in fields or column not in fields:
            raise DataError(f"{path} has columns {fields[:6]}...; expected 'image_id' and {column!r}",
                            hint="it is not VinDr-CXR's label file; move it out of --raw (DDAD's labels are "
                                 "used then)")
        normal: dict[str, bool] = {}
        for cells in rows:
            row = dict(zip(fields, (c.strip() for c in cells)))  # cells past the header's are ignored
            iid = row.get("image_id", "")
            if not iid:
                continue
            if column == "class_name":
                ok = row.get(column) == NO_FINDING
            else:
                try:
                    ok = float(row.get(column) or 0) > 0
                except ValueError:
                    raise DataError(f"{path}: {NO_FINDING!r} of image {iid} is {row[column]!r}, not a number",
                                    hint="re-download the file") from None
            normal[iid] = normal.get(iid, True) and ok
        return path, {i: "good" if ok else "Ungood" for i, ok in normal.items()}
    return None


def _some(ids: Collection[str], k: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


# -- pixels ----------------------------------------------------------------------------------
def ddad_pixels(path: Path) -> np.ndarray:
    """DDAD's preprocessing of one DICOM (its ``data/preprocess.py``) as uint8 [H, W]:
    the stored values; MONOCHROME1 flipped as ``max - v``; data that is not 8-bit mapped
    to ``floor((v - min) / (max - min) * 255)``. No rescale, window or VOI LUT."""
    ds = read_dataset(path)
    arr = decode_pixels(ds, path)
    if arr.ndim != 2:
        raise DataError(f"{path} is not a single gray image (pixel array {arr.shape})",
                        hint="move it out of the raw folder")
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        arr = arr.max() - arr
    if arr.dtype == np.uint8:
        return arr
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    return ((arr.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)


@dataclass(frozen=True)
class _Task:
    """A job's payload: one DICOM and where it goes."""

    path: Path
    source: str
    image_id: str
    split: str
    label: str


@register_reorganizer("vindr")
class VinDr(Reorganizer):
    """VinDr-CXR (Kaggle VinBigData training DICOMs) -> the VinDr bench with DDAD's split."""

    name = "vindr"
    bench = "vindr"
    folder = "VinDr"
    description = ("VinDr-CXR (VinBigData Kaggle train DICOMs) -> VinDr bench with DDAD's published split "
                   "(PPAD's protocol): train 4,000 normal, test 1,000 + 1,000, valid 100 + 100 from DDAD's "
                   "unused pool; image labels")
    raw_layout = f"""\
RAW/{IMAGES}/<image_id>.dicom   the 15,000 training DICOMs of Kaggle's
    vinbigdata-chest-xray-abnormalities-detection (PhysioNet vindr-cxr 1.0.0: train/ too)
RAW/{KAGGLE_LABELS} or RAW/{PHYSIONET_LABELS}   optional: checked against DDAD's labels
RAW/test/   not used (its labels were not public; DDAD used the training set only)"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        split_file: str | os.PathLike | None = None,
        valid: int = VALID_PER_LABEL,
        split_seed: int = 0,
        pixels: str = "dicom",
        size: Sequence[int] | None = None,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.split_file = None if split_file is None else Path(split_file)
        if int(valid) < 0:
            raise UsageError(f"--valid must be 0 or more, got {valid}")
        self.valid = int(valid)
        self.split_seed = int(split_seed)
        if pixels not in PIXEL_MODES:
            raise UsageError(f"--pixels must be one of {', '.join(PIXEL_MODES)}, got {pixels!r}")
        self.pixels = pixels
        self.size = parse_size(size, "512 512")
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw``, ``--split-file``, ``--valid``, ``--split-seed``, ``--pixels``, ``--size``."""
        parser.add_argument("--raw", type=Path, required=True,
                            help=f"the Kaggle download: the folder that holds {IMAGES}/<image_id>.dicom")
        parser.add_argument("--split-file", type=Path, default=None,
                            help="DDAD's repartition file (default: the copy shipped with bmad, "
                                 "datasets_prep/splits/vindr/vin_data.json)")
        parser.add_argument("--valid", type=int, default=VALID_PER_LABEL,
                            help=f"valid images per label drawn from DDAD's unlabeled pool (default "
                                 f"{VALID_PER_LABEL}; 0: no valid split)")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the valid draw (default 0)")
        parser.add_argument("--pixels", choices=PIXEL_MODES, default="dicom",
                            help="dicom (default): the DICOM display pipeline (rescale, window / VOI LUT, "
                                 "MONOCHROME1 inverted); ddad: DDAD's preprocessing (min-max of the stored values)")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="resize every image to H x W (bilinear; DDAD: 512 512); default: native size")

    # -- inputs ------------------------------------------------------------------------------
    def find_images(self) -> dict[str, Path]:
        """image id -> DICOM path for every ``*.dicom`` / ``*.dcm`` in ``RAW/train``."""
        expected = f"the folder that holds {IMAGES}/<image_id>.dicom (Kaggle's VinBigData download)"
        if not self.raw.is_dir():
            raise DataError(f"--raw {self.raw} is not a folder", hint=f"pass {expected}")
        folder = self.raw / IMAGES
        if not folder.is_dir():
            direct = any(p.suffix.lower() in DICOM_SUFFIXES for p in self.raw.iterdir())
            hint = (f"pass its parent, {self.raw.parent}: --raw is {expected}" if direct
                    else f"pass {expected}")
            raise DataError(f"{self.raw} has no {IMAGES}/ folder", hint=hint)
        found: dict[str, Path] = {}
        with os.scandir(folder) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() not in DICOM_SUFFIXES or entry.name.startswith(".") or not entry.is_file():
                    continue
                if stem in found:
                    raise DataError(f"image {stem} is in {folder} twice: {found[stem].name} and {entry.name}",
                                    hint="keep one of the two files")
                found[stem] = Path(entry.path)
        if not found:
            raise DataError(f"no .dicom files in {folder}",
                            hint="unzip Kaggle's vinbigdata-chest-xray-abnormalities-detection.zip into --raw "
                                 "(DDAD's split needs the DICOMs, not a PNG/JPEG conversion)")
        return found

    def plan(self) -> tuple[SplitPlan, dict[str, Path], str]:
        """(the split plan, image id -> DICOM, sha256 of the split file); warns about what is missing."""
        images = self.find_images()
        path = self.split_file or SPLIT_FILE
        groups = read_split(path, sha256=SPLIT_SHA256 if self.split_file is None else None)
        split_sha = hashlib.sha256(path.read_bytes()).hexdigest()
        listed = {i: g for g in GROUPS for i in groups[g]}
        matched = [i for i in images if i in listed]
        if not matched:
            raise DataError(f"none of the {len(images)} DICOMs in {self.raw / IMAGES} is an image of DDAD's split "
                            f"({len(listed):,} Kaggle training image ids, e.g. {next(iter(listed), '?')})",
                            hint="--raw must be the VinBigData *training* set (train/<image_id>.dicom); the test "
                                 "set's images are not in the protocol")
        if len(matched) < len(images):
            log.info("vindr: %d DICOM(s) in %s are not in DDAD's split and are not used: %s",
                     len(images) - len(matched), IMAGES, _some(set(images) - set(listed)))
        labels = read_labels(self.raw)
        if labels is None:
            log.info("vindr: no %s or %s in %s; DDAD's labels are used unchecked",
                     KAGGLE_LABELS, PHYSIONET_LABELS, self.raw)
        else:
            csv_path, by_id = labels
            differ = [i for i in matched if i in by_id and by_id[i] != listed[i].split("/")[1]]
            if differ:
                log.warning("vindr: %d image(s) are labelled differently in %s than in DDAD's split (DDAD's label "
                            "is kept): %s", len(differ), csv_path.name, _some(differ))
        plan = plan_split(groups, set(images), valid_per_label=self.valid, seed=self.split_seed)
        if plan.missing:
            log.warning("vindr: the raw set lacks %s of DDAD's images: the bench is not the full protocol",
                        ", ".join(f"{n:,} of {len(groups[g]):,} {g}" for g, n in plan.missing.items()))
        got = sum(1 for s, _ in plan.assign.values() if s == "valid")
        if got < 2 * self.valid:
            log.warning("vindr: valid has %d of %d images: DDAD's unlabeled pool in the raw set is too small",
                        got, 2 * self.valid)
        return plan, images, split_sha

    # -- work ----------------------------------------------------------------------------------
    def _job(self, task: _Task) -> list[Output]:
        pixels = ddad_pixels(task.path) if self.pixels == "ddad" else read_dicom_8bit(task.path)
        if self.size is not None and pixels.shape != self.size:
            from PIL import Image

            h, w = self.size
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))
        return [Output(task.split, task.label, f"{task.image_id}.png", png_bytes(pixels), None,
                       patient=task.image_id, source=task.source)]

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/VinDr/`` (images, manifest.csv; skipped.csv for bad inputs)."""
        plan, images, split_sha = self.plan()
        jobs = []
        for iid in sorted(plan.assign):
            split, label = plan.assign[iid]
            source = images[iid].relative_to(self.raw).as_posix()
            jobs.append(Job(iid, source, _Task(images[iid], source, iid, split, label)))
        options = {"format": FORMAT_VERSION, "split_sha256": split_sha, "valid": self.valid,
                   "split_seed": self.split_seed, "pixels": self.pixels,
                   "size": list(self.size) if self.size else None}
        fingerprint = input_fingerprint(options, [images[j.key] for j in jobs], self.raw)
        return write_bench(Path(out), self.folder, jobs, self._job, fingerprint=fingerprint, workers=self.workers,
                           on_error=self.on_error, overwrite=self.overwrite, progress=progress)

    # -- synthetic raw set -----------------------------------------------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 40, seed: int = 0, size: int = 2048, **kwargs: Any) -> Path:
        """Write ``n`` images of DDAD's split in the Kaggle layout under ``raw``; return ``raw``.

        The ids are real ones of the shipped split, spread over its groups (40 % train normal,
        20 % each test label, 10 % each unlabeled label; at least one each), chosen with
        ``numpy.random.default_rng(seed)``. Each is a ``size`` x ``size`` chest phantom
        (:func:`datasets_prep.rsna.synthetic_patient`: abnormal images get opacities) stored
        as 12-bit DICOM, alternately MONOCHROME1 without a window and MONOCHROME2 with one
        (VinDr has both); ``train.csv`` gets three radiologist rows per image as Kaggle's.
        """
        if kwargs:
            raise TypeError(f"unexpected options {sorted(kwargs)}")
        if n < len(GROUPS):
            raise ValueError(f"n={n}: the synthetic set needs at least {len(GROUPS)} images, one per group")
        from datasets_prep.dicom import write_dicom
        from datasets_prep.rsna import synthetic_patient

        groups = read_split(SPLIT_FILE, sha256=SPLIT_SHA256)
        counts = proportional([4 * n, n, n, 2 * n, 2 * n], 10 * n, n)  # 40/10/10/20/20 % of n
        rng = np.random.default_rng(seed)
        raw = Path(raw)
        (raw / IMAGES).mkdir(parents=True, exist_ok=True)
        rows = []
        k = 0
        for group, count in zip(GROUPS, counts):
            abnormal = group.endswith("Ungood")
            for idx in sorted(rng.choice(len(groups[group]), count, replace=False)):
                iid = groups[group][int(idx)]
                # rsna's phantom cycle: index 9j is Normal, 9j + 1 has lung opacities
                _, _, gray, boxes = synthetic_patient(seed, 9 * k + int(abnormal), size)
                stored = gray.astype(np.uint16) * 16 + 8
                header: dict[str, Any] = {"Modality": "DX", "PatientID": iid, "BodyPartExamined": "CHEST"}
                if k % 2:
                    stored, photometric = (4095 - stored).astype(np.uint16), "MONOCHROME1"
                else:
                    photometric = "MONOCHROME2"
                    header.update(WindowCenter=2100, WindowWidth=3600)
                write_dicom(raw / IMAGES / f"{iid}.dicom", stored, photometric=photometric, bits_stored=12,
                            uid_seed=f"{seed}/{iid}", **header)
                for r in range(3):
                    if abnormal:
                        x, y, w, h = boxes[r % len(boxes)]
                        rows.append([iid, "Lung Opacity", 7, f"R{r + 1}", x, y, x + w, y + h])
                    else:
                        rows.append([iid, NO_FINDING, 14, f"R{r + 1}", "", "", "", ""])
                k += 1
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"])
        writer.writerows(rows[i] for i in rng.permutation(len(rows)))
        (raw / KAGGLE_LABELS).write_text(buf.getvalue(), encoding="utf-8")
        return raw
