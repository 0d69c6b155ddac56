"""BUSI breast ultrasound (Al-Dhabyani et al.) -> the ``BUSI`` bench, pixel-level, with MediCLIP's protocol:
test 101 normal + 647 lesion images (all 437 benign and 210 malignant), the other 32 normals for training.

``bmad prepare busi --raw RAW --out DATA`` reads ``Dataset_BUSI_with_GT`` as distributed
(``RAW/{normal,benign,malignant}/<class> (<n>).png`` with the lesion masks beside each image,
``<class> (<n>)_mask.png`` and, for images with several lesions, ``<class> (<n>)_mask_1.png``, ...)
and writes ``DATA/BUSI/`` in BMAD's layout with a ``manifest.csv``. docs/datasets/busi.md
states the protocol in full; in short:

* test: every benign and malignant image (Ungood; its mask is the union of its mask files) and
  the 101 normal images with the highest numbers (``normal (33)`` ... ``normal (133)``); for a
  set with other than 133 normal images, 101/133 of them (:func:`split_sizes`);
* train: the other normal images: ``normal (1)`` ... ``normal (32)``, the lowest numbers;
* valid: none. MediCLIP's train and test sets use all 780 images, so a valid split could only
  be taken out of the protocol's counts; the harness runs without one (``val=None``);
* images: 8-bit gray PNG (BUSI stores gray as RGB; Pillow's ITU-R 601-2 luma, alpha dropped),
  masks binary 0/255 PNG of the same name under ``anomaly_mask/``; native size unless
  ``--size H W``. A mask whose size differs from its image's, an unreadable file, or a lesion
  image without a mask is an input error (skipped and listed in skipped.csv, or fatal with
  ``--on-error fail``).

MediCLIP (Zhang et al., MICCAI 2024) gives the sizes but publishes its split only as a renamed
copy of the images (``normal_0.jpg`` ... in train, ``normal_32.jpg`` ... in test) with no map back
to BUSI's names, so which 32 normals train is our rule: BUSI's first 32 by number.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bmad.errors import DataError
from bmad.images import check_pixels
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep.common import (
    Job,
    Output,
    decode_gray,
    input_fingerprint,
    mask_png,
    parse_size,
    png_bytes,
    proportional,
    train_test_normals,
    write_bench,
)

log = logging.getLogger(__name__)

CLASSES = ("normal", "benign", "malignant")
LABELS = {"normal": "good", "benign": "Ungood", "malignant": "Ungood"}
BUSI_COUNTS = {"normal": 133, "benign": 437, "malignant": 210}
"""Images per class folder of Dataset_BUSI_with_GT (780 in all)."""
MEDICLIP_NORMAL = (32, 101)
"""MediCLIP's normal images (train, test) out of BUSI's 133; every lesion image is a test image."""
ROOT_NAME = "Dataset_BUSI_with_GT"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MASK_RE = re.compile(r"^(?P<image>.+)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)
"""``benign (1)_mask`` / ``benign (1)_mask_1`` -> the mask(s) of ``benign (1)``."""
NUMBER_RE = re.compile(r"^(?P<prefix>.*?)\s*\((?P<n>\d+)\)$")
"""``normal (12)`` -> 12: BUSI's image numbers."""
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One raw image: ``source`` relative to the raw root, its class folder, and its mask files
    (``<stem>_mask.png`` first, then ``<stem>_mask_<k>.png`` by k)."""

    path: Path
    source: str
    cls: str
    masks: tuple[Path, ...] = ()


def number_key(stem: str) -> tuple[int, int, str]:
    """Sort key of BUSI's names: ``normal (2)`` before ``normal (10)``; other names after, by name."""
    m = NUMBER_RE.match(stem)
    return (0, int(m["n"]), stem) if m else (1, 0, stem)


def split_sizes(n_normal: int) -> tuple[int, int]:
    """(train, test) normal images for ``n_normal`` normal images.

    MediCLIP's 101 test images from BUSI's 133 up, the rest to train (32 of 133); for fewer,
    101/133 of them to test (largest remainder, at least one each:
    :func:`datasets_prep.common.proportional`). DataError below 2.
    """
    return train_test_normals(n_normal, MEDICLIP_NORMAL, hint=f"check that --raw points at the complete "
                              f"{ROOT_NAME} (its normal/ folder holds 133 images)")


