"""RSNA Pneumonia Detection Challenge -> the ``Chest`` bench: 8-bit PNG chest X-rays, image labels.

``bmad prepare rsna --raw RAW --out DATA`` reads the Kaggle download
(``stage_2_train_images/<patientId>.dcm`` + ``stage_2_detailed_class_info.csv``) and
writes ``DATA/Chest/`` in BMAD's layout with a ``manifest.csv``. docs/datasets/rsna.md
states the protocol in full; in short:

* labels: ``stage_2_detailed_class_info.csv`` (``patientId,class``, one row per
  box) de-duplicated by patientId; ``Normal`` -> good, ``Lung Opacity`` and
  ``No Lung Opacity / Not Normal`` -> Ungood. A patient whose rows disagree is
  an input error (skipped and listed in skipped.csv, or fatal with --on-error fail);
* split (:func:`split_sizes`, :func:`plan_split`): one image per patient; train
  8,000 normal, valid 745 normal + 745 abnormal, test the rest (106 + 17,088) for the
  26,684 stage-2 patients (8,851 normal, 17,833 abnormal), proportional for a
  subset; seeded by ``--split-seed``;
* images: :func:`datasets_prep.dicom.read_dicom_8bit` (Modality LUT, VOI LUT or
  window, MONOCHROME1 inverted, 8-bit), native size (1024x1024) unless ``--size``.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bmad.errors import DataError, UsageError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import Job, Output, input_fingerprint, png_bytes, proportional, read_csv, write_bench
from datasets_prep.dicom import read_dicom_8bit

log = logging.getLogger(__name__)

IMAGES = "stage_2_train_images"
LABELS = "stage_2_detailed_class_info.csv"
BOXES = "stage_2_train_labels.csv"
COLUMNS = ("patientId", "class")
CLASSES = {"Normal": "good", "Lung Opacity": "Ungood", "No Lung Opacity / Not Normal": "Ungood"}

BMAD_NORMAL = 8851
"""Normal patients in stage 2 train (the 26,684 patients: 8,851 Normal, 17,833 abnormal)."""
BMAD_ABNORMAL = 17833
BMAD_GOOD = (8000, 745, 106)
"""BMAD's normal images in train, valid and test (8,000 / 1,490 (1:1) / 17,194 in all)."""


@dataclass(frozen=True)
class SplitSizes:
    """Images (= patients) per split and label."""

    train_good: int
    valid_good: int
    valid_ungood: int
    test_good: int
    test_ungood: int

    def counts(self) -> dict[tuple[str, str], int]:
        return {("train", "good"): self.train_good, ("valid", "good"): self.valid_good,
                ("valid", "Ungood"): self.valid_ungood, ("test", "good"): self.test_good,
                ("test", "Ungood"): self.test_ungood}

    def totals(self) -> dict[str, int]:
        return {"train": self.train_good, "valid": self.valid_good + self.valid_ungood,
                "test": self.test_good + self.test_ungood}


def split_sizes(n_good: int, n_ungood: int) -> SplitSizes:
    """The group sizes for ``n_good`` normal and ``n_ungood`` abnormal patients.

    Normal patients: BMAD's 8,000 / 745 / 106 (train / valid / test) scaled by
    ``n_good / 8851`` with :func:`datasets_prep.common.proportional` (largest remainder,
    each group at least 1; BMAD's numbers unchanged from 8,851 normal patients up,
    the test group taking any extra). Abnormal patients: as many in valid as normal
    ones there (1:1), at most ``n_ungood - 1``, the rest in test. For 8,851 + 17,833
    patients: 8,000 / 745 + 745 / 106 + 17,088, i.e. 8,000 / 1,490 / 17,194.
    """
    if n_good < 3 or n_ungood < 2:
        raise DataError(f"{n_good} normal and {n_ungood} abnormal patients are too few for BMAD's split "
                        "(it needs at least 3 normal: train, valid, test; and 2 abnormal: valid, test)",
                        hint="give more of the raw images")
    train, valid, _ = proportional(BMAD_GOOD, BMAD_NORMAL, n_good, minimum=1)
    valid = min(valid, n_ungood - 1)
    return SplitSizes(train, valid, valid, n_good - train - valid, n_ungood - valid)


