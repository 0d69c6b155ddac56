"""Kaggle "Brain MRI Images for Brain Tumor Detection" -> the ``BrainMRI`` bench, with MediCLIP's
protocol: test 65 normal + 155 tumour images, every other normal image for training, no valid split.

``bmad prepare brainmri --raw RAW --out DATA`` reads the set as Kaggle distributes it
(``RAW/no/*`` normal, ``RAW/yes/*`` tumour; JPEG and PNG files, some PNGs named ``.jpg``,
names with spaces, sizes from 150 to 1,920 pixels, RGB, RGBA, palette and gray) and writes
``DATA/BrainMRI/`` in BMAD's layout with a ``manifest.csv`` and a ``duplicates.csv``.
docs/datasets/brainmri.md states the protocol in full; in short:

* test: every ``yes/`` image (Ungood) and 65 of the ``no/`` images (good), 65/98 of them for
  a set with fewer than 98 normals (:func:`split_sizes`);
* train: the other ``no/`` images (33 of Kaggle's 98), a seeded choice (:func:`choose_train`)
  that keeps pixel-identical copies together, so no image is in both train and test;
* valid: none. All 253 images are in train or test, so a valid split could only be taken out
  of the protocol's train or test counts; the harness runs without one (``val=None``);
* duplicates: images with identical decoded 8-bit gray pixels (the set has 25 extra copies in
  22 groups) are kept, as the protocol counts them, and listed in ``duplicates.csv``;
* images: 8-bit grayscale PNG (Pillow's ITU-R 601-2 luma of colour images, alpha dropped),
  native size unless ``--size H W``.

MediCLIP (Zhang et al., MICCAI 2024) gives the sizes but publishes its split only as a renamed
copy of the images (``image_<n>.jpg``) with no map back to Kaggle's file names, so the rule
above is ours.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bmad.errors import DataError
from bmad.fsutil import write_text_atomic
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import (
    Job,
    Output,
    decode_gray,
    input_fingerprint,
    parse_size,
    png_bytes,
    proportional,
    resize_gray,
    threaded_map,
    train_test_normals,
    verified_bench,
    write_bench,
)

log = logging.getLogger(__name__)

CLASSES = ("no", "yes")
LABELS = {"no": "good", "yes": "Ungood"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
KAGGLE_COUNTS = {"no": 98, "yes": 155}
"""Images per folder of the Kaggle set (253 in all)."""
MEDICLIP_SIZES = (33, 65)
"""MediCLIP's normal images (train, test) out of Kaggle's 98; every tumour image is a test image."""
DUPLICATES = "duplicates.csv"
DUPLICATE_COLUMNS = ("group", "source", "split", "label", "path")
FORMAT_VERSION = 1

# (height, width) of the synthetic slices: the most common sizes of the Kaggle set
REAL_SIZES = ((225, 225), (630, 630), (251, 201), (442, 442), (512, 512), (325, 300), (168, 300), (380, 310),
              (938, 911), (1080, 1920))


@dataclass(frozen=True)
class Item:
    """One raw image: ``source`` relative to the raw root, and its class folder (``no``/``yes``)."""

    path: Path
    source: str
    cls: str


# -- the split ---------------------------------------------------------------------------
def split_sizes(n_normal: int) -> tuple[int, int]:
    """(train, test) normal images for ``n_normal`` normal images.

    MediCLIP's 65 test images from Kaggle's 98 up, the rest to train (33 of 98); for fewer,
    65/98 of them to test (largest remainder, at least one each:
    :func:`datasets_prep.common.proportional`). DataError below 2.
    """
    return train_test_normals(n_normal, MEDICLIP_SIZES,
                              hint="check that --raw points at the complete set (its no/ folder holds 98 images)")


def choose_train(units: Sequence[Sequence[Item]], n_train: int, seed: int,
                 last: Collection[int] = ()) -> tuple[list[Item], list[str]]:
    """The training images: whole units (an image and its pixel-identical copies) that fill ``n_train``.

    ``units`` in a fixed order (by first source); they are visited in the order of
    ``numpy.random.default_rng(seed).permutation``, the indices in ``last`` after all others,
    and a unit is taken when it fits in what is left. When the units that fit cannot fill
    ``n_train`` exactly, the first unit visited and not taken is split between train and test,
    and the returned notes say so. Returns (train images sorted by source, notes).
    """
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(units))]
    order = [i for i in order if i not in last] + [i for i in order if i in last]
    left, taken = n_train, []
    for i in order:
        if 0 < len(units[i]) <= left:
            taken += units[i]
            left -= len(units[i])
    notes = []
    if left:
        chosen = {it.source for it in taken}
        i = next(i for i in order if units[i] and not chosen & {it.source for it in units[i]})
        part = sorted(units[i], key=lambda it: it.source)
        taken += part[:left]
        notes.append(f"the pixel-identical copies {', '.join(it.source for it in part)} are split between train "
                     f"({left}) and test ({len(part) - left}): no set of whole groups fills {n_train} training images")
    return sorted(taken, key=lambda it: it.source), notes


def output_names(items: Sequence[tuple[str, str, Item]]) -> dict[str, str]:
    """source -> output file name (``.png``), unique within each split/label folder, ignoring case.

    The name is the source's stem with every run of characters other than letters, digits,
    ``.``, ``_`` and ``-`` replaced by ``_`` (``no 94.jpg`` -> ``no_94.png``). Names that
    would clash get ``__<extension>`` (``Y92.jpg`` / ``Y92.png`` -> ``Y92__jpg.png`` /
    ``Y92__png.png``), then also the first 8 hex digits of the source path's sha256.
    """
    def base(it: Item) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", it.path.stem)

    def with_ext(it: Item) -> str:
        return f"{base(it)}__{it.path.suffix.lstrip('.').lower()}"

    def with_hash(it: Item) -> str:
        return f"{with_ext(it)}_{hashlib.sha256(it.source.encode()).hexdigest()[:8]}"

    names = {it.source: base(it) for _, _, it in items}
    for rule in (with_ext, with_hash):
        clash = Counter((s, lab, names[it.source].lower()) for s, lab, it in items)
        for s, lab, it in items:
            if clash[(s, lab, names[it.source].lower())] > 1:
                names[it.source] = rule(it)
    return {source: f"{name}.png" for source, name in names.items()}


# -- finding the raw files ---------------------------------------------------------------
def _subdirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted (none when it cannot be listed)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _class_dirs(folder: Path) -> dict[str, Path]:
    """The ``no``/``yes`` folders in ``folder`` (any case), by class."""
    return {p.name.lower(): p for p in _subdirs(folder) if p.name.lower() in CLASSES}


def find_root(raw: Path) -> Path:
    """Check that ``raw`` holds ``no/`` and ``yes/``; DataError with the fix otherwise (naming
    the folder to pass when ``raw`` is one or two levels too high, or is ``no/`` or ``yes/``)."""
    if not raw.is_dir():
        raise DataError(f"raw folder {raw} does not exist",
                        hint="pass --raw pointing at the folder that contains no/ and yes/")
    found = _class_dirs(raw)
    if len(found) == len(CLASSES):
        return raw
    missing = " and no ".join(f"{c}/" for c in CLASSES if c not in found)
    if raw.name.lower() in CLASSES:
        hint = f"pass --raw {str(raw.parent)!r}: the folder that contains no/ and yes/, not one of them"
    else:
        level, candidates = [raw], []
        for _ in range(2):
            level = [s for f in level for s in _subdirs(f)]
            candidates += [s for s in level if len(_class_dirs(s)) == len(CLASSES)]
        hint = (f"pass --raw {' or '.join(repr(str(c)) for c in candidates[:3])}: the folder that contains no/ and "
                "yes/" if candidates else
                "pass --raw pointing at the folder that contains no/ and yes/ (brain_tumor_dataset/ in Kaggle's "
                "archive.zip)")
    raise DataError(f"{raw} has no {missing} folder", hint=hint)


def scan(root: Path, ignored: list[tuple[str, str]]) -> dict[str, list[Item]]:
    """The images of ``root/no/`` and ``root/yes/`` by class, sorted by source.

    Hidden files and sub-folders are ignored; other files that are not .jpg/.jpeg/.png are
    appended to ``ignored`` as (source, reason).
    """
    found: dict[str, list[Item]] = {}
    for cls, folder in sorted(_class_dirs(root).items()):
        items = []
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            source = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append((source, "not a .jpg/.jpeg/.png image; ignored"))
                continue
            items.append(Item(p, source, cls))
        found[cls] = items
    return found


def pixel_digest(path: Path) -> str:
    """sha256 of the image's decoded 8-bit gray pixels and their shape (what the bench stores)."""
    pixels = decode_gray(path)
    h = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}\n".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


