"""Stanford CheXpert -> the ``CheXpert`` bench, with SQUID's protocol (PPAD, MediCLIP): frontal
PA chest X-rays; "No Finding" normal, any of the 12 pathologies abnormal; test 250 + 250.

``bmad prepare chexpert --raw RAW --out DATA`` reads a CheXpert v1.0 folder as Stanford
distributes it (``RAW/train.csv``, ``RAW/valid.csv``, ``RAW/{train,valid}/patientNNNNN/studyN/
viewN_{frontal,lateral}.jpg``; the downsampled ``CheXpert-v1.0-small`` or the original
``CheXpert-v1.0``) and writes ``DATA/CheXpert/`` in BMAD's layout with a ``manifest.csv``.
docs/datasets/chexpert.md states the protocol in full; in short:

* images: the rows of ``train.csv`` / ``valid.csv`` with ``Frontal/Lateral = Frontal`` and
  ``AP/PA = PA``; labels (:func:`row_label`): ``No Finding = 1`` -> good, a positive (1) of
  any of the 12 pathologies -> Ungood, anything else (uncertain-only, support devices
  only, unlabelled, contradictory) left out;
* test (:func:`plan_split`): 250 normal and 250 abnormal images of ``train.csv``, one per
  patient, patients drawn seeded (fewer for a subset: half the normal patients at most);
  every image of a test patient leaves the training pool;
* train: the normal images of every other ``train.csv`` patient; valid: ``valid.csv``
  (the official, radiologist-labelled validation set), normal and abnormal;
* SQUID's and MediCLIP's exact file lists are distributed only inside Google Drive
  archives that could not be obtained here, so this is their documented rule, implemented
  deterministically; the test set's sizes match, its images are our seeded choice.

A file named by a CSV row but missing on disk is an error (``--on-error fail``) or skipped and
listed in ``skipped.csv`` (``--on-error skip``); the split is planned from the CSVs alone, so
missing files never change which images go where.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bmad.errors import DataError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import (
    Job,
    Output,
    decode_gray,
    input_fingerprint,
    parse_size,
    png_bytes,
    read_csv,
    resize_gray,
    write_bench,
)
from datasets_prep.zhanglab import synthetic_chest

log = logging.getLogger(__name__)

CSVS = {"train": "train.csv", "valid": "valid.csv"}
PATHOLOGIES = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture")
"""CheXpert's 14 observations less "No Finding" and "Support Devices": the 12 diseases of SQUID's protocol."""
HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *PATHOLOGIES, "Support Devices")
"""The columns of ``train.csv`` and ``valid.csv`` in CheXpert v1.0."""
REQUIRED = ("Path", "Frontal/Lateral", "AP/PA", "No Finding", *PATHOLOGIES)
TEST_PER_LABEL = 250
"""SQUID's test set: 250 normal + 250 abnormal frontal PA images of the training set (MediCLIP's too)."""
VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": None}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Row:
    """A frontal PA image listed by a CSV: ``rel`` relative to the raw root (``train/patient.../
    study1/view1_frontal.jpg``), its patient folder, label (good | Ungood | "" when left out),
    and the CSV line it came from."""

    rel: str
    patient: str
    label: str
    csv: str
    line: int

    @property
    def name(self) -> str:
        """The output file name: ``patient00001_study1_view1_frontal.png``."""
        return "_".join(self.rel.split("/")[1:]).rsplit(".", 1)[0] + ".png"


def row_label(values: dict[str, int | None]) -> str:
    """good for ``No Finding = 1`` with no pathology positive, Ungood for a positive (1) of one of the
    12 pathologies without ``No Finding = 1``, "" otherwise (uncertain or unmentioned only, or contradictory)."""
    normal = values["No Finding"] == 1
    abnormal = any(values[p] == 1 for p in PATHOLOGIES)
    if normal != abnormal:
        return "good" if normal else "Ungood"
    return ""


@dataclass
class Table:
    """What one CSV lists: its frontal PA rows, and how many rows of each other kind."""

    rows: list[Row]
    other_views: int = 0
    unlabelled: int = 0


def read_table(path: Path, split: str) -> Table:
    """Read ``train.csv`` or ``valid.csv`` (``split``); DataError naming the file and line for a
    missing column, a value that is not 1/0/-1/blank, or a path outside ``split/``."""
    hint = f"pass the CheXpert v1.0 folder whose {path.name} is unchanged (columns {', '.join(HEADER)})"
    if not path.is_file():
        raise DataError(f"{path} does not exist", hint=f"--raw must be the CheXpert folder holding {CSVS[split]}")
    reader = iter(read_csv(path, hint))
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(repr(c) for c in missing)} (its header: {header})",
                        hint=hint)
    col = {c: header.index(c) for c in REQUIRED}
    table = Table([])
    for line, cells in enumerate(reader, start=2):
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) < len(header):
            raise DataError(f"{path} line {line} has {len(cells)} fields, expected {len(header)}", hint=hint)
        if cells[col["Frontal/Lateral"]].strip() != "Frontal" or cells[col["AP/PA"]].strip() != "PA":
            table.other_views += 1
            continue
        values = {}
        for c in ("No Finding", *PATHOLOGIES):
            v = cells[col[c]].strip()
            if v not in VALUES:
                raise DataError(f"{path} line {line}: {c} is {v!r}; CheXpert's values are 1.0, 0.0, -1.0 or blank",
                                hint=hint)
            values[c] = VALUES[v]
        parts = cells[col["Path"]].strip().split("/")
        start = next((i for i, p in enumerate(parts) if p in CSVS), None)
        if start is None or parts[start] != split or len(parts) - start < 3 or ".." in parts:
            raise DataError(f"{path} line {line}: Path {cells[col['Path']]!r} is not an image under {split}/",
                            hint=hint)
        label = row_label(values)
        if not label:
            table.unlabelled += 1
            continue
        table.rows.append(Row("/".join(parts[start:]), parts[start + 1], label, path.name, line))
    return table


# -- the split ---------------------------------------------------------------------------
@dataclass
class Plan:
    """The images of each split (rows of train.csv for train and test, of valid.csv for valid)."""

    train: list[Row]
    valid: list[Row]
    test: list[Row]
    notes: list[str] = field(default_factory=list)


def plan_split(train_rows: Sequence[Row], valid_rows: Sequence[Row], seed: int) -> Plan:
    """Split the labelled frontal PA rows into train, valid and test.

    With ``rng = numpy.random.default_rng(seed)``: the patients with a normal image (sorted)
    are shuffled with ``rng.permutation`` and the first ``k = min(250, half of them)`` are
    normal test patients; the patients with an abnormal image who are not among those
    (sorted) are shuffled with the next permutation and the first ``min(k, their number)``
    are abnormal test patients. Each test patient gives one image of that label, drawn with
    ``rng.integers`` from their images (sorted by path) in that order. Every other image of a
    test patient is left out. Train: the normal images of all other patients; valid: every
    labelled row of valid.csv.
    """
    good: dict[str, list[Row]] = {}
    bad: dict[str, list[Row]] = {}
    for r in sorted(train_rows, key=lambda r: r.rel):
        (good if r.label == "good" else bad).setdefault(r.patient, []).append(r)
    normal_patients = sorted(good)
    k = min(TEST_PER_LABEL, len(normal_patients) // 2)
    if k < 1:
        raise DataError(f"train.csv lists normal frontal PA images of {len(normal_patients)} patient(s); the split "
                        "needs at least 2 (one for test, one for train)",
                        hint="pass the complete CheXpert folder")
    rng = np.random.default_rng(seed)
    test_normal = [normal_patients[int(i)] for i in rng.permutation(len(normal_patients))[:k]]
    taken = set(test_normal)
    candidates = sorted(p for p in bad if p not in taken)
    if not candidates:
        raise DataError("train.csv lists no abnormal frontal PA image of a patient outside the normal test set",
                        hint="pass the complete CheXpert folder")
    test_abnormal = [candidates[int(i)] for i in rng.permutation(len(candidates))[:k]]
    taken.update(test_abnormal)
    test = [good[p][int(rng.integers(len(good[p])))] for p in test_normal]
    test += [bad[p][int(rng.integers(len(bad[p])))] for p in test_abnormal]
    plan = Plan(train=[r for p in normal_patients if p not in taken for r in good[p]],
                valid=sorted(valid_rows, key=lambda r: r.rel), test=sorted(test, key=lambda r: r.rel))
    if not plan.train:
        raise DataError("no normal frontal PA image of train.csv is left for training", hint="pass the complete CheXpert folder")
    if len(test_normal) < TEST_PER_LABEL or len(test_abnormal) < TEST_PER_LABEL:
        plan.notes.append(f"test has {len(test_normal)} normal and {len(test_abnormal)} abnormal images (the "
                          f"protocol's {TEST_PER_LABEL} + {TEST_PER_LABEL} need more patients than this folder lists)")
    left_out = sum(len(good.get(p, [])) + len(bad.get(p, [])) for p in taken) - len(test)
    if left_out:
        plan.notes.append(f"{left_out} other frontal PA image(s) of the {len(taken)} test patients are left out")
    shared = {r.patient for r in plan.valid} & {r.patient for r in train_rows}
    if shared:
        plan.notes.append(f"valid.csv shares {len(shared)} patient(s) with train.csv (the official split does not)")
    return plan


# -- finding the raw files ---------------------------------------------------------------
def _looks_like_root(folder: Path) -> bool:
    return (folder / CSVS["train"]).is_file() and (folder / "train").is_dir()


def find_root(raw: Path) -> Path:
    """Check that ``raw`` holds train.csv, valid.csv and train/; DataError with the fix otherwise
    (naming the folder to pass when ``raw`` is its parent or one of its sub-folders)."""
    hint = ("pass --raw pointing at the CheXpert folder that holds train.csv, valid.csv, train/ and valid/ "
            "(CheXpert-v1.0-small/ or CheXpert-v1.0/)")
    if not raw.is_dir():
        raise DataError(f"raw folder {raw} does not exist", hint=hint)
    if _looks_like_root(raw):
        return raw
    found = [p for p in (*sorted(raw.glob("*/")), *sorted(raw.glob("*/*/"))) if p.is_dir() and _looks_like_root(p)]
    if _looks_like_root(raw.parent):
        found.insert(0, raw.parent)
    if found:
        hint = f"pass --raw {' or '.join(repr(str(p)) for p in found[:3])}: the folder that holds train.csv and train/"
    missing = [n for n in (CSVS["train"], "train/") if not (raw / n.rstrip("/")).exists()]
    raise DataError(f"{raw} has no {' and no '.join(missing)}", hint=hint)


# -- the reorganizer ---------------------------------------------------------------------
@register_reorganizer("chexpert")
class CheXpert(Reorganizer):
    """Stanford CheXpert -> the CheXpert bench of SQUID, PPAD and MediCLIP (image labels, no masks)."""

    name = "chexpert"
    bench = "chexpert"
    folder = "CheXpert"
    description = ("Stanford CheXpert frontal PA chest X-rays -> CheXpert bench (SQUID/PPAD/MediCLIP protocol: "
                   "train No-Finding images, valid = official valid.csv, test 250 normal + 250 abnormal of train.csv "
                   "by patient; no masks)")
    raw_layout = """\