def plan_split(labels: dict[str, str], seed: int) -> dict[str, tuple[str, str]]:
    """patientId -> (split, label) for patients labelled good/Ungood in ``labels``.

    With ``rng = numpy.random.default_rng(seed)``: the normal patients, sorted by id,
    are shuffled with ``rng.permutation``; the first ``train_good`` go to train, the
    next ``valid_good`` to valid, the rest to test. Then the abnormal patients, sorted,
    are shuffled with the next ``rng.permutation``: the first ``valid_ungood`` go to
    valid, the rest to test.
    """
    good = sorted(p for p, lab in labels.items() if lab == "good")
    bad = sorted(p for p, lab in labels.items() if lab == "Ungood")
    sizes = split_sizes(len(good), len(bad))
    rng = np.random.default_rng(seed)
    plan: dict[str, tuple[str, str]] = {}
    good = [good[i] for i in rng.permutation(len(good))]
    for i, pid in enumerate(good):
        split = "train" if i < sizes.train_good else "valid" if i < sizes.train_good + sizes.valid_good else "test"
        plan[pid] = (split, "good")
    bad = [bad[i] for i in rng.permutation(len(bad))]
    for i, pid in enumerate(bad):
        plan[pid] = ("valid" if i < sizes.valid_ungood else "test", "Ungood")
    return plan


@dataclass(frozen=True)
class ClassTable:
    """What the class CSV says: one label per patient, and the patients whose rows disagree."""

    labels: dict[str, str]
    """patientId -> good | Ungood, for patients with one class."""
    conflicts: dict[str, str]
    """patientId -> "'Normal' (line 3), 'Lung Opacity' (line 9)" for patients with several classes."""
    rows: int


def read_classes(path: Path) -> ClassTable:
    """Read ``stage_2_detailed_class_info.csv``; DataError naming the file for a bad header or row."""
    hint = (f"pass the Kaggle file {LABELS} (columns {','.join(COLUMNS)}) with --labels; "
            f"{BOXES} holds boxes, not the three classes")
    if not path.is_file():
        raise DataError(f"the class CSV {path} does not exist", hint=f"download {LABELS} into --raw, or set --labels")
    reader = iter(read_csv(path, hint, "the class CSV"))
    header = [h.strip() for h in next(reader, [])]
    if tuple(header) != COLUMNS:
        raise DataError(f"{path} has columns {header or '(none: empty file)'}; expected exactly {list(COLUMNS)}",
                        hint=hint)
    classes: dict[str, dict[str, int]] = {}
    n = 0
    for line, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(COLUMNS):
            raise DataError(f"{path} line {line} has {len(row)} fields, expected {len(COLUMNS)}: {row}", hint=hint)
        pid, cls = row[0].strip(), row[1].strip()
        if not pid:
            raise DataError(f"{path} line {line} has an empty patientId", hint=hint)
        if cls not in CLASSES:
            raise DataError(f"{path} line {line}: unknown class {cls!r} for patient {pid} "
                            f"(expected one of {', '.join(repr(c) for c in CLASSES)})", hint=hint)
        classes.setdefault(pid, {}).setdefault(cls, line)
        n += 1
    if not classes:
        raise DataError(f"{path} lists no patients", hint=hint)
    labels, conflicts = {}, {}
    for pid, seen in classes.items():
        if len(seen) == 1:
            labels[pid] = CLASSES[next(iter(seen))]
        else:
            conflicts[pid] = ", ".join(f"{c!r} (line {ln})" for c, ln in sorted(seen.items(), key=lambda kv: kv[1]))
    return ClassTable(labels, conflicts, n)


@dataclass(frozen=True)
class _Task:
    """A job's payload: write one patient's image (or report its label conflict)."""

    path: Path
    source: str
    patient: str
    split: str = ""
    label: str = ""
    conflict: str = ""


