"""Kermany OCT2017 -> the ``Retina_OCT2017`` bench: NORMAL training B-scans, the original
test set split stratified into valid and test (image labels, no masks).

``bmad prepare oct2017 --raw RAW --out DATA`` reads the folders as Kermany et al.
distribute them (``RAW/train/{NORMAL,CNV,DME,DRUSEN}/*.jpeg`` and ``RAW/test/...``;
the Kaggle mirror also has ``RAW/val/``) and writes ``DATA/Retina_OCT2017/`` in
BMAD's layout with a ``manifest.csv``. docs/datasets/oct2017.md states the protocol
in full; in short:

* train: every image of ``train/NORMAL`` (good);
* the evaluation pool: every image of ``test/`` (and ``val/`` when present: the
  Kaggle mirror moved 32 of the 1,000 test images there); NORMAL -> good,
  CNV / DME / DRUSEN -> Ungood;
* split (:func:`split_sizes`, :func:`plan_eval_split`): per class, BMAD's 8 valid
  images of 250 (proportional for other counts), the rest to test; valid is a seeded
  choice of whole patients (the id in ``<CLASS>-<patient>-<n>.jpeg``) that fills those
  quotas, so no patient is in both valid and test; ``--split kaggle`` keeps the
  mirror's val/ and test/ as they are;
* images: 8-bit grayscale PNG of the decoded JPEG, native size unless ``--size H W``.
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

CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")
DISEASES = CLASSES[1:]
SPLIT_FOLDERS = ("train", "test", "val")
NAME_RE = re.compile(r"^(?P<cls>[A-Za-z]+)-(?P<patient>\d+)-(?P<n>\d+)$")
"""Kermany's file names: ``<CLASS>-<randomized patient id>-<image number of that patient>``."""

BMAD_PER_CLASS = 250
"""Images per class of Kermany's original test set (1,000 in all)."""
BMAD_VALID_PER_CLASS = 8
"""BMAD's valid images per class: 8 NORMAL + 24 diseased = 32; test 242 + 726 = 968."""
SPLIT_MODES = ("stratified", "kaggle")
FORMAT_VERSION = 1

# (height, width) of the synthetic B-scans and how often each occurs. Kermany's Spectralis
# exports are 496 rows high and 512, 768, 1024 or 1536 columns wide, mostly 512 or 768.
REAL_SIZES = ((496, 512), (496, 768), (496, 1024), (496, 1536))
REAL_SIZE_WEIGHTS = (0.6, 0.3, 0.05, 0.05)


def parse_name(stem: str) -> tuple[str, str]:
    """``"CNV-53018-2"`` -> ``("53018", "2")``; a name in another form -> ``(stem, "")``."""
    m = NAME_RE.match(stem)
    return (m["patient"], m["n"]) if m else (stem, "")