CheXpert-v1.0-small/ (or CheXpert-v1.0/)   the folder that holds the two CSVs
  train.csv, valid.csv        Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,<12 pathologies>,Support Devices
  train/patient<NNNNN>/study<N>/view<N>_{frontal,lateral}.jpg     223,414 images of 64,540 patients
  valid/patient<NNNNN>/study<N>/view<N>_{frontal,lateral}.jpg     234 images of 200 patients
"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        size: Sequence[int] | None = None,
        split_seed: int = 0,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.size = parse_size(size)
        self.split_seed = int(split_seed)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw``, ``--split-seed``, ``--size``."""
        parser.add_argument("--raw", type=Path, required=True,
                            help="the CheXpert folder that holds train.csv, valid.csv, train/ and valid/")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the test draw (default 0)")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="resize every image to H x W (bicubic); default: keep each image's native size")

    def plan(self) -> tuple[Path, Plan, list[tuple[str, str]]]:
        """Read the CSVs, plan the split, and set aside the planned files that are missing on disk.

        Returns the raw root, the plan (missing files removed) and the missing files as
        (source, reason); with ``--on-error fail`` a missing file is a DataError instead.
        """
        root = find_root(self.raw)
        tables = {s: read_table(root / name, s) for s, name in CSVS.items()}
        for s, t in tables.items():
            log.info("chexpert: %s: %d labelled frontal PA images (%d normal); %d other views, %d frontal PA rows "
                     "without a usable label left out", CSVS[s], len(t.rows), sum(r.label == "good" for r in t.rows),
                     t.other_views, t.unlabelled)
        plan = plan_split(tables["train"].rows, tables["valid"].rows, self.split_seed)
        for note in plan.notes:
            log.warning("chexpert: %s", note)
        labels = Counter(r.label for r in plan.valid)
        if not labels["good"] or not labels["Ungood"]:
            log.warning("chexpert: valid has %d normal and %d abnormal images", labels["good"], labels["Ungood"])
        missing = [r for part in (plan.train, plan.valid, plan.test) for r in part if not (root / r.rel).is_file()]
        if missing and self.on_error == "fail":
            r = missing[0]
            raise DataError(f"{len(missing)} image(s) named by the CSVs are missing under {root}, e.g. {r.rel} "
                            f"({r.csv} line {r.line})",
                            hint="re-extract the CheXpert archive into --raw, or use --on-error skip to leave them out")
        gone = {r.rel for r in missing}
        plan.train, plan.valid, plan.test = ([r for r in part if r.rel not in gone]
                                             for part in (plan.train, plan.valid, plan.test))
        return root, plan, [(r.rel, f"named by {r.csv} line {r.line} but missing") for r in missing]

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/CheXpert/`` (images, manifest.csv; skipped.csv for missing or bad inputs)."""
        root, plan, missing = self.plan()
        jobs = [Job(r.rel, r.rel, (root / r.rel, split, r))
                for split, part in (("train", plan.train), ("valid", plan.valid), ("test", plan.test)) for r in part]
        jobs.sort(key=lambda j: j.key)
        options = {"format": FORMAT_VERSION, "split_seed": self.split_seed,
                   "size": list(self.size) if self.size else None}
        files = [root / CSVS["train"], root / CSVS["valid"], *(root / j.key for j in jobs)]
        fingerprint = input_fingerprint(options, files, root)
        return write_bench(out, self.folder, jobs, self._write_one, fingerprint=fingerprint, workers=self.workers,
                           on_error=self.on_error, overwrite=self.overwrite, progress=progress, skipped=missing)

    def _write_one(self, payload: tuple[Path, str, Row]) -> list[Output]:
        """Decode one JPEG to 8-bit gray (resized when ``--size``) and return its PNG."""
        path, split, r = payload
        pixels = resize_gray(decode_gray(path), self.size)
        return [Output(split, r.label, r.name, png_bytes(pixels), None, patient=r.patient, source=r.rel)]

    # -- synthetic raw data (tests, benchmarks/prepare.py) ---------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 40, seed: int = 0, size: tuple[int, int] = (390, 320),
                   n_valid: int | None = None, folder: str = "CheXpert-v1.0-small") -> Path:
        """Write a generated CheXpert folder ``raw/<folder>/`` (CSVs and JPEGs); return ``raw``.

        ``n`` training patients (``n_valid``, default ``max(2, n // 10)``, validation
        patients), each with 1 to 3 studies of a frontal view (PA for two patients in three,
        AP otherwise) and, for every other study, a lateral view. Study labels cycle, so that
        every small set has each kind: No Finding, one or two pathologies (some also with
        uncertain ones), uncertain only, support devices only; validation labels are 0/1
        only, as in the official valid.csv. ``size`` (H, W) of every image, default about the
        downsampled release's. The CSV paths start with ``<folder>/`` as Stanford's do.
        """
        from PIL import Image

        if n < 4:
            raise ValueError(f"n={n} is too small: give at least 4 training patients")
        n_valid = max(2, n // 10) if n_valid is None else int(n_valid)
        rng = np.random.default_rng(seed)
        root = Path(raw) / folder
        index = iter(range(10**9))
        h, w = size
        for split, patients, first in (("train", n, 1), ("valid", n_valid, 64541)):
            rows = []
            for i in range(patients):
                pid = f"patient{first + i:05d}"
                for study in range(1, (1 if split == "valid" else 1 + (i % 3)) + 1):
                    kind = (i + study) % 5 if split == "train" else i % 2  # valid: normal / abnormal
                    labels: dict[str, str] = dict.fromkeys((*PATHOLOGIES, "No Finding", "Support Devices"), "")
                    if kind == 0:
                        labels["No Finding"] = "1.0"
                    elif kind in (1, 2):
                        for p in rng.choice(len(PATHOLOGIES), kind, replace=False):
                            labels[PATHOLOGIES[int(p)]] = "1.0"
                        if kind == 2:
                            labels["Lung Opacity" if labels["Edema"] == "" else "Edema"] = "-1.0"
                    elif kind == 3:
                        labels[PATHOLOGIES[int(rng.integers(len(PATHOLOGIES)))]] = "-1.0"
                    else:
                        labels["Support Devices"] = "1.0"
                    if split == "valid":
                        labels = {k: v or "0.0" for k, v in labels.items()}
                    abnormal = any(labels[p] == "1.0" for p in PATHOLOGIES)
                    views = [("frontal", "AP" if i % 3 == 2 else "PA")] + ([("lateral", "")] if study % 2 == 0 else [])
                    for v, (view, ap_pa) in enumerate(views, start=1):
                        rel = f"{split}/{pid}/study{study}/view{v}_{view}.jpg"
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(synthetic_chest(seed, next(index), abnormal, h, w)).save(root / rel, quality=90)
                        rows.append([f"{folder}/{rel}", "Female" if i % 2 else "Male", str(20 + i % 60),
                                     view.capitalize(), ap_pa, *(labels[c] for c in HEADER[5:])])
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(rows)
            (root / CSVS[split]).write_text(buf.getvalue(), encoding="utf-8")
        return Path(raw)

    @classmethod
    def synthetic_options(cls, raw: Path) -> dict[str, Any]:
        """``raw/CheXpert-v1.0-small``, the folder :meth:`synthesize` writes by default."""
        return {"raw": Path(raw) / "CheXpert-v1.0-small"}