@register_reorganizer("rsna")
class RSNA(Reorganizer):
    """RSNA Pneumonia Detection Challenge (stage 2 train) -> BMAD's Chest bench."""

    name = "rsna"
    bench = "rsna"
    folder = "Chest"
    description = ("RSNA Pneumonia DICOMs -> Chest bench (8-bit PNG; Normal = good, the two other classes = "
                   "Ungood; patient-level BMAD split 8,000 / 1,490 / 17,194)")
    raw_layout = f"""\
RAW/{LABELS}   patientId,class: one row per box; classes Normal,
    Lung Opacity, No Lung Opacity / Not Normal
RAW/{IMAGES}/<patientId>.dcm   26,684 DICOMs, 1024x1024 8-bit MONOCHROME2 (JPEG)
RAW/{BOXES}, RAW/stage_2_test_images/   not used"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        images: str = IMAGES,
        labels: str = LABELS,
        size: int | None = None,
        split_seed: int = 0,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.images = str(images)
        self.labels = str(labels)
        if size is not None and int(size) < 1:
            raise UsageError(f"--size must be a positive number of pixels, got {size}")
        self.size = None if size is None else int(size)
        self.split_seed = int(split_seed)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--raw", type=Path, required=True,
                            help=f"the Kaggle download: holds {IMAGES}/ and {LABELS}")
        parser.add_argument("--images", default=IMAGES,
                            help=f"the DICOM folder, relative to --raw (default {IMAGES}; "
                                 "stage 1: stage_1_train_images)")
        parser.add_argument("--labels", default=LABELS,
                            help=f"the class CSV, relative to --raw (default {LABELS})")
        parser.add_argument("--size", type=int, default=None,
                            help="resize every image to SIZE x SIZE pixels (default: native, 1024x1024 for RSNA)")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (default 0)")

    # -- inputs ------------------------------------------------------------------------
    def _inside(self, rel: str, option: str) -> Path:
        path = self.raw / rel
        try:
            path.resolve().relative_to(self.raw.resolve())
        except ValueError:
            raise UsageError(f"{option} {rel} is outside --raw {self.raw}",
                             hint=f"give {option} relative to --raw") from None
        return path

    def find_images(self) -> dict[str, Path]:
        """patientId -> DICOM path, for every ``*.dcm`` in the image folder."""
        if not self.raw.is_dir():
            raise DataError(f"--raw {self.raw} is not a folder",
                            hint=f"pass the folder holding {IMAGES}/ and {LABELS}")
        folder = self._inside(self.images, "--images")
        if not folder.is_dir():
            raise DataError(f"the image folder {folder} does not exist",
                            hint=f"unzip the Kaggle download so that {IMAGES}/ is inside --raw, or set --images")
        found = {}
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.lower().endswith(".dcm") and not entry.name.startswith(".") and entry.is_file():
                    found[entry.name[:-4]] = Path(entry.path)
        if not found:
            raise DataError(f"no .dcm files in {folder}", hint="unzip the Kaggle image archive into it")
        return found

    @staticmethod
    def _some(ids: Sequence[str], k: int = 5) -> str:
        ids = sorted(ids)
        return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")

    # -- work --------------------------------------------------------------------------
    def _job(self, task: _Task) -> list[Output]:
        if task.conflict:
            raise DataError(f"patient {task.patient} has conflicting classes in {self.labels}: {task.conflict}",
                            hint=f"fix the rows of {task.patient} in {self.labels}")
        pixels = read_dicom_8bit(task.path)
        if self.size is not None and pixels.shape != (self.size, self.size):
            from PIL import Image

            pixels = np.asarray(Image.fromarray(pixels).resize((self.size, self.size), Image.Resampling.BILINEAR))
        return [Output(task.split, task.label, f"{task.patient}.png", png_bytes(pixels), None,
                       patient=task.patient, source=task.source)]

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/Chest/`` (images + manifest.csv) and say what was written."""
        images = self.find_images()
        labels_path = self._inside(self.labels, "--labels")
        table = read_classes(labels_path)
        conflicts = {p: why for p, why in table.conflicts.items() if p in images}
        if conflicts and self.on_error == "fail":
            pid = min(conflicts)
            raise DataError(f"{labels_path}: {len(conflicts)} patient(s) have conflicting classes, "
                            f"e.g. {pid}: {conflicts[pid]}",
                            hint="fix the CSV, or use --on-error skip to leave these patients out")
        no_image = [p for p in (*table.labels, *table.conflicts) if p not in images]
        unlabelled = [p for p in images if p not in table.labels and p not in table.conflicts]
        if no_image:
            log.warning("rsna: %d patient(s) of %s have no DICOM in %s and are left out: %s",
                        len(no_image), labels_path.name, self.images, self._some(no_image))
        if unlabelled:
            log.warning("rsna: %d DICOM(s) in %s have no row in %s and are left out: %s",
                        len(unlabelled), self.images, labels_path.name, self._some(unlabelled))
        labelled = {p: lab for p, lab in table.labels.items() if p in images}
        if not labelled:
            raise DataError(f"no DICOM in {self.raw / self.images} has a patientId listed in {labels_path}",
                            hint="check that --images and --labels belong to the same stage of the challenge")
        plan = plan_split(labelled, self.split_seed)
        counts = {"good": sum(v == "good" for v in labelled.values())}
        log.info("rsna: %d patients with a DICOM and one class (%d normal, %d abnormal) from %d CSV rows",
                 len(labelled), counts["good"], len(labelled) - counts["good"], table.rows)

        def rel(p: Path) -> str:
            return p.relative_to(self.raw).as_posix()

        jobs = [Job(pid, rel(images[pid]), _Task(images[pid], rel(images[pid]), pid, split, label))
                for pid, (split, label) in plan.items()]
        jobs += [Job(pid, rel(images[pid]), _Task(images[pid], rel(images[pid]), pid, conflict=why))
                 for pid, why in conflicts.items()]
        jobs.sort(key=lambda j: j.key)
        options = {"reorganizer": "rsna-1", "images": self.images, "labels": self.labels, "size": self.size,
                   "split_seed": self.split_seed}
        fingerprint = input_fingerprint(options, [labels_path, *(images[j.key] for j in jobs)], self.raw)
        return write_bench(Path(out), self.folder, jobs, self._job, fingerprint=fingerprint, workers=self.workers,
                           on_error=self.on_error, overwrite=self.overwrite, progress=progress)

    # -- synthetic raw set ---------------------------------------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 60, seed: int = 0, size: int = 1024, **kwargs: Any) -> Path:
        """Write ``n`` patients in the Kaggle layout: 8-bit MONOCHROME2 JPEG-baseline DICOMs of
        ``size`` x ``size`` (RSNA's 1024) and the two CSVs. See :func:`synthetic_patient`."""
        if kwargs:
            raise TypeError(f"unexpected options {sorted(kwargs)}")
        from datasets_prep.dicom import write_dicom

        raw = Path(raw)
        (raw / IMAGES).mkdir(parents=True, exist_ok=True)
        class_rows, box_rows = [], []
        for i in range(n):
            pid, cls_name, pixels, boxes = synthetic_patient(seed, i, size)
            write_dicom(raw / IMAGES / f"{pid}.dcm", pixels, transfer_syntax="1.2.840.10008.1.2.4.50",
                        uid_seed=f"{seed}/{pid}", **_rsna_header(pid, i))
            class_rows += [(pid, cls_name)] * max(1, len(boxes))
            box_rows += [(pid, *b, 1) for b in boxes] or [(pid, "", "", "", "", 0)]
        order = np.random.default_rng([seed, 1]).permutation(len(class_rows))
        _write_csv(raw / LABELS, COLUMNS, [class_rows[i] for i in order])
        _write_csv(raw / BOXES, ("patientId", "x", "y", "width", "height", "Target"), [box_rows[i] for i in order])
        return raw


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _rsna_header(pid: str, index: int) -> dict[str, Any]:
    """The attributes RSNA's files carry besides the image module."""
    return {"SpecificCharacterSet": "ISO_IR 100", "Modality": "CR", "ConversionType": "WSD",
            "PatientName": pid, "PatientID": pid, "PatientSex": "MF"[index % 2],
            "PatientAge": f"{20 + index % 60:03d}Y",
            "BodyPartExamined": "CHEST", "ViewPosition": "PA" if index % 3 else "AP", "StudyDate": "19010101",
            "StudyID": "", "SeriesNumber": 1, "InstanceNumber": 1, "PixelSpacing": [0.14, 0.14]}