# -- the reorganizer ---------------------------------------------------------------------
@dataclass
class BrainMRISummary(Summary):
    """A :class:`~bmad.reorganizer.Summary` that also lists the pixel-identical images kept."""

    duplicates: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        """The base summary, then the duplicate groups (sources joined by ``=``)."""
        lines = [super().text()]
        if self.duplicates:
            extra = sum(len(g) - 1 for g in self.duplicates)
            lines.append(f"  duplicates: {extra} extra copies in {len(self.duplicates)} groups of pixel-identical "
                         f"images, kept as the protocol counts them (listed in {DUPLICATES}):")
            lines += [f"    {' = '.join(g)}" for g in self.duplicates[:10]]
            if len(self.duplicates) > 10:
                lines.append(f"    ... and {len(self.duplicates) - 10} more groups")
        return "\n".join(lines)


@dataclass
class Plan:
    """What goes where: ``chosen`` (split, label, item) by source; the pixel-identical groups
    (by first source); inputs set aside (source, reason); each item's split unit (patient)."""

    chosen: list[tuple[str, str, Item]]
    groups: list[list[Item]]
    skipped: list[tuple[str, str]]
    patient: dict[str, str]


@dataclass(frozen=True)
class _Payload:
    path: Path
    split: str
    label: str
    name: str
    patient: str
    source: str


