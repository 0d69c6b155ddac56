"""BraTS2021 -> the ``Brain`` bench: FLAIR axial slices, a patient-level split, binary tumour masks.

``bmad prepare brats2021 --raw RAW --out DATA`` reads one folder per case
(``<id>_flair.nii.gz`` + ``<id>_seg.nii.gz``) and writes ``DATA/Brain/`` in BMAD's
layout with a ``manifest.csv``. docs/datasets.md states the protocol in full; in
short:

* slices: axial slices ``--slices`` (default 60:100, i.e. 60..99) of the volume
  reoriented with ``nibabel.as_closest_canonical``; a slice is normal when its
  segmentation slice is all zero, tumour (Ungood) otherwise;
* split (:func:`split_sizes`, :func:`plan_split`): five patient groups (train,
  valid good, valid Ungood, test good, test Ungood) of BMAD's sizes for 1,251
  cases, proportional otherwise; the patients with the most normal slices in
  range are the normal-patient groups; seeded by ``--split-seed``;
* images: 8-bit grayscale PNG, robust per-volume normalisation inside the brain;
  masks: 0/255 PNG, any label > 0.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bmad.errors import DataError, UsageError
from bmad.reorganizer import Reorganizer, Summary, register_reorganizer
from datasets_prep import synthetic
from datasets_prep.common import (
    Job,
    Output,
    check_nifti_size,
    input_fingerprint,
    mask_png,
    png_bytes,
    share_quota,
    spread,
    threaded_map,
    verified_bench,
    write_bench,
)

log = logging.getLogger(__name__)

PROTOCOL_SLICES = (60, 100)
"""BMAD's axial range 60..99 (half-open); the tumour slice offsets below are relative to its start."""

PERCENTILES = (0.5, 99.5)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Group:
    """One of the five patient groups of BMAD's BraTS split, with its sizes for 1,251 cases.

    ``offsets``: for Ungood groups, the protocol slices (offsets from the range start)
    taken from each patient; ``None`` for good groups (quota shared over the patients).
    """

    split: str
    label: str
    bmad_patients: int
    bmad_slices: int
    offsets: tuple[int, ...] | None = None


GROUPS: tuple[Group, ...] = (
    Group("train", "good", 424, 7500),
    Group("valid", "good", 39, 39),
    Group("valid", "Ungood", 11, 44, (0, 10, 20, 30)),
    Group("test", "good", 162, 640),
    Group("test", "Ungood", 615, 3075, (0, 8, 16, 24, 32)),
)
BMAD_CASES = sum(g.bmad_patients for g in GROUPS)  # 1,251


@dataclass(frozen=True)
class GroupSize:
    """Patients and slice quota of one group for a given number of cases."""

    split: str
    label: str
    patients: int
    slices: int


def _round_div(num: int, den: int) -> int:
    """``num / den`` rounded half up, in integers."""
    return (2 * num + den) // (2 * den)


