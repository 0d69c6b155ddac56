"""Kermany's pediatric chest X-rays ("ZhangLab") -> the ``ZhangLab`` bench, with the protocol PPAD
took from SQUID: normal-only training, Kermany's original test set (234 normal + 390 pneumonia).

``bmad prepare zhanglab --raw RAW --out DATA`` reads the folders as Kermany et al. distribute
them (``RAW/train/{NORMAL,PNEUMONIA}/*.jpeg`` and ``RAW/test/...``; the Kaggle mirror also has
``RAW/val/``) and writes ``DATA/ZhangLab/`` in BMAD's layout with a ``manifest.csv``.
docs/datasets/zhanglab.md states the protocol in full; in short:

* test: every image of ``test/``, unchanged (Kermany's 624: NORMAL -> good, PNEUMONIA -> Ungood);
* valid (:func:`valid_sizes`, :func:`plan_valid`): whole patients of the training pool
  (``train/``, plus the Kaggle mirror's ``val/``, which was taken out of it) that fill 8 NORMAL
  and 8 PNEUMONIA images (proportional for a smaller pool), seeded, none of them a test patient;
  ``--split kaggle`` keeps the mirror's ``val/`` as valid instead;
* train: every other NORMAL image of the training pool (good): 1,341 of Kermany's 1,349;
* images: 8-bit grayscale PNG of the decoded JPEG, native size unless ``--size H W``.

Patient ids come from the file names of both releases: ``IM-<p>-<n>`` /
``NORMAL2-IM-<p>-<n>`` / ``person<p>_{bacteria,virus}_<n>`` (Mendeley v2, the Kaggle mirror) and
``{NORMAL,BACTERIA,VIRUS}-<p>-<n>`` (Mendeley v3, ``ZhangLabData.zip``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmad.errors import DataError, UsageError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep import kermany
from datasets_prep.common import (
    Job,
    Output,
    decode_gray,
    input_fingerprint,
    parse_size,
    png_bytes,
    proportional,
    resize_gray,
    write_bench,
)
from datasets_prep.kermany import Item, Payload

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
LABELS = {"NORMAL": "good", "PNEUMONIA": "Ungood"}
OCT_CLASSES = ("CNV", "DME", "DRUSEN")
NAME_RES = (
    re.compile(r"^(?P<patient>(?:NORMAL2-)?IM-\d+)-(?P<n>\d+)$"),  # v2 / Kaggle NORMAL
    re.compile(r"^(?P<patient>person\d+)_(?:bacteria|virus)_(?P<n>\d+)$"),  # v2 / Kaggle PNEUMONIA
    re.compile(r"^(?:NORMAL|BACTERIA|VIRUS)-(?P<patient>\d+)-(?P<n>\d+)$"),  # v3 (ZhangLabData.zip)
)
"""Kermany's file names; the ``n`` of ``person<p>_bacteria_<n>`` counts over all patients."""

KERMANY_TRAIN = {"NORMAL": 1349, "PNEUMONIA": 3883}
"""Images per class of Kermany's training set (the Kaggle mirror: train/ 1,341 + 3,875, val/ 8 + 8)."""
KERMANY_TEST = {"NORMAL": 234, "PNEUMONIA": 390}
"""Kermany's test set: the protocol's test set (SQUID, PPAD)."""
VALID_PER_CLASS = 8
"""Valid images per class held out of the full training pool (the size of the Kaggle mirror's val/)."""
SPLIT_MODES = ("patient", "kaggle")
FORMAT_VERSION = 1


def parse_name(stem: str) -> tuple[str, str]:
    """``"person1_bacteria_1"`` -> ``("person1", "1")``; ``"NORMAL2-IM-1427-0001"`` ->
    ``("NORMAL2-IM-1427", "0001")``; ``"BACTERIA-7422-0001"`` -> ``("7422", "0001")``;
    a name in another form -> ``(stem, "")``."""
    for regex in NAME_RES:
        m = regex.match(stem)
        if m:
            return m["patient"], m["n"]
    return stem, ""