def plan_split(items: Sequence[Item]) -> list[tuple[str, str, Item]]:
    """(split, label, item) for every image: the normal images in BUSI's number order
    (:func:`number_key`), the first ``train`` of :func:`split_sizes` to train and the rest to
    test; every benign and malignant image to test. Sorted by source."""
    normal = sorted((it for it in items if it.cls == "normal"), key=lambda it: number_key(it.path.stem))
    n_train, _ = split_sizes(len(normal))
    plan = [("train" if i < n_train else "test", "good", it) for i, it in enumerate(normal)]
    plan += [("test", "Ungood", it) for it in items if it.cls != "normal"]
    return sorted(plan, key=lambda p: p[2].source)


def output_names(plan: Sequence[tuple[str, str, Item]]) -> dict[str, str]:
    """source -> output file name: the stem with every run of characters other than letters,
    digits, ``.``, ``_``, ``-`` turned into ``_`` and none at the ends (``benign (12).png`` ->
    ``benign_12.png``); names that would clash within a folder (ignoring case) get
    ``_<first 8 hex digits of the source's sha256>``."""
    def base(it: Item) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", it.path.stem).strip("_") or "image"

    names = {it.source: base(it) for _, _, it in plan}
    clash = Counter((s, lab, names[it.source].lower()) for s, lab, it in plan)
    for s, lab, it in plan:
        if clash[(s, lab, names[it.source].lower())] > 1:
            names[it.source] += "_" + hashlib.sha256(it.source.encode()).hexdigest()[:8]
    return {source: f"{name}.png" for source, name in names.items()}


# -- finding the raw files ---------------------------------------------------------------------
def find_root(raw: Path) -> Path:
    """``raw`` if it holds normal/, benign/ and malignant/; DataError saying what to pass otherwise."""
    expected = f"the {ROOT_NAME} folder (it holds normal/, benign/ and malignant/)"
    if not raw.is_dir():
        raise DataError(f"--raw {raw} is not a folder", hint=f"pass {expected}")
    missing = [c for c in CLASSES if not (raw / c).is_dir()]
    if not missing:
        return raw
    below = [p for p in sorted(raw.iterdir()) if p.is_dir() and all((p / c).is_dir() for c in CLASSES)]
    if below:
        hint = f"pass --raw '{below[0]}': {expected}"
    elif raw.name in CLASSES:
        hint = f"pass its parent, --raw '{raw.parent}': {expected}"
    else:
        hint = f"pass {expected}"
    raise DataError(f"{raw} has no {', '.join(m + '/' for m in missing)} folder", hint=hint)