def split_sizes(n_cases: int) -> tuple[GroupSize, ...]:
    """Patient counts and slice quotas of the five groups (order of :data:`GROUPS`) for ``n_cases``.

    Patients: BMAD's group sizes scaled by ``n_cases / 1251`` and rounded by the
    largest-remainder method (ties to the earlier group), then every empty group takes
    one patient from the largest group (the earlier one on ties). Slices: BMAD's slices
    per patient of the group times its patients, rounded half up (train 7500/424,
    valid good 1, valid Ungood 4, test good 640/162, test Ungood 5). For 1,251 cases
    this is exactly BMAD's 424/39/11/162/615 patients and 7,500 / 83 / 3,715 slices.
    """
    if n_cases < len(GROUPS):
        raise ValueError(f"the split needs at least {len(GROUPS)} cases (one per group), got {n_cases}")
    exact = [g.bmad_patients * n_cases for g in GROUPS]
    counts = [e // BMAD_CASES for e in exact]
    by_remainder = sorted(range(len(GROUPS)), key=lambda i: (-(exact[i] % BMAD_CASES), i))
    for i in by_remainder[: n_cases - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda k: (counts[k], -k))
            counts[donor] -= 1
            counts[i] += 1
    return tuple(
        GroupSize(g.split, g.label, c, _round_div(g.bmad_slices * c, g.bmad_patients))
        for g, c in zip(GROUPS, counts, strict=True)
    )


def split_totals(sizes: Iterable[GroupSize]) -> dict[str, int]:
    """Slice quotas summed per split: ``{"train": .., "valid": .., "test": ..}``."""
    totals = {"train": 0, "valid": 0, "test": 0}
    for s in sizes:
        totals[s.split] += s.slices
    return totals


@dataclass(frozen=True)
class SliceChoice:
    """One output image: the slice of a case and where it goes."""

    case: int
    slice: int
    split: str
    label: str


@dataclass
class SplitPlan:
    """The chosen slices, and what the plan had to adapt (reported, not fatal)."""

    choices: list[SliceChoice]
    moved: int = 0
    """Ungood protocol slices without tumour, replaced by the nearest tumour slice."""
    shortfalls: list[str] = field(default_factory=list)


def _nearest_tumour(tumour: Sequence[int], targets: Sequence[int]) -> tuple[list[int], int]:
    """For each target in order, the nearest not yet chosen tumour slice (lower on ties).

    Returns the chosen slices (fewer than targets when too few tumour slices) and how
    many differ from their target.
    """
    free = list(tumour)
    chosen, moved = [], 0
    for t in targets:
        if not free:
            break
        best = min(free, key=lambda s: (abs(s - t), s))
        free.remove(best)
        chosen.append(best)
        moved += best != t
    return chosen, moved


def plan_split(tumour: Sequence[np.ndarray], start: int, seed: int) -> SplitPlan:
    """BMAD-style patient-level split of cases given their per-slice tumour flags.

    ``tumour[i]``: bool array over the slice range (slice ``start + j``), True where
    case ``i``'s segmentation slice has a label > 0. Cases are in sorted id order.

    1. Rank the cases by their number of normal slices in range, most first; ties in
       the order of ``numpy.random.default_rng(seed).permutation(n)``. The first
       (train + valid good + test good) patients are the normal-patients, the rest the
       tumour patients.
    2. Each of the two lists, in sorted id order, is shuffled with the next
       ``rng.permutation``; normal-patients fill train, valid good, test good in that
       order, tumour patients valid Ungood then test Ungood.
    3. Good groups share their slice quota over their patients (:func:`~datasets_prep.common.share_quota`, in
       group order) and each patient gives evenly spaced normal slices (:func:`~datasets_prep.common.spread`).
    4. Ungood patients give one slice per protocol offset, scaled to the range length
       (``start + floor(offset * length / 40 + 0.5)``), replaced by the nearest unused
       tumour slice in range when it has no tumour (lower slice on ties).
    """
    n = len(tumour)
    sizes = split_sizes(n)
    length = len(tumour[0])
    normal_slices = [[start + int(j) for j in np.flatnonzero(~t)] for t in tumour]
    tumour_slices = [[start + int(j) for j in np.flatnonzero(t)] for t in tumour]
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(n)
    ranked = sorted(range(n), key=lambda i: (-len(normal_slices[i]), tiebreak[i]))
    n_normal = sum(s.patients for s in sizes if s.label == "good")
    pools = {}
    for label, members in (("good", ranked[:n_normal]), ("Ungood", ranked[n_normal:])):
        members = sorted(members)
        pools[label] = [members[i] for i in rng.permutation(len(members))]

    plan = SplitPlan([])
    for group, size in zip(GROUPS, sizes, strict=True):
        pool = pools[size.label]
        patients, pools[size.label] = pool[: size.patients], pool[size.patients :]
        if group.offsets is None:
            takes = share_quota(size.slices, [len(normal_slices[p]) for p in patients])
            picks = {p: spread(normal_slices[p], k) for p, k in zip(patients, takes, strict=True)}
        else:
            targets = [start + int(np.floor(o * length / (PROTOCOL_SLICES[1] - PROTOCOL_SLICES[0]) + 0.5))
                       for o in group.offsets]
            picks = {}
            for p in patients:
                picks[p], moved = _nearest_tumour(tumour_slices[p], targets)
                plan.moved += moved
        got = 0
        for p in patients:
            plan.choices += [SliceChoice(p, s, size.split, size.label) for s in picks[p]]
            got += len(picks[p])
        if got < size.slices:
            plan.shortfalls.append(
                f"{size.split}/{size.label}: {got} of {size.slices} slices "
                f"(its {size.patients} patient(s) hold too few {'normal' if size.label == 'good' else 'tumour'} "
                f"slices in range)"
            )
    return plan


def plan_test_only(tumour: Sequence[np.ndarray], start: int) -> SplitPlan:
    """Every slice in range of every case to test/: good when its segmentation is empty."""
    return SplitPlan([
        SliceChoice(i, start + j, "test", "Ungood" if flag else "good")
        for i, flags in enumerate(tumour)
        for j, flag in enumerate(flags)
    ])


SLICES_HINT = "e.g. --slices 60:100 for slices 60..99"


def parse_slices(spec: str | Sequence[int]) -> tuple[int, int]:
    """``"60:100"`` (or ``(60, 100)``) -> ``(60, 100)``: the half-open axial range."""
    try:
        start, stop = (int(v) for v in (spec.split(":") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise UsageError(f"--slices {spec!r} is not START:STOP", hint=SLICES_HINT) from None
    if not 0 <= start < stop:
        raise UsageError(f"--slices {spec!r}: need 0 <= START < STOP", hint=SLICES_HINT)
    return start, stop


@dataclass(frozen=True)
class Case:
    """The files of one case folder."""

    case_id: str
    flair: Path
    seg: Path
    brainmask: Path | None


def _read_hint(path: Path) -> str:
    return f"re-extract or re-download {path.name}, or move the folder {path.parent.name} out of --raw"


def _load(path: Path) -> np.ndarray:
    """A 3-D NIfTI volume reoriented to RAS+ (``as_closest_canonical``); DataError when unreadable."""
    try:
        img = nib.load(path)
        if len(img.shape) < 3 or any(d != 1 for d in img.shape[3:]):
            raise DataError(f"{path} is not a 3-D volume (shape {img.shape})", hint=_read_hint(path))
        if min(img.shape[:3]) < 1:  # a dimension of 0, or negative in a corrupt header
            raise DataError(f"{path} is empty (shape {img.shape})", hint=_read_hint(path))
        check_nifti_size(img, path, _read_hint(path))
        img = nib.as_closest_canonical(nib.funcs.squeeze_image(img))
        return np.asanyarray(img.dataobj)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip/zlib raise many kinds; all mean a bad file
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}", hint=_read_hint(path)) from exc


def _canonical_shape(path: Path) -> tuple[int, ...]:
    """The shape :func:`_load` will return, from the header only."""
    try:
        img = nib.load(path)
        ornt = nib.io_orientation(img.affine)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}", hint=_read_hint(path)) from exc
    if np.isnan(ornt).any():
        raise DataError(f"{path} has a degenerate affine (no orientation)", hint=_read_hint(path))
    shape = [0, 0, 0]
    for axis in range(min(3, len(img.shape))):
        shape[int(ornt[axis, 0])] = img.shape[axis]
    return tuple(shape)


def _brain(flair: np.ndarray, brainmask: np.ndarray | None) -> np.ndarray:
    """The brain: the brain mask (> 0) if given, else nonzero voxels, or voxels above the
    minimum (the background) when the volume has negative values (z-scored input)."""
    finite = np.isfinite(flair)
    if brainmask is not None:
        return (brainmask > 0) & finite
    low = flair[finite].min() if finite.any() else 0
    return (flair > low) & finite if low < 0 else (flair != 0) & finite


def _to_view(plane: np.ndarray) -> np.ndarray:
    """A RAS+ axial plane [x, y] -> image rows/cols in the radiological view:
    anterior at the top, the patient's right on the image's left."""
    return plane.T[::-1, ::-1]


@register_reorganizer("brats2021")
class BraTS2021(Reorganizer):
    """BraTS2021 FLAIR volumes -> BMAD's Brain bench (train / valid / test slices + masks)."""

    name = "brats2021"
    bench = "brats2021"
    folder = "Brain"
    description = "BraTS2021 FLAIR axial slices 60..99 -> Brain bench (patient-level BMAD split, binary tumour masks)"
    raw_layout = """\
RAW/                                  (--raw: BraTS2021_Training_Data, 1,251 case folders)
  BraTS2021_00000/
    BraTS2021_00000_flair.nii.gz      (--flair-pattern)
    BraTS2021_00000_seg.nii.gz        (--seg-pattern; labels 0, 1, 2, 4)
    BraTS2021_00000_{t1,t1ce,t2}.nii.gz  (ignored)
  BraTS2021_00002/ ..."""

    def __init__(
        self,
        raw: str | os.PathLike,
        *,
        flair_pattern: str = "*_flair.nii.gz",
        seg_pattern: str = "*_seg.nii.gz",
        brainmask_pattern: str | None = None,
        slices: str | Sequence[int] = "60:100",
        split_seed: int = 0,
        test_only: bool = False,
        workers: int = 1,
        on_error: str = "skip",
        overwrite: bool = False,
    ) -> None:
        self.raw = Path(raw)
        self.flair_pattern = flair_pattern
        self.seg_pattern = seg_pattern
        self.brainmask_pattern = brainmask_pattern
        self.slices = parse_slices(slices)
        self.split_seed = int(split_seed)
        self.test_only = bool(test_only)
        self.set_run_options(workers, on_error, overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--raw`` plus the BraTS options."""
        parser.add_argument("--raw", type=Path, required=True,
                            help="folder with one sub-folder per case (BraTS2021_Training_Data)")
        parser.add_argument("--flair-pattern", default="*_flair.nii.gz",
                            help="glob of the FLAIR file inside a case folder (default *_flair.nii.gz)")
        parser.add_argument("--seg-pattern", default="*_seg.nii.gz",
                            help="glob of the segmentation inside a case folder (default *_seg.nii.gz)")
        parser.add_argument("--brainmask-pattern", default=None,
                            help="glob of a brain mask inside a case folder (default: brain = nonzero FLAIR)")
        parser.add_argument("--slices", default="60:100",
                            help="axial slice range START:STOP, STOP excluded (default 60:100, BMAD's 60..99)")
        parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient split (default 0)")
        parser.add_argument("--test-only", action="store_true",
                            help="no split: every slice in range of every case to test/ (for fewer than 5 cases, "
                                 "or data for evaluation only)")

    @classmethod
    def synthesize(cls, raw: Path, *, n: int = synthetic.DEMO_CASES, seed: int = 0,
                   shape: tuple[int, int, int] = synthetic.DEMO_SHAPE) -> Path:
        """Write a synthetic BraTS-like raw set (:func:`datasets_prep.synthetic.write_raw`).

        The defaults make the demo set; prepare it with :meth:`synthetic_options`.
        """
        return synthetic.write_raw(Path(raw), n_cases=n, seed=seed, shape=shape)

    @classmethod
    def synthetic_options(cls, raw: Path) -> dict[str, Any]:
        """``raw`` and the slice range that fits the synthetic volumes' depth (read from a header)."""
        segs = sorted(Path(raw).glob("*/*_seg.nii.gz"))
        if not segs:
            raise DataError(f"no synthetic cases in {raw}", hint="write them with BraTS2021.synthesize first")
        return {"raw": Path(raw), "slices": synthetic.slice_range(nib.load(segs[0]).shape[2])}

    # -- finding the cases ---------------------------------------------------------
    def find_cases(self, skipped: list[tuple[str, str]] | None = None) -> list[Case]:
        """The case folders under ``raw``, sorted by name, with their files.

        A case folder is a sub-folder (not hidden) that holds a NIfTI file; other
        files and folders are ignored. A folder whose files do not match the patterns
        is set aside in ``skipped`` (``on_error="skip"``) or raises (``"fail"``).
        """
        if not self.raw.is_dir():
            raise DataError(f"raw folder {self.raw} does not exist",
                            hint="pass --raw pointing at the folder with one sub-folder per case")
        cases = []
        for folder in sorted(p for p in self.raw.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
            if not any(f.name.endswith(NIFTI_SUFFIXES) for f in folder.iterdir() if f.is_file()):
                continue
            try:
                cases.append(Case(
                    folder.name,
                    self._match(folder, self.flair_pattern, "--flair-pattern"),
                    self._match(folder, self.seg_pattern, "--seg-pattern"),
                    self._match(folder, self.brainmask_pattern, "--brainmask-pattern")
                    if self.brainmask_pattern else None,
                ))
            except DataError as exc:
                self._skip_or_raise(exc, folder, skipped)
        if not cases:
            raise DataError(f"no usable case folders with NIfTI files in {self.raw}" + _first_reason(skipped),
                            hint="pass --raw pointing at the folder with one sub-folder per case")
        return cases

    def _skip_or_raise(self, exc: DataError, path: Path, skipped: list[tuple[str, str]] | None) -> None:
        if self.on_error == "fail" or skipped is None:
            raise exc
        skipped.append((path.relative_to(self.raw).as_posix(), str(exc).replace("\n", " ")))

    @staticmethod
    def _match(folder: Path, pattern: str, option: str) -> Path:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if not found:
            raise DataError(f"no file matching {pattern!r} in case folder {folder}",
                            hint=f"add the file, move the folder out of --raw, or set {option}")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{len(found)} files match {pattern!r} in case folder {folder}: {names}",
                            hint=f"make {option} match exactly one file per case")
        return found[0]

    # -- the two passes ------------------------------------------------------------
    def _scan(self, case: Case) -> np.ndarray | DataError:
        """Check the case's shapes and return its per-slice tumour flags over the range
        (or the DataError that makes the case unusable)."""
        try:
            seg = _load(case.seg)
            for path in (p for p in (case.flair, case.brainmask) if p is not None):
                shape = _canonical_shape(path)
                if shape != seg.shape:
                    raise DataError(
                        f"{path} has shape {shape} but {case.seg.name} has {seg.shape} (after reorienting)",
                        hint=f"give case {case.case_id} a FLAIR, segmentation and brain mask on the same grid, "
                             "or move it out of --raw",
                    )
            start, stop = self.slices
            if stop > seg.shape[2]:
                raise DataError(f"{case.seg} has {seg.shape[2]} axial slices; --slices {start}:{stop} needs {stop}",
                                hint="choose a --slices range inside the volumes")
            return (seg[:, :, start:stop] > 0).any(axis=(0, 1))
        except DataError as exc:
            return exc

    def _write_case(self, payload: tuple[Case, list[SliceChoice]]) -> list[Output]:
        """Normalise one case and encode its chosen slices (and masks)."""
        case, choices = payload
        flair = _load(case.flair).astype(np.float32)
        seg = _load(case.seg) > 0
        brainmask = _load(case.brainmask) if case.brainmask is not None else None
        for path, arr in ((case.seg, seg), (case.brainmask, brainmask)):
            if arr is not None and arr.shape != flair.shape:
                raise DataError(f"{path} has shape {arr.shape} but {case.flair.name} has {flair.shape}",
                                hint=f"give case {case.case_id} volumes on the same grid, or move it out of --raw")
        brain = _brain(flair, brainmask)
        if not brain.any():
            raise DataError(f"{case.flair} has no brain voxels (all background)", hint=_read_hint(case.flair))
        lo, hi = (float(v) for v in np.percentile(flair[brain], PERCENTILES))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        source = case.flair.relative_to(self.raw).as_posix()
        outputs = []
        for c in choices:
            has_tumour = bool(seg[:, :, c.slice].any())
            if has_tumour != (c.label == "Ungood"):
                raise DataError(f"{case.seg} changed while it was being prepared", hint="run the command again")
            plane = np.clip((flair[:, :, c.slice].astype(np.float64) - lo) * scale, 0.0, 255.0)
            pixels = np.where(brain[:, :, c.slice], np.floor(plane + 0.5), 0).astype(np.uint8)
            mask = mask_png(_to_view(seg[:, :, c.slice])) if c.label == "Ungood" else None
            outputs.append(Output(c.split, c.label, f"{case.case_id}_{c.slice:03d}.png", png_bytes(_to_view(pixels)),
                                  mask, patient=case.case_id, source=source, slice=str(c.slice)))
        return outputs

    def plan(self, cases: Sequence[Case], *, progress: bool = False,
             skipped: list[tuple[str, str]] | None = None) -> tuple[SplitPlan, list[Case]]:
        """Scan the cases' segmentations and choose the slices (no files written).

        Returns the plan and the usable cases it indexes (unreadable ones are set aside
        in ``skipped``, or raise with ``on_error="fail"``).
        """
        flags, usable = [], []
        for case, scanned in zip(cases, threaded_map(self._scan, cases, self.workers, "scan", progress, "case"),
                                 strict=True):
            if isinstance(scanned, DataError):
                self._skip_or_raise(scanned, case.seg.parent, skipped)
            else:
                flags.append(scanned)
                usable.append(case)
        if not self.test_only and len(usable) < len(GROUPS):
            raise DataError(
                f"{self.raw} has {len(usable)} usable case(s); BMAD's split needs at least {len(GROUPS)} "
                "(one patient each for train, valid good/Ungood, test good/Ungood)" + _first_reason(skipped),
                hint="add cases, or pass --test-only to write every slice of these cases to test/",
            )
        start = self.slices[0]
        plan = plan_test_only(flags, start) if self.test_only else plan_split(flags, start, self.split_seed)
        if not self.test_only:
            sizes = split_sizes(len(usable))
            for size in sizes:
                if not any(c.split == size.split and c.label == size.label for c in plan.choices):
                    kind = "normal (all-zero segmentation)" if size.label == "good" else "tumour"
                    raise DataError(
                        f"{size.split}/{size.label} would be empty: its {size.patients} patient(s) have no {kind} "
                        f"slices in --slices {start}:{self.slices[1]} (raw {self.raw})",
                        hint="widen --slices, add cases, or pass --test-only",
                    )
        for msg in plan.shortfalls:
            log.warning("brats2021: %s", msg)
        return plan, usable

    def prepare(self, out: str | os.PathLike, *, progress: bool = True) -> Summary:
        """Write ``out/Brain/`` (images, masks, manifest.csv) through :func:`write_bench`.

        A re-run with the same options and inputs verifies and keeps the bench; a
        different existing ``Brain/`` is refused unless ``overwrite``.
        """
        out = Path(out)
        skipped: list[tuple[str, str]] = []
        cases = self.find_cases(skipped)
        options = {"dataset": self.name, "flair_pattern": self.flair_pattern, "seg_pattern": self.seg_pattern,
                   "brainmask_pattern": self.brainmask_pattern, "slices": self.slices,
                   "split_seed": self.split_seed, "test_only": self.test_only}
        files = [p for c in cases for p in (c.flair, c.seg, c.brainmask) if p is not None]
        fp = input_fingerprint(options, files, self.raw)
        kept = verified_bench(out / self.folder, fp)
        if kept is not None:
            return kept
        plan, cases = self.plan(cases, progress=progress, skipped=skipped)
        by_case: dict[int, list[SliceChoice]] = {}
        for c in sorted(plan.choices, key=lambda c: (c.case, c.slice)):
            by_case.setdefault(c.case, []).append(c)
        jobs = [Job(cases[i].case_id, cases[i].flair.relative_to(self.raw).as_posix(), (cases[i], by_case[i]))
                for i in sorted(by_case)]
        summary = write_bench(out, self.folder, jobs, self._write_case, fingerprint=fp, workers=self.workers,
                              on_error=self.on_error, overwrite=self.overwrite, progress=progress, skipped=skipped)
        log.info("brats2021: %d Ungood slices moved to the nearest tumour slice", plan.moved)
        return summary


def _first_reason(skipped: list[tuple[str, str]] | None) -> str:
    if not skipped:
        return ""
    return f"; {len(skipped)} set aside, e.g. {skipped[0][0]}: {skipped[0][1]}"