def duplicates_text(plan: Plan, names: dict[str, str]) -> str:
    """``duplicates.csv``: one row per image of a pixel-identical group (header only when none)."""
    where = {it.source: (s, lab) for s, lab, it in plan.chosen}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(DUPLICATE_COLUMNS)
    for g, group in enumerate(plan.groups, 1):
        for it in group:
            s, lab = where[it.source]
            w.writerow([g, it.source, s, lab, f"{s}/{lab}/img/{names[it.source]}"])
    return buf.getvalue()


def read_duplicates(final: Path) -> list[list[str]] | None:
    """The groups of sources in ``final/duplicates.csv``; None when it is missing or malformed."""
    try:
        rows = list(csv.DictReader(io.StringIO((final / DUPLICATES).read_text(encoding="utf-8"))))
        groups: dict[str, list[str]] = {}
        for r in rows:
            if r["source"] is None:  # a row shorter than the header
                return None
            groups.setdefault(r["group"], []).append(r["source"])
    except (OSError, ValueError, KeyError, csv.Error):
        return None
    return list(groups.values())


@register_reorganizer("brainmri")
class BrainMRI(Reorganizer):
    """Kaggle Brain MRI (yes/no) -> the BrainMRI bench, MediCLIP's protocol (image labels, no masks)."""

    name = "brainmri"
    bench = "brainmri"
    folder = "BrainMRI"
    description = ("Kaggle Brain MRI Images for Brain Tumor Detection (no/ yes/) -> BrainMRI bench, MediCLIP's "
                   "protocol: test 65 normal + 155 tumour, train the other 33 normals, no valid; duplicates listed")
    raw_layout = """\
brain_tumor_dataset/   the folder that holds no/ and yes/ (Kaggle's archive.zip, unpacked)
  no/*.jpg|jpeg|png    98 normal axial slices (names like 'no 1.jpg', '1 no.jpeg', 'N1.JPG', 'No11.jpg')
  yes/*.jpg|jpeg|png   155 tumour slices ('Y1.jpg', 'Y100.JPG', 'Y92.png', ...)
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
                            help="the folder that contains no/ and yes/ (brain_tumor_dataset/ from Kaggle)")
        parser.add_argument("--split-seed", type=int, default=0,
                            help="seed of the choice of the training normals (default 0)")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="resize every image to H x W (bicubic); default: keep each image's native size")

    # -- synthetic raw data (tests, benchmarks/prepare.py) ---------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 253, seed: int = 0, sizes: Sequence[tuple[int, int]] | None = None,
                   duplicates: int = 0) -> Path:
        """Write a generated Brain MRI raw set in Kaggle's layout and naming under ``raw``; return ``raw``.

        ``n`` images, normal and tumour in Kaggle's 98 : 155 (at least 2 normal, 1 tumour),
        each of a size drawn from ``sizes`` ((H, W) pairs; default :data:`REAL_SIZES`). As in
        the real set: JPEG files (RGB, a few gray or tinted), RGBA PNGs named ``.jpg``, names
        with spaces and mixed-case suffixes, and a tumour PNG with the stem of a tumour JPEG
        (``Y1.jpg`` / ``Y1.png``, when there are 2 or more). ``duplicates``: extra copies of
        the first normal images (``no 9001.jpg`` ...), alternately a byte copy and the same
        pixels re-encoded as PNG (``.png``): identical pixels, different bytes.
        """
        from PIL import Image

        if n < 5:
            raise ValueError(f"n={n} is too small: give at least 5 images")
        n_no, n_yes = proportional((KAGGLE_COUNTS["no"], KAGGLE_COUNTS["yes"]), sum(KAGGLE_COUNTS.values()), int(n))
        rng = np.random.default_rng(seed)
        choices = list(sizes) if sizes else list(REAL_SIZES)
        no_names = ("no {i}.jpg", "{i} no.jpeg", "N{i}.JPG", "No{i}.jpg", "{i} no.jpg")
        files = [("no", no_names[i % len(no_names)].format(i=i + 1)) for i in range(n_no)]
        files += [("yes", f"Y{i + 1}.{'JPG' if i % 3 == 1 else 'jpg'}") for i in range(n_yes)]
        if n_yes >= 2:
            files[-1] = ("yes", "Y1.png")
        for j, (cls_name, name) in enumerate(files):
            h, w = choices[int(rng.integers(len(choices)))]
            gray = _slice(rng, h, w, tumour=cls_name == "yes")
            folder = Path(raw) / cls_name
            folder.mkdir(parents=True, exist_ok=True)
            if name.endswith(".png"):
                Image.fromarray(gray).save(folder / name, format="PNG")
            elif j % 7 == 4:  # a PNG with a .jpg name, RGBA, opaque
                rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
                Image.fromarray(rgba, "RGBA").save(folder / name, format="PNG")
            elif j % 5 == 2:
                Image.fromarray(gray).save(folder / name, format="JPEG", quality=90)
            else:
                tint = (1.0, 0.9, 0.8) if j % 9 == 0 else (1.0, 1.0, 1.0)
                rgb = np.clip(np.dstack([gray * t for t in tint]), 0, 255).astype(np.uint8)
                Image.fromarray(rgb, "RGB").save(folder / name, format="JPEG", quality=90)
        normals = [Path(raw) / "no" / name for c, name in files if c == "no"]
        for k in range(int(duplicates)):
            src = normals[k % len(normals)]
            if k % 2 == 0:
                shutil.copyfile(src, src.parent / f"no {9001 + k}.jpg")
            else:
                with Image.open(src) as im:
                    im.load()
                    im.save(src.parent / f"no {9001 + k}.png", format="PNG")
        return Path(raw)

    # -- planning --------------------------------------------------------------------------
    def listing(self) -> tuple[Path, dict[str, list[Item]], list[tuple[str, str]]]:
        """The raw root, its images by class and the non-image files set aside; reads names only."""
        root = find_root(self.raw)
        ignored: list[tuple[str, str]] = []
        found = scan(root, ignored)
        return root, found, ignored

    def plan(self, found: dict[str, list[Item]], ignored: Sequence[tuple[str, str]], *,
             progress: bool = False) -> Plan:
        """Decode every image once (pixel digests: unreadable images are set aside, or stop the
        command with ``--on-error fail``), group pixel-identical ones, and choose each image's split."""
        skipped = list(ignored)
        items = [it for c in CLASSES for it in found.get(c, [])]

        def digest(it: Item) -> tuple[Item, str | None, str | None]:
            try:
                return it, pixel_digest(it.path), None
            except DataError as exc:
                if self.on_error == "fail":
                    raise
                return it, None, str(exc).replace("\n", " ")

        by_digest: dict[str, list[Item]] = {}
        for it, dig, error in threaded_map(digest, items, self.workers, "check", progress):
            if error is not None:
                skipped.append((it.source, error))
            else:
                by_digest.setdefault(dig, []).append(it)
        units = sorted((sorted(g, key=lambda it: it.source) for g in by_digest.values()), key=lambda g: g[0].source)
        groups = [g for g in units if len(g) > 1]
        counts = Counter(it.cls for g in units for it in g)
        for cls in CLASSES:
            if not counts[cls]:
                raise DataError(f"no readable images in the {cls}/ folder of {self.raw} ({len(found.get(cls, []))} "
                                "image file(s) listed)", hint="pass --raw pointing at the complete set: no/ holds 98 normal and "
                                "yes/ 155 tumour images")
        if dict(counts) != KAGGLE_COUNTS:
            log.info("brainmri: %d normal and %d tumour images (the Kaggle set has %d and %d)", counts["no"],
                     counts["yes"], KAGGLE_COUNTS["no"], KAGGLE_COUNTS["yes"])
        n_train, n_test = split_sizes(counts["no"])

        # a unit is an image and its pixel-identical copies; its normal images are the split decision
        normal_units = [[it for it in g if it.cls == "no"] for g in units]
        conflicts = {i for i, g in enumerate(units) if len({it.cls for it in g}) > 1}
        for i in sorted(conflicts):
            log.warning("brainmri: the same pixels are in no/ and yes/: %s (kept in both; the normal copy goes to "
                        "test where the split allows)", ", ".join(it.source for it in units[i]))
        train, notes = choose_train(normal_units, n_train, self.split_seed, last=conflicts)
        for note in notes:
            log.warning("brainmri: %s", note)
        in_train = {it.source for it in train}
        chosen = [("train" if it.source in in_train else "test", LABELS[it.cls], it) for g in units for it in g]
        patient = {it.source: g[0].path.stem for g in units for it in g}
        if groups:
            log.warning("brainmri: %d extra copies in %d groups of pixel-identical images: kept, as the protocol counts "
                        "them; listed in %s", sum(len(g) - 1 for g in groups), len(groups), DUPLICATES)
        log.info("brainmri: train %d normal; test %d normal + %d tumour", n_train, n_test, counts["yes"])
        return Plan(sorted(chosen, key=lambda x: x[2].source), groups, skipped, patient)

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/BrainMRI/`` (images, manifest.csv, duplicates.csv; skipped.csv for bad inputs)."""
        root, found, ignored = self.listing()
        options = {"format": FORMAT_VERSION, "split_seed": self.split_seed,
                   "size": list(self.size) if self.size else None}
        fingerprint = input_fingerprint(options, [it.path for c in CLASSES for it in found.get(c, [])], root)
        final = Path(out) / self.folder
        kept = verified_bench(final, fingerprint)
        duplicates = read_duplicates(final) if kept is not None else None
        if kept is not None and duplicates is not None:
            log.info("%s is already prepared with these options and inputs; verified and kept", final)
            return BrainMRISummary(**vars(kept), duplicates=duplicates)

        plan = self.plan(found, ignored, progress=progress)
        names = output_names(plan.chosen)
        jobs = [Job(it.source, it.source, _Payload(it.path, s, lab, names[it.source], plan.patient[it.source],
                                                   it.source))
                for s, lab, it in plan.chosen]
        summary = write_bench(out, self.folder, jobs, self._write_one, fingerprint=fingerprint, workers=self.workers,
                              on_error=self.on_error, overwrite=self.overwrite, progress=progress,
                              skipped=plan.skipped)
        text = duplicates_text(plan, names)
        target = summary.folder / DUPLICATES
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            write_text_atomic(target, text)
        return BrainMRISummary(**vars(summary), duplicates=[[it.source for it in g] for g in plan.groups])

    def _write_one(self, p: _Payload) -> list[Output]:
        """Decode one image to 8-bit gray (resized when ``--size``) and return its PNG."""
        pixels = decode_gray(p.path)
        pixels = resize_gray(pixels, self.size)
        return [Output(p.split, p.label, p.name, png_bytes(pixels), None, patient=p.patient, source=p.source)]


def _slice(rng: np.random.Generator, h: int, w: int, tumour: bool) -> np.ndarray:
    """An axial brain-slice-like uint8 [h, w] image: black background, a bright skull ring, gray
    brain with two dark ventricles; a tumour slice has a bright round mass with a dark rim."""
    yy, xx = np.mgrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    ry, rx = rng.uniform(0.8, 0.95), rng.uniform(0.65, 0.85)
    r = (yy / ry) ** 2 + (xx / rx) ** 2
    img = np.where(r < 1, 200.0, 0.0)
    brain = r < 0.8
    img = np.where(brain, 95 + 20 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(5 * yy), img)
    for side in (-1, 1):
        img = np.where(((yy + 0.05) / 0.22) ** 2 + ((xx - side * 0.12) / 0.07) ** 2 < 1, 30.0, img)
    if tumour:
        cy, cx = rng.uniform(-0.45, 0.45), rng.uniform(-0.45, 0.45) * rx
        rad = rng.uniform(0.12, 0.25)
        d = ((yy - cy) ** 2 + (xx - cx) ** 2) / rad ** 2
        img = np.where(d < 1.3, 40.0, img)
        img = np.where(d < 1, 215.0, img)
    img = img + rng.normal(0, 6, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)