def scan(root: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    """The images of the three class folders with their masks, sorted by source, and the
    files set aside (source, reason): non-image files, and masks whose image is missing.

    A file named ``<stem>_mask.png`` or ``<stem>_mask_<k>.png`` is a mask of ``<stem>.png``
    in the same folder; hidden files and sub-folders are ignored.
    """
    items: list[Item] = []
    ignored: list[tuple[str, str]] = []
    for cls in CLASSES:
        images: dict[str, Path] = {}
        masks: dict[str, list[tuple[int, Path]]] = {}
        for p in sorted((root / cls).iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append((rel, f"not an image ({', '.join(IMAGE_SUFFIXES)}); ignored"))
                continue
            m = MASK_RE.match(p.stem)
            if m:
                masks.setdefault(m["image"], []).append((int(m["k"]) if m["k"] else 0, p))
            else:
                images[p.stem] = p
        for stem, found in masks.items():
            if stem not in images:
                for _, p in found:
                    ignored.append((p.relative_to(root).as_posix(),
                                    f"a mask without its image {stem}.png in {cls}/; ignored"))
        for stem, p in images.items():
            own = tuple(q for _, q in sorted(masks.get(stem, []), key=lambda kq: (kq[0], kq[1].name)))
            items.append(Item(p, p.relative_to(root).as_posix(), cls, own))
    return sorted(items, key=lambda it: it.source), sorted(ignored)


def read_mask(path: Path) -> np.ndarray:
    """A mask file as bool [H, W]: any colour channel > 0 (alpha ignored); DataError naming the file."""
    hint = f"re-extract {path.name} from the BUSI archive, or move it and its image out of --raw"
    try:
        with Image.open(path) as im:
            check_pixels(im, path)
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
                im = im.convert("RGBA").convert("RGB")
            arr = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"cannot decode the mask {path}: {type(exc).__name__}: {exc}", hint=hint) from exc
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2 or 0 in arr.shape:
        raise DataError(f"the mask {path} decodes to an empty or odd array {arr.shape}", hint=hint)
    return arr > 0


# -- the reorganizer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Payload:
    item: Item
    split: str
    label: str
    name: str


@register_reorganizer("busi")
class BUSI(Reorganizer):
    """Dataset_BUSI_with_GT -> the BUSI bench (pixel masks), MediCLIP's protocol."""

    name = "busi"
    bench = "busi"
    folder = "BUSI"
    description = ("BUSI breast ultrasound (normal/benign/malignant + lesion masks) -> BUSI bench, pixel-level, "
                   "MediCLIP's protocol: train 32 normal, test 101 normal + 647 benign/malignant; no valid")
    raw_layout = f"""\
{ROOT_NAME}/   the folder to pass as --raw
  normal/normal (<n>).png        133 images (+ normal (<n>)_mask.png, empty: not read)
  benign/benign (<n>).png        437 images, each with benign (<n>)_mask.png (+ _mask_1.png, ...)
  malignant/malignant (<n>).png  210 images, each with malignant (<n>)_mask.png (+ _mask_1.png, ...)"""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        size: Sequence[int] | None = None,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.size = parse_size(size)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw``, ``--size``."""
        parser.add_argument("--raw", type=Path, required=True,
                            help=f"the {ROOT_NAME} folder: it holds normal/, benign/ and malignant/")
        parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                            help="resize every image (bilinear) and mask (nearest) to H x W; default: native size")

    def plan(self) -> tuple[Path, list[tuple[str, str, Item]], list[tuple[str, str]]]:
        """(root, (split, label, item) per image, inputs set aside with reasons)."""
        root = find_root(self.raw)
        items, ignored = scan(root)
        counts = Counter(it.cls for it in items)
        empty = [c for c in CLASSES if not counts[c]]
        if "normal" in empty or counts["benign"] + counts["malignant"] == 0:
            raise DataError(f"{root} holds {dict(counts) or 'no images'}: the protocol needs normal images and "
                            "benign or malignant ones", hint=f"pass the complete {ROOT_NAME} folder")
        for c in empty:
            log.warning("busi: %s/ holds no images", root / c)
        if counts != Counter(BUSI_COUNTS):
            log.warning("busi: %s holds %s images, not BUSI's %s: MediCLIP's sizes are scaled (docs/datasets/busi.md)",
                        root, dict(counts), BUSI_COUNTS)
        return root, plan_split(items), ignored

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/BUSI/`` (images, masks, manifest.csv; skipped.csv for bad or ignored inputs)."""
        root, plan, ignored = self.plan()
        names = output_names(plan)
        jobs = [Job(it.source, it.source, _Payload(it, split, label, names[it.source])) for split, label, it in plan]
        options = {"format": FORMAT_VERSION, "size": list(self.size) if self.size else None}
        files = [p for _, label, it in plan for p in (it.path, *(it.masks if label == "Ungood" else ()))]
        fingerprint = input_fingerprint(options, files, root)
        return write_bench(Path(out), self.folder, jobs, self._write_one, fingerprint=fingerprint,
                           workers=self.workers, on_error=self.on_error, overwrite=self.overwrite,
                           progress=progress, skipped=ignored)

    def _write_one(self, p: _Payload) -> list[Output]:
        """One image (8-bit gray) and, for a lesion image, the union of its masks."""
        it = p.item
        pixels = decode_gray(it.path)
        mask = None
        if p.label == "Ungood":
            if not it.masks:
                raise DataError(f"{it.source} ({it.cls}) has no mask file {it.path.stem}_mask.png beside it",
                                hint="re-extract the image's mask from the BUSI archive, or move the image out "
                                     "of --raw")
            mask = np.zeros(pixels.shape, bool)
            for mp in it.masks:
                m = read_mask(mp)
                if m.shape != pixels.shape:
                    raise DataError(
                        f"the mask {mp.name} is {m.shape[1]}x{m.shape[0]} but its image {it.source} is "
                        f"{pixels.shape[1]}x{pixels.shape[0]} (WxH)",
                        hint="a mask must have its image's size: fix or remove the pair (--on-error skip "
                             "leaves it out and lists it in skipped.csv)")
                mask |= m
            if not mask.any():
                log.warning("busi: the masks of %s mark no pixel", it.source)
        if self.size is not None and pixels.shape != self.size:
            h, w = self.size
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h),
                                                                                    Image.Resampling.NEAREST)) > 0
        return [Output(p.split, p.label, p.name, png_bytes(pixels), None if mask is None else mask_png(mask),
                       patient=Path(p.name).stem, source=it.source)]

    # -- synthetic raw set -----------------------------------------------------------------------
    @classmethod
    def synthesize(cls, raw: Path, *, n: int = 40, seed: int = 0, size: int = 500, **kwargs: Any) -> Path:
        """Write ``n`` images in BUSI's layout and naming under ``raw`` (the ``Dataset_BUSI_with_GT``
        folder to pass as ``--raw``); return ``raw``.

        Classes in BUSI's proportions 133 : 437 : 210 (at least 2 normal, 1 of each lesion class);
        images are speckled ultrasound-like RGB-saved gray of varied sizes around ``size``
        (BUSI's are about 500 x 500), a lesion is a dark ellipse (hypoechoic) marked in
        ``<name>_mask.png``; every third lesion image gets a second lesion in ``_mask_1.png``.
        Masks alternate 8-bit gray and RGB; normal images get an empty mask, as in BUSI.
        """
        if kwargs:
            raise TypeError(f"unexpected options {sorted(kwargs)}")
        if n < 4:
            raise ValueError(f"n={n}: the synthetic set needs at least 4 images (2 normal, 1 benign, 1 malignant)")
        rng = np.random.default_rng(seed)
        n_normal, n_benign, n_malignant = proportional(list(BUSI_COUNTS.values()), sum(BUSI_COUNTS.values()), n)
        if n_normal < 2:
            n_normal, n_benign = 2, n_benign - 1
        raw = Path(raw)
        k = lesion_images = 0
        for cls_name, count in zip(CLASSES, (n_normal, n_benign, n_malignant)):
            folder = raw / cls_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(1, count + 1):
                h = max(8, int(size * rng.uniform(0.8, 1.2)))
                w = max(8, int(size * rng.uniform(0.9, 1.3)))
                n_lesions = 0 if cls_name == "normal" else 1 + int(lesion_images % 3 == 0)
                lesion_images += cls_name != "normal"
                gray, lesions = _ultrasound(rng, h, w, n_lesions)
                stem = f"{cls_name} ({i})"
                Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB").save(folder / f"{stem}.png")
                if not lesions:
                    lesions = [np.zeros((h, w), bool)]
                for j, lesion in enumerate(lesions):
                    m = lesion.astype(np.uint8) * 255
                    img = Image.fromarray(np.repeat(m[..., None], 3, axis=2), "RGB") if k % 2 else Image.fromarray(m)
                    img.save(folder / (f"{stem}_mask.png" if j == 0 else f"{stem}_mask_{j}.png"))
                k += 1
        return raw


def _ultrasound(rng: np.random.Generator, h: int, w: int, n_lesions: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A B-mode-like uint8 image: bright speckled tissue layers, darker with depth, and
    ``n_lesions`` dark (hypoechoic) ellipses with a bright rim below; their bool masks."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = yy / h
    tissue = 110 + 40 * np.sin(depth * 9 + rng.uniform(0, 3) + 0.6 * np.sin(xx / w * 5)) - 50 * depth
    lesions = []
    for _ in range(n_lesions):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.06, 0.15) * h, rng.uniform(0.08, 0.2) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        tissue = np.where(inside, 25, tissue)
        tissue = np.where((((yy - cy - ry) / (0.3 * ry)) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & ~inside,
                          tissue + 60, tissue)
        lesions.append(inside)
    speckle = rng.gamma(3.0, 1 / 3.0, (h, w)).astype(np.float32)
    img = tissue * speckle + rng.normal(0, 3, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8), lesions