# -- the split ---------------------------------------------------------------------------
def valid_sizes(counts: Mapping[str, int]) -> dict[str, int]:
    """Valid images per class for a training pool of ``counts`` images per class.

    8 of Kermany's 1,349 NORMAL and 8 of the 3,883 PNEUMONIA images, scaled by ``n / full``
    for a smaller class (largest remainder between valid and the rest, at least one each:
    :func:`datasets_prep.common.proportional`); 8 from the full size up; none for a class
    with fewer than 2 images (a NORMAL image is then kept for training).
    """
    out = {}
    for cls, n in counts.items():
        full = KERMANY_TRAIN.get(cls, n)
        out[cls] = 0 if n < 2 else proportional((full - VALID_PER_CLASS, VALID_PER_CLASS), full, n)[1]
    return out


@dataclass
class ValidPlan:
    """The valid images chosen from the training pool, and what the plan could not meet."""

    valid: list[Item]
    shortfalls: list[str] = field(default_factory=list)


def plan_valid(items: Sequence[Item], seed: int, avoid: frozenset[str] | set[str] = frozenset()) -> ValidPlan:
    """Choose valid from the training pool ``items``: whole patients filling :func:`valid_sizes`.

    The patient ids (sorted) are visited in the order of
    ``numpy.random.default_rng(seed).permutation``; a patient is taken when all of their pool
    images fit in what is left of every class's quota, and the visit stops when every quota
    is filled. Patients in ``avoid`` (those of the test set) are passed over, so valid shares
    no patient with train or test. A quota no set of such patients fills is reported.
    """
    counts = Counter(it.cls for it in items)
    quota = valid_sizes({c: counts[c] for c in CLASSES})
    left = dict(quota)
    by_patient: dict[str, list[Item]] = {}
    for it in sorted(items, key=lambda it: it.source):
        by_patient.setdefault(it.patient, []).append(it)
    patients = sorted(by_patient)
    chosen: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(patients)):
        if not any(left.values()):
            break
        p = patients[int(i)]
        need = Counter(it.cls for it in by_patient[p])
        if p in avoid or any(k > left.get(c, 0) for c, k in need.items()):
            continue
        chosen.append(p)
        for c, k in need.items():
            left[c] -= k
    plan = ValidPlan(sorted((it for p in chosen for it in by_patient[p]), key=lambda it: it.source))
    for c in CLASSES:
        if left[c]:
            plan.shortfalls.append(f"valid has {quota[c] - left[c]} of {quota[c]} {c} images: no other patient of "
                                   "the training pool fits without being a test patient or overshooting a quota")
    return plan


# -- finding the raw files ---------------------------------------------------------------
def find_root(raw: Path) -> Path:
    """Check that ``raw`` holds ``train/`` and ``test/``; DataError with the fix otherwise
    (naming the folder to pass when the user pointed one or more levels too high)."""
    return kermany.find_root(raw, CLASSES, "chest X-ray",
                             "chest_xray/ from Kaggle's archive.zip or Mendeley's ChestXRay2017.zip, "
                             "CellData/chest_xray/ from ZhangLabData.zip")


def _wrong_class(folder: Path) -> DataError:
    hint = f"move {folder.name}/ out of {folder.parent}"
    if folder.name in OCT_CLASSES:
        hint = ("this is Kermany's OCT set, not the chest X-rays: prepare it with `bmad prepare oct2017`, "
                "and pass the chest_xray/ folder here")
    return DataError(f"unexpected class folder {folder} (the chest X-ray classes are {', '.join(CLASSES)})",
                     hint=hint)


def scan_split(root: Path, split: str, ignored: list[tuple[str, str]] | None = None) -> dict[str, list[Item]]:
    """The images of ``root/split/{NORMAL,PNEUMONIA}/``, sorted by name
    (:func:`datasets_prep.kermany.scan_split`; another visible class folder is an error that
    points at ``bmad prepare oct2017`` for Kermany's OCT folders)."""
    return kermany.scan_split(root, split, known=CLASSES, wanted=CLASSES, parse_name=parse_name,
                              wrong_class=_wrong_class, ignored=ignored)