# -- the split ---------------------------------------------------------------------------
def split_sizes(counts: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """(valid, test) images per class for ``counts`` images per class in the evaluation pool.

    Per class: valid = BMAD's 8 of 250 scaled by ``n / 250`` (largest remainder between
    valid and test, at least one each: :func:`datasets_prep.common.proportional`), 8 when
    ``n >= 250``; a class with fewer than 2 images goes to test alone. Test = the rest.
    For Kermany's 250 per class this is BMAD's 8 / 242 per class: valid 32, test 968.
    """
    out = {}
    for cls, n in counts.items():
        if n < 2:
            out[cls] = (0, n)
            continue
        valid = proportional((BMAD_VALID_PER_CLASS, BMAD_PER_CLASS - BMAD_VALID_PER_CLASS), BMAD_PER_CLASS, n)[0]
        out[cls] = (valid, n - valid)
    return out


@dataclass
class EvalPlan:
    """The evaluation pool split into valid and test, and what the plan could not meet."""

    valid: list[Item]
    test: list[Item]
    shortfalls: list[str] = field(default_factory=list)


def plan_eval_split(items: Sequence[Item], seed: int) -> EvalPlan:
    """Split the evaluation pool into valid and test, by patient and stratified by class.

    Quotas: the valid sizes of :func:`split_sizes` for the pool's class counts. Valid is a
    set of whole patients whose images fill every class's quota exactly; test is everyone
    else, so no patient is in both. Which set: the patients (sorted ids) are put in the
    order of ``numpy.random.default_rng(seed).permutation``, and of the sets that fill the
    quotas the search (subset sums over per-class image counts) takes the one that avoids
    the patients latest in that order. When no set of whole patients fills every quota
    exactly, it takes a set that fills the most valid images (then the earlier classes
    first) and reports the shortfall.
    """
    counts = Counter(it.cls for it in items)
    classes = [c for c in CLASSES if counts[c]] + sorted(c for c in counts if c not in CLASSES)
    sizes = split_sizes(counts)
    quota = np.array([sizes[c][0] for c in classes], dtype=np.int64)
    by_patient: dict[str, list[Item]] = {}
    for it in sorted(items, key=lambda it: it.source):
        by_patient.setdefault(it.patient, []).append(it)
    patients = sorted(by_patient)
    order = [patients[int(i)] for i in np.random.default_rng(seed).permutation(len(patients))]
    index = {c: j for j, c in enumerate(classes)}
    vectors = []
    for p in order:
        v = np.zeros(len(classes), dtype=np.int64)
        for it in by_patient[p]:
            v[index[it.cls]] += 1
        vectors.append(v)

    # reach[s]: valid class counts ``s`` (one axis per class, 0..quota) are a sum of whole patients
    dims = tuple(int(q) + 1 for q in quota)
    reach = np.zeros(dims, dtype=bool)
    reach[(0,) * len(dims)] = True
    before: list[np.ndarray | None] = []  # reach before each patient; None: the patient cannot fit
    for v in vectors:
        if (v > quota).any():
            before.append(None)
            continue
        before.append(reach)
        shifted = np.zeros_like(reach)
        shifted[tuple(slice(int(k), None) for k in v)] = reach[tuple(slice(0, d - int(k)) for d, k in zip(dims, v))]
        reach = reach | shifted
    target = tuple(int(q) for q in quota)
    if not reach[target]:
        states = [tuple(int(x) for x in s) for s in np.argwhere(reach)]
        target = min(states, key=lambda s: (-sum(s), [-x for x in s]))
    state, chosen = np.array(target, dtype=np.int64), set()
    for p, v, prev in zip(reversed(order), reversed(vectors), reversed(before)):
        if prev is None or prev[tuple(state)]:
            continue  # reachable without this patient
        chosen.add(p)
        state -= v
    assert not state.any()

    plan = EvalPlan([it for p in patients if p in chosen for it in by_patient[p]],
                    [it for p in patients if p not in chosen for it in by_patient[p]])
    for c, got, want in zip(classes, target, quota):
        if got < want:
            plan.shortfalls.append(
                f"valid has {got} of {int(want)} {c} images: no set of whole patients fills it without putting "
                "one patient in both valid and test")
    return plan


# -- finding the raw files ---------------------------------------------------------------
def find_root(raw: Path) -> Path:
    """Check that ``raw`` holds ``train/`` and ``test/``; DataError with the fix otherwise
    (naming the folder to pass when the user pointed one or more levels too high)."""
    return kermany.find_root(raw, DISEASES, "OCT2017",
                             "OCT2017/ from Mendeley, CellData/OCT/ from ZhangLabData.zip, 'OCT2017 /' from Kaggle",
                             " (quote it: the Kaggle mirror's folder is named 'OCT2017 ' with a trailing space)")


def _wrong_class(folder: Path) -> DataError:
    return DataError(f"unexpected class folder {folder} (Kermany's classes are {', '.join(CLASSES)})",
                     hint=f"move {folder.name}/ out of {folder.parent}, or rename it to one of the four classes")


def scan_split(root: Path, split: str, *, classes: Sequence[str] = CLASSES,
               ignored: list[tuple[str, str]] | None = None) -> dict[str, list[Item]]:
    """The images of ``root/split/<CLASS>/`` for the classes in ``classes``, sorted by name
    (:func:`datasets_prep.kermany.scan_split`; every visible sub-folder must be one of
    Kermany's four classes)."""
    return kermany.scan_split(root, split, known=CLASSES, wanted=classes, parse_name=parse_name,
                              wrong_class=_wrong_class, ignored=ignored)


# -- the reorganizer ---------------------------------------------------------------------
@register_reorganizer("oct2017")
class OCT2017(Reorganizer):
    """Kermany OCT2017 JPEGs -> BMAD's Retina_OCT2017 bench (image labels, no masks)."""

    name = "oct2017"
    bench = "oct2017"
    folder = "Retina_OCT2017"
    description = ("Kermany OCT2017 B-scans -> Retina_OCT2017 bench (train NORMAL; the 1,000-image test set "
                   "split by patient, stratified: valid 32, test 968; no masks)")
    raw_layout = """\
OCT2017/      the folder that holds train/ and test/: OCT2017/ from Mendeley's OCT2017.tar.gz,
              CellData/OCT/ from ZhangLabData.zip, 'OCT2017 /' (trailing space) from the Kaggle zip
  train/NORMAL/NORMAL-<patient>-<n>.jpeg                  the training set (train/CNV, DME, DRUSEN unused)
  test/{NORMAL,CNV,DME,DRUSEN}/<CLASS>-<patient>-<n>.jpeg  250 per class
  val/{NORMAL,CNV,DME,DRUSEN}/...                         Kaggle mirror only: 8 per class taken from test/
"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        split: str = "stratified",
        size: Sequence[int] | None = None,
        disjoint_train: bool = False,
        split_seed: int = 0,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        if split not in SPLIT_MODES:
            raise UsageError(f"--split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
        self.split = split
        self.size = parse_size(size, "496 512")
        self.disjoint_train = bool(disjoint_train)
        self.split_seed = int(split_seed)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw``, ``--split``, ``--split-seed``, ``--size``, ``--disjoint-train``."""
        parser.add_argument("--raw", type=Path, required=True,
                            help="the OCT2017 folder that contains train/ and test/ (and val/ in the Kaggle mirror)")
        parser.add_argument("--split", choices=SPLIT_MODES, default="stratified",
                            help="stratified (default): split test/ (+ val/) into valid and test by patient, per "
                                 "class, seeded by --split-seed; kaggle: keep the Kaggle mirror's val/ as valid and "
                                 "test/ as test")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the valid/test split (default 0)")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="resize every image to H x W (bicubic); default: keep each image's native size")
        parser.add_argument("--disjoint-train", action="store_true",
                            help="leave out training images of patients who are in the test set (Kermany's split "
                                 "shares some patients between train and test; BMAD kept them)")

    # -- synthetic raw data (tests, benchmarks/prepare.py) ---------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 60, seed: int = 0, test_per_class: int | None = None,
                   train_disease: int = 2, kaggle: bool = False, size: tuple[int, int] | None = None,
                   overlap: float = 0.15) -> Path:
        """Write a generated OCT2017 raw set in Kermany's layout and naming under ``raw``; return ``raw``.

        ``n``: images the bench will hold (train NORMAL + evaluation pool); ``test_per_class`` (default ``max(2, n // 10)``) images per class in
        the test set, the rest NORMAL training images; ``train_disease`` images per disease
        class in train/ (not used by the reorganizer); ``size`` (H, W) of every image, default
        Kermany's sizes (496 rows, 512..1536 columns, :data:`REAL_SIZES`). Patients have 1..3
        images per class; some test patients have two classes, and a share ``overlap`` of the
        training patients are also test patients, as in Kermany's split. ``kaggle``: write the
        Kaggle mirror's layout, ``raw/'OCT2017 '/{train,test,val}`` with 8/250 of each test
        class in val/ (at least one); ``--raw`` is then ``raw/'OCT2017 '``.
        """
        from PIL import Image

        n = int(n)
        t = int(test_per_class if test_per_class is not None else max(2, n // 10))
        n_train = n - len(CLASSES) * t
        if t < 1 or n_train < 1:
            raise ValueError(f"n={n} is too small for {t} test images per class and one training image")
        rng = np.random.default_rng(seed)
        root = Path(raw) / "OCT2017 " if kaggle else Path(raw)
        used: set[int] = set()

        def new_id() -> str:
            while True:
                pid = int(rng.integers(100_000, 10_000_000))
                if pid not in used:
                    used.add(pid)
                    return str(pid)

        def groups(k: int) -> list[int]:
            """Images per patient: a single-image patient first (as Kermany's test set has
            many), then 1, 2 or 3 with probabilities 1/2, 3/10, 1/5."""
            sizes = [1]
            while sum(sizes) < k:
                sizes.append(min(int(rng.choice(3, p=(0.5, 0.3, 0.2))) + 1, k - sum(sizes)))
            return sizes

        numbers: Counter[tuple[str, str, str]] = Counter()

        def write(split: str, cls: str, pid: str) -> None:
            h, w = size if size is not None else REAL_SIZES[int(rng.choice(len(REAL_SIZES), p=REAL_SIZE_WEIGHTS))]
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            numbers[(split, cls, pid)] += 1
            name = f"{cls}-{pid}-{numbers[(split, cls, pid)]}.jpeg"
            Image.fromarray(_bscan(rng, h, w, cls)).save(folder / name, quality=75)

        test_patients: list[str] = []
        earlier: list[str] = []  # patients of the disease classes already written
        for ci, klass in enumerate(CLASSES):
            this: list[str] = []
            for gi, k in enumerate(groups(t)):
                # every third group of DME and DRUSEN (not the first) is a patient of an earlier disease class
                pid = earlier.pop() if ci >= 2 and gi % 3 == 2 and earlier else new_id()
                test_patients.append(pid)
                this.append(pid)
                for _ in range(k):
                    write("test", klass, pid)
            if ci >= 1:
                earlier += this
        pool = sorted(set(test_patients))
        for k in groups(n_train):
            pid = pool[int(rng.integers(len(pool)))] if rng.random() < overlap else new_id()
            for _ in range(k):
                write("train", "NORMAL", pid)
        for klass in DISEASES:
            for _ in range(train_disease):
                write("train", klass, new_id())
        if kaggle:
            for klass in CLASSES:
                files = sorted((root / "test" / klass).iterdir())
                k = max(1, min(len(files) - 1, round(len(files) * BMAD_VALID_PER_CLASS / BMAD_PER_CLASS)))
                (root / "val" / klass).mkdir(parents=True, exist_ok=True)
                for p in files[:k]:
                    p.rename(root / "val" / klass / p.name)
        return Path(raw)

    # -- planning --------------------------------------------------------------------------
    def plan(self) -> tuple[Path, list[tuple[str, str, Item]], list[tuple[str, str]]]:
        """Find and check the raw files and choose each output's split and label.

        Returns the raw root, ``(split, label, item)`` for every image to write in source
        order, and the non-image files set aside (source, reason). Reads file names only.
        """
        root = find_root(self.raw)
        ignored: list[tuple[str, str]] = []
        has_val = (root / "val").is_dir()
        if self.split == "kaggle" and not has_val:
            raise DataError(f"--split kaggle needs the Kaggle mirror's val/ folder, and {root} has none",
                            hint="use the default --split stratified, or pass the Kaggle 'OCT2017 ' folder")
        train = scan_split(root, "train", classes=("NORMAL",), ignored=ignored)
        train_normal = train.get("NORMAL", [])
        if not train_normal:
            raise DataError(f"no NORMAL training images in {root / 'train' / 'NORMAL'}",
                            hint="the training set is the NORMAL images of the original train/; check --raw")
        pools = {s: scan_split(root, s, ignored=ignored) for s in ("test", "val") if (root / s).is_dir()}
        for s, by_cls in pools.items():
            for c in CLASSES:
                if not by_cls.get(c):
                    log.warning("oct2017: %s has no %s images", root / s / c, c)
        evaluation = [it for s in ("test", "val") for c in CLASSES for it in pools.get(s, {}).get(c, [])]
        counts = Counter(it.cls for it in evaluation)
        if not counts["NORMAL"] or not any(counts[c] for c in DISEASES):
            raise DataError(
                f"the test set in {root / 'test'} needs NORMAL images and images of at least one of "
                f"{', '.join(DISEASES)} (found {dict(counts) or 'none'})",
                hint="pass --raw pointing at the complete OCT2017 folder",
            )

        if self.split == "kaggle":
            valid = [it for c in CLASSES for it in pools["val"].get(c, [])]
            test = [it for c in CLASSES for it in pools["test"].get(c, [])]
            both = {it.patient for it in valid} & {it.patient for it in test}
            if both:
                log.warning("oct2017: --split kaggle keeps the mirror's val/ and test/, which share %d patient(s)",
                            len(both))
        else:
            ev = plan_eval_split(evaluation, self.split_seed)
            valid, test = ev.valid, ev.test
            for msg in ev.shortfalls:
                log.warning("oct2017: %s", msg)

        eval_patients = {it.patient for it in evaluation}
        overlap = [it for it in train_normal if it.patient in eval_patients]
        if overlap:
            n_pat = len({it.patient for it in overlap})
            if self.disjoint_train:
                log.info("oct2017: left out %d training image(s) of %d patient(s) who are also in the test set "
                         "(--disjoint-train)", len(overlap), n_pat)
                train_normal = [it for it in train_normal if it.patient not in eval_patients]
            else:
                log.info("oct2017: %d training image(s) of %d patient(s) who are also in the test set are kept "
                         "(as in Kermany's and BMAD's split; --disjoint-train leaves them out)", len(overlap), n_pat)
        chosen = ([("train", "good", it) for it in train_normal]
                  + [(s, "good" if it.cls == "NORMAL" else "Ungood", it) for s, part in (("valid", valid), ("test", test))
                     for it in part])
        return root, sorted(chosen, key=lambda x: x[2].source), ignored

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/Retina_OCT2017/`` (images, manifest.csv; skipped.csv for bad inputs)."""
        root, chosen, ignored = self.plan()
        names: Counter[tuple[str, str, str]] = Counter((s, lab, it.path.stem) for s, lab, it in chosen)
        jobs = []
        for split, label, it in chosen:
            stem = it.path.stem
            if names[(split, label, stem)] > 1:  # same name in test/ and val/ (or .jpeg and .jpg)
                stem = f"{stem}__{it.source.split('/')[0]}_{it.path.suffix.lstrip('.').lower()}"
            jobs.append(Job(it.source, it.source,
                            Payload(it.path, split, label, f"{stem}.png", it.patient, it.source, it.number)))
        options = {"format": FORMAT_VERSION, "split": self.split, "split_seed": self.split_seed,
                   "size": list(self.size) if self.size else None, "disjoint_train": self.disjoint_train}
        fingerprint = input_fingerprint(options, [it.path for _, _, it in chosen], root)
        return write_bench(out, self.folder, jobs, self._write_one, fingerprint=fingerprint, workers=self.workers,
                           on_error=self.on_error, overwrite=self.overwrite, progress=progress, skipped=ignored)

    def _write_one(self, p: Payload) -> list[Output]:
        """Decode one JPEG to 8-bit gray (resized when ``--size``) and return its PNG."""
        pixels = decode_gray(p.path)
        pixels = resize_gray(pixels, self.size)
        return [Output(p.split, p.label, p.name, png_bytes(pixels), None, patient=p.patient, source=p.source,
                       slice=p.number)]


def _bscan(rng: np.random.Generator, h: int, w: int, cls: str) -> np.ndarray:
    """A B-scan-like uint8 image: dark speckled background, a bright curved retina band with
    layers; CNV/DME get a dark fluid pocket, DRUSEN bumps under the band."""
    x = np.arange(w, dtype=np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    top = h * (0.35 + 0.08 * np.sin(x / w * np.pi * rng.uniform(0.8, 1.2) + rng.uniform(0, 1)))
    thick = h * rng.uniform(0.12, 0.18)
    depth = (y - top) / thick
    band = np.where((depth >= 0) & (depth <= 1), 90 + 60 * np.cos(depth * np.pi * 3) ** 2, 0)
    band = band + np.where((depth > 1) & (depth <= 1.15), 200, 0)  # the bright RPE line
    if cls in ("CNV", "DME"):
        cx, r = rng.uniform(0.3, 0.7) * w, h * rng.uniform(0.04, 0.08)
        band = np.where((x - cx) ** 2 / (3 * r) ** 2 + (depth - 0.5) ** 2 / 0.1 < 1, 15, band)
    elif cls == "DRUSEN":
        for cx in rng.uniform(0.2, 0.8, 3) * w:
            band = band + np.where(np.abs(depth - 1.0) < 0.25 * np.exp(-((x - cx) / (w * 0.03)) ** 2), 120, 0)
    speckle = rng.gamma(4.0, 0.25, (h, w)).astype(np.float32)
    img = (band + 12) * speckle + rng.normal(0, 4, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)