SYNTH_CYCLE = ("Normal", "Lung Opacity", "No Lung Opacity / Not Normal", "No Lung Opacity / Not Normal", "Normal",
               "Lung Opacity", "No Lung Opacity / Not Normal", "Normal", "No Lung Opacity / Not Normal")
"""Classes of synthetic patients by index % 9: 3 Normal, 2 Lung Opacity, 4 other (RSNA's 33 / 23 / 44 %)."""


def synthetic_patient(seed: int, index: int, size: int = 1024) -> tuple[str, str, np.ndarray, list[tuple]]:
    """(patientId, class, uint8 [size, size] chest radiograph phantom, opacity boxes) of patient ``index``.

    A function of ``seed`` and ``index`` only. The phantom: dark lungs in a brighter
    body, a bright mediastinum and spine, ribs, smooth texture and noise. ``Lung
    Opacity`` patients get one to three bright fuzzy opacities inside the lungs (their
    boxes, in pixels, as in ``stage_2_train_labels.csv``); the other abnormal class a
    widened heart shadow and a blunted lung base.
    """
    rng = np.random.default_rng([seed, index])
    pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    cls_name = SYNTH_CYCLE[index % len(SYNTH_CYCLE)]
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    img = np.full((s, s), 25.0, np.float32)
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.55) ** 2 < 1
    img[body] = 120
    cx = 0.5 + rng.normal(0, 0.01)
    lung_w, lung_h = 0.17 + rng.normal(0, 0.01), 0.30 + rng.normal(0, 0.015)
    lungs = np.zeros((s, s), bool)
    for side in (-1, 1):
        lx = cx + side * 0.2
        lungs |= ((xx - lx) / lung_w) ** 2 + ((yy - 0.47) / lung_h) ** 2 < 1
    heart_w = 0.12 if cls_name != "No Lung Opacity / Not Normal" else 0.17
    heart = ((xx - cx - 0.03) / heart_w) ** 2 + ((yy - 0.62) / 0.12) ** 2 < 1
    img[lungs] = 55
    ribs = lungs & (np.sin((yy * 22 + 3 * (xx - cx) ** 2 * 22) * np.pi + rng.uniform(0, np.pi)) > 0.75)
    img[ribs] += 28
    img[(np.abs(xx - cx) < 0.07) & body & (yy > 0.12)] = 160  # mediastinum
    img[heart] = 150
    img[(np.abs(xx - cx) < 0.025) & body] = 190  # spine
    boxes = []
    if cls_name == "Lung Opacity":
        for _ in range(int(rng.integers(1, 4))):
            side = rng.choice([-1, 1])
            ox, oy = cx + side * 0.2 + rng.normal(0, 0.04), 0.47 + rng.normal(0, 0.1)
            r = rng.uniform(0.04, 0.08)
            blob = np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * r * r)))
            img += 70 * blob * lungs
            boxes.append(tuple(round(v * s) for v in (ox - 1.5 * r, oy - 1.5 * r, 3 * r, 3 * r)))
    elif cls_name == "No Lung Opacity / Not Normal":
        img[lungs & (yy > 0.66 + rng.normal(0, 0.02))] = 130
    small = rng.normal(0, 1, (32, 32)).astype(np.float32)
    from PIL import Image

    texture = np.asarray(Image.fromarray(small).resize((s, s), Image.Resampling.BICUBIC))
    img += 8 * texture + rng.normal(0, 4, (s, s)).astype(np.float32)
    return pid, cls_name, np.clip(img, 0, 255).astype(np.uint8), boxes