# -- the reorganizer ---------------------------------------------------------------------
@register_reorganizer("zhanglab")
class ZhangLab(Reorganizer):
    """Kermany's pediatric chest X-rays -> the ZhangLab bench of SQUID and PPAD (image labels, no masks)."""

    name = "zhanglab"
    bench = "zhanglab"
    folder = "ZhangLab"
    description = ("Kermany pediatric chest X-rays (ZhangLab) -> ZhangLab bench (SQUID/PPAD protocol: train "
                   "NORMAL, valid 8 + 8 held out of train by patient, test Kermany's 234 normal + 390 pneumonia; "
                   "no masks)")
    raw_layout = """\
chest_xray/   the folder that holds train/ and test/: chest_xray/ from Kaggle's archive.zip or Mendeley's
              ChestXRay2017.zip, CellData/chest_xray/ from Mendeley's ZhangLabData.zip
  train/NORMAL/*.jpeg      1,349 (Kaggle: 1,341)   IM-<p>-<n>, NORMAL2-IM-<p>-<n> or NORMAL-<p>-<n>
  train/PNEUMONIA/*.jpeg   3,883 (Kaggle: 3,875)   person<p>_{bacteria,virus}_<n> or {BACTERIA,VIRUS}-<p>-<n>
  test/{NORMAL,PNEUMONIA}/*.jpeg   234 + 390: the protocol's test set
  val/{NORMAL,PNEUMONIA}/*.jpeg    Kaggle mirror only: 8 + 8 taken out of train/
"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        split: str = "patient",
        size: Sequence[int] | None = None,
        split_seed: int = 0,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        if split not in SPLIT_MODES:
            raise UsageError(f"--split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
        self.split = split
        self.size = parse_size(size)
        self.split_seed = int(split_seed)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw``, ``--split``, ``--split-seed``, ``--size``."""
        parser.add_argument("--raw", type=Path, required=True,
                            help="the chest X-ray folder that contains train/ and test/ (and val/ in the Kaggle mirror)")
        parser.add_argument("--split", choices=SPLIT_MODES, default="patient",
                            help="patient (default): valid = whole patients of train/ (+ val/) holding 8 NORMAL + 8 "
                                 "PNEUMONIA images, seeded by --split-seed; kaggle: the Kaggle mirror's val/ as is")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the valid split (default 0)")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="resize every image to H x W (bicubic); default: keep each image's native size")

    # -- planning --------------------------------------------------------------------------
    def plan(self) -> tuple[Path, list[tuple[str, str, Item]], list[tuple[str, str]]]:
        """Find and check the raw files and choose each output's split and label.

        Returns the raw root, ``(split, label, item)`` for every image to write in source
        order, and the non-image files set aside (source, reason). Reads file names only.
        """
        root = find_root(self.raw)
        ignored: list[tuple[str, str]] = []
        if self.split == "kaggle" and not (root / "val").is_dir():
            raise DataError(f"--split kaggle needs the Kaggle mirror's val/ folder, and {root} has none",
                            hint="use the default --split patient, or pass the Kaggle chest_xray/ folder")
        found = {s: scan_split(root, s, ignored) for s in ("train", "test", "val") if (root / s).is_dir()}
        test = [it for c in CLASSES for it in found["test"].get(c, [])]
        test_counts = Counter(it.cls for it in test)
        if not all(test_counts[c] for c in CLASSES):
            raise DataError(f"the test set in {root / 'test'} needs NORMAL and PNEUMONIA images "
                            f"(found {dict(test_counts) or 'none'})",
                            hint="pass --raw pointing at the complete chest X-ray folder")
        if dict(test_counts) != KERMANY_TEST:
            log.warning("zhanglab: test/ has %d NORMAL and %d PNEUMONIA images; the protocol's test set is "
                        "Kermany's %d + %d", test_counts["NORMAL"], test_counts["PNEUMONIA"],
                        KERMANY_TEST["NORMAL"], KERMANY_TEST["PNEUMONIA"])
        pool = [it for s in ("train", "val") for c in CLASSES for it in found.get(s, {}).get(c, [])]
        test_patients = {it.patient for it in test}
        if self.split == "kaggle":
            valid = [it for c in CLASSES for it in found["val"].get(c, [])]
            if not valid:
                raise DataError(f"--split kaggle: {root / 'val'} holds no NORMAL or PNEUMONIA images",
                                hint="use the default --split patient")
        else:
            vp = plan_valid(pool, self.split_seed, avoid=test_patients)
            valid = vp.valid
            for msg in vp.shortfalls:
                log.warning("zhanglab: %s", msg)
        in_valid = {it.source for it in valid}
        train = [it for it in pool if it.cls == "NORMAL" and it.source not in in_valid]
        if not train:
            raise DataError(f"no NORMAL training images in {root / 'train' / 'NORMAL'}",
                            hint="the training set is the NORMAL images of the original train/; check --raw")
        if self.split == "kaggle":
            shared = {it.patient for it in valid} & ({it.patient for it in train} | test_patients)
            if shared:
                log.warning("zhanglab: --split kaggle keeps the mirror's val/, which shares %d patient(s) with "
                            "train or test", len(shared))
        overlap = [it for it in train if it.patient in test_patients]
        if overlap:
            log.info("zhanglab: %d training image(s) of %d patient(s) who are also in the test set are kept "
                     "(Kermany's split, which the protocol uses as is)", len(overlap),
                     len({it.patient for it in overlap}))
        chosen = ([("train", "good", it) for it in train] + [("valid", LABELS[it.cls], it) for it in valid]
                  + [("test", LABELS[it.cls], it) for it in test])
        return root, sorted(chosen, key=lambda x: x[2].source), ignored

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/ZhangLab/`` (images, manifest.csv; skipped.csv for bad inputs)."""
        root, chosen, ignored = self.plan()
        names: Counter[tuple[str, str, str]] = Counter((s, lab, it.path.stem) for s, lab, it in chosen)
        jobs = []
        for split, label, it in chosen:
            stem = it.path.stem
            if names[(split, label, stem)] > 1:  # the same name in train/ and val/ (or .jpeg and .jpg)
                stem = f"{stem}__{it.source.split('/')[0]}_{it.path.suffix.lstrip('.').lower()}"
            jobs.append(Job(it.source, it.source,
                            Payload(it.path, split, label, f"{stem}.png", it.patient, it.source, it.number)))
        options = {"format": FORMAT_VERSION, "split": self.split, "split_seed": self.split_seed,
                   "size": list(self.size) if self.size else None}
        fingerprint = input_fingerprint(options, [it.path for _, _, it in chosen], root)
        return write_bench(out, self.folder, jobs, self._write_one, fingerprint=fingerprint, workers=self.workers,
                           on_error=self.on_error, overwrite=self.overwrite, progress=progress, skipped=ignored)

    def _write_one(self, p: Payload) -> list[Output]:
        """Decode one JPEG to 8-bit gray (resized when ``--size``) and return its PNG."""
        pixels = resize_gray(decode_gray(p.path), self.size)
        return [Output(p.split, p.label, p.name, png_bytes(pixels), None, patient=p.patient, source=p.source,
                       slice=p.number)]

    # -- synthetic raw data (tests, benchmarks/prepare.py) ---------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 120, seed: int = 0, size: tuple[int, int] | None = None,
                   naming: str = "kaggle", kaggle_val: bool = False) -> Path:
        """Write a generated chest X-ray raw set in Kermany's layout under ``raw``; return ``raw``.

        ``n`` images in all, split like Kermany's 1,349 / 3,883 train and 234 / 390 test
        NORMAL / PNEUMONIA images (:func:`datasets_prep.common.proportional`, at least one
        each; Kermany's numbers from n = 5,856 up). Patients have 1 to 3 images; the first
        test NORMAL patient also has a training image, as Kermany's split shares patients.
        ``naming``: ``"kaggle"`` (Mendeley v2: ``IM-<p>-<n>``, ``person<p>_bacteria_<n>``) or
        ``"mendeley"`` (v3: ``NORMAL-<p>-<n>``, ``BACTERIA-<p>-<n>``). ``size`` (H, W) of every
        image; default a seeded spread of sizes like Kermany's (hundreds to ~2,000 pixels).
        ``kaggle_val``: move 8/1,349 and 8/3,883 (at least one) of the training images into
        ``val/`` and write everything under ``raw/chest_xray/``, as the Kaggle mirror does.
        """
        from PIL import Image

        if naming not in ("kaggle", "mendeley"):
            raise ValueError(f"naming must be 'kaggle' or 'mendeley', got {naming!r}")
        full = (KERMANY_TRAIN["NORMAL"], KERMANY_TRAIN["PNEUMONIA"], KERMANY_TEST["NORMAL"], KERMANY_TEST["PNEUMONIA"])
        if n < 8:
            raise ValueError(f"n={n} is too small: give at least 8 images")
        train_n, train_p, test_n, test_p = proportional(full, sum(full), int(n))
        rng = np.random.default_rng(seed)
        root = Path(raw) / "chest_xray" if kaggle_val else Path(raw)
        next_id = iter(range(1, 10**9))
        counter = iter(range(1, 10**9))  # person<p>_<kind>_<n>: n counts over all patients

        def patients(k: int) -> list[int]:
            sizes = []
            while sum(sizes) < k:
                sizes.append(min(int(rng.integers(1, 4)), k - sum(sizes)))
            return sizes

        def name(cls_name: str, pid: int, j: int) -> str:
            if cls_name == "NORMAL":
                return (f"{'NORMAL2-' if pid % 2 else ''}IM-{pid:04d}-{j:04d}" if naming == "kaggle"
                        else f"NORMAL-{pid}-{j:04d}")
            kind = ("bacteria", "virus")[pid % 2]
            return f"person{pid}_{kind}_{next(counter)}" if naming == "kaggle" else f"{kind.upper()}-{pid}-{j:04d}"

        index = iter(range(10**9))

        def write(split: str, cls_name: str, pid: int, j: int) -> None:
            if size is None:
                h = int(rng.integers(400, 2000))
                w = int(h * rng.uniform(1.1, 1.5))
            else:
                h, w = size
            folder = root / split / cls_name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = synthetic_chest(seed, next(index), cls_name == "PNEUMONIA", h, w)
            Image.fromarray(pixels).save(folder / f"{name(cls_name, pid, j)}.jpeg", quality=90)

        first_test_normal = None
        for split, cls_name, k in (("test", "NORMAL", test_n), ("test", "PNEUMONIA", test_p),
                                   ("train", "NORMAL", train_n), ("train", "PNEUMONIA", train_p)):
            for gi, m in enumerate(patients(k)):
                pid = next(next_id)
                if split == "test" and cls_name == "NORMAL" and gi == 0:
                    first_test_normal = pid
                elif split == "train" and cls_name == "NORMAL" and gi == 0 and first_test_normal is not None:
                    pid = first_test_normal  # a test patient with a training image
                for j in range(1, m + 1):
                    write(split, cls_name, pid, j)
        if kaggle_val:
            for cls_name in CLASSES:
                files = sorted((root / "train" / cls_name).iterdir())
                k = valid_sizes({cls_name: len(files)})[cls_name]
                (root / "val" / cls_name).mkdir(parents=True, exist_ok=True)
                for p in files[-k:] if k else []:
                    p.rename(root / "val" / cls_name / p.name)
        return Path(raw)


def synthetic_chest(seed: int, index: int, abnormal: bool, h: int, w: int) -> np.ndarray:
    """A uint8 [h, w] chest radiograph phantom (:func:`datasets_prep.rsna.synthetic_patient`'s
    ``Normal`` or ``Lung Opacity`` patient ``index``), resized bilinearly to ``h`` x ``w``."""
    from PIL import Image

    from datasets_prep.rsna import synthetic_patient

    # synthetic_patient's class cycle has Normal at index % 9 == 0 and Lung Opacity at 1
    _, _, square, _ = synthetic_patient(seed, 9 * index + (1 if abnormal else 0), max(h, w))
    return np.asarray(Image.fromarray(square).resize((w, h), Image.Resampling.BILINEAR))
