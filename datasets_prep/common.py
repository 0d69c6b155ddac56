"""Shared machinery of the reorganizers: resumable, atomic bench writing.

A reorganizer plans its split (which source goes to which split/label), then hands
:func:`write_bench` a list of :class:`Job` s — one per source unit (a volume, a DICOM,
a slide, a B-scan) — and a function that turns a job's payload into its output files.
The writer:

* builds the bench in a staging folder ``<out>/.<folder>.partial/`` and renames it to
  ``<out>/<folder>`` only when every job is done (a reader never sees a half bench);
* writes every file atomically and appends each finished job to a journal, so a
  killed run resumes where it stopped and re-verifies (sha256) what it keeps;
* keeps an existing, verified bench prepared with the same options and inputs
  (idempotent re-runs), and refuses to replace a different one without ``--overwrite``;
* applies the ``--on-error`` policy: ``skip`` records a bad input (file + reason) in
  ``skipped.csv`` beside ``manifest.csv`` and goes on; ``fail`` stops at once;
* runs jobs on ``--workers`` threads with a progress bar, holding one job's data per worker.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from bmad.errors import DataError, UsageError
from bmad.fsutil import DISK_FULL, disk_full_error, sha256_file, write_bytes_atomic, write_text_atomic
from bmad.images import check_pixels
from bmad.reorganizer import MANIFEST_COLUMNS, Reorganizer, Summary

log = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 6
ON_ERROR = Reorganizer.ON_ERROR
JOURNAL = "journal.jsonl"
STATE = "prepare.json"
SKIPPED = "skipped.csv"
SPLITS = ("train", "valid", "test")
LABELS = ("good", "Ungood")


def png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes of a uint8 [H, W] (gray) or [H, W, 3] (RGB) array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """A binary mask (> 0) as 0/255 PNG bytes."""
    return png_bytes((np.asarray(mask) > 0).astype(np.uint8) * 255)


@dataclass(frozen=True)
class Output:
    """One image (and its mask, for Ungood images of pixel-level benches) of a job.

    ``name``: file name (``.png``); the writer places it at
    ``<split>/<label>/img/<name>`` and the mask at ``<split>/<label>/anomaly_mask/<name>``.
    """

    split: str
    label: str
    name: str
    image: bytes
    mask: bytes | None = None
    patient: str = ""
    source: str = ""
    slice: str = ""

    def __post_init__(self) -> None:
        """Refuse an output that would land outside its folder: names often come from raw
        file names or CSV fields, which are not trusted."""
        if self.split not in SPLITS or self.label not in LABELS:
            raise DataError(f"{self.source or self.name}: split/label {self.split!r}/{self.label!r} is not one of "
                            f"{'|'.join(SPLITS)} / {'|'.join(LABELS)}")
        if not self.name or self.name.startswith(".") or any(c in self.name for c in "/\\\0"):
            raise DataError(f"{self.source or self.name}: output name {self.name!r} is not a plain file name "
                            "(it must not hold a path separator or start with '.')",
                            hint="rename the input file or fix the list that names it")

    def paths(self) -> tuple[str, str]:
        img = f"{self.split}/{self.label}/img/{self.name}"
        return img, (f"{self.split}/{self.label}/anomaly_mask/{self.name}" if self.mask is not None else "")


@dataclass(frozen=True)
class Job:
    """One unit of work: ``key`` is unique and stable across runs (e.g. the source's relative
    path); ``source`` is the file reported on error; ``payload`` goes to the job function."""

    key: str
    source: str
    payload: Any = None


def input_fingerprint(options: dict[str, Any], files: Sequence[Path], root: Path) -> str:
    """sha256 of the options and the input listing (relative path, size, mtime) of ``files``."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def threaded_map(
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str, progress: bool, unit: str = "file"
) -> Iterator[Any]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``2 * workers`` in flight."""
    workers = max(1, int(workers))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(items), desc=desc, unit=unit, disable=not progress
    ) as bar:
        pending: dict[int, Future] = {}
        nxt = 0
        for i in range(len(items)):
            while nxt < len(items) and len(pending) < 2 * workers:
                pending[nxt] = pool.submit(fn, items[nxt])
                nxt += 1
            try:
                result = pending.pop(i).result()
            except BaseException:
                for fut in pending.values():
                    fut.cancel()
                raise
            bar.update(1)
            yield result


def write_bench(
    out: Path,
    folder: str,
    jobs: Sequence[Job],
    fn: Callable[[Any], list[Output]],
    *,
    fingerprint: str,
    workers: int = 1,
    on_error: str = "skip",
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "write",
    skipped: Sequence[tuple[str, str]] = (),
) -> Summary:
    """Run ``fn`` on every job and write its outputs into ``out/folder`` (see module docs).

    ``skipped``: inputs the reorganizer already set aside while planning (source, reason);
    they are reported with those the jobs skip.
    """
    if on_error not in ON_ERROR:
        raise UsageError(f"--on-error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("job keys must be unique")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / folder
    if final.exists():
        kept = verified_bench(final, fingerprint)
        if kept is not None:
            log.info("%s is already prepared with these options and inputs; verified and kept", final)
            return kept
        if not overwrite:
            raise UsageError(f"{final} already exists and differs from what these options and inputs produce",
                             hint="pass --overwrite to replace it, or choose another --out")
    stage = _Stage(out / f".{folder}.partial", fingerprint)
    summary = Summary(final, skipped=list(skipped))
    rows: list[dict[str, str]] = []
    todo = []
    for job in jobs:
        done = stage.verified(job.key)
        if done is None:
            todo.append(job)
        else:
            rows += done["rows"]
            summary.skipped += [tuple(s) for s in done.get("skipped", [])]
            summary.reused += 1

    def run(job: Job) -> tuple[Job, list[Output] | None, str | None]:
        try:
            return job, fn(job.payload), None
        except DataError as exc:
            if on_error == "fail":
                raise
            return job, None, str(exc).replace("\n", " ")

    for job, outputs, error in threaded_map(run, todo, workers, desc, progress):
        if error is not None:
            stage.record(job.key, [], [(job.source, error)], {})
            summary.skipped.append((job.source, error))
            continue
        files: dict[str, str] = {}
        new_rows = [stage.write(o, files) for o in outputs]
        stage.record(job.key, new_rows, [], files)
        rows += new_rows
    rows.sort(key=lambda r: r["path"])
    if not rows:
        raise DataError(f"nothing to write into {final}: every input was skipped",
                        hint="see the reasons above; fix the inputs or --raw")
    for r in rows:
        summary.counts[(r["split"], r["label"])] = summary.counts.get((r["split"], r["label"]), 0) + 1
    stage.finish(rows, summary.skipped)
    _commit(stage.path, final)
    return summary


class _Stage:
    """The staging folder: files written atomically, a journal line per finished job."""

    def __init__(self, path: Path, fp: str) -> None:
        self.path = path
        state = path / STATE
        if path.exists():
            try:
                same = json.loads(state.read_text())["fingerprint"] == fp
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                same = False
            if not same:
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        if not state.exists():
            write_text_atomic(state, json.dumps({"fingerprint": fp}) + "\n")
        self.journal: dict[str, dict[str, Any]] = {}
        jpath = path / JOURNAL
        if jpath.exists():
            text = jpath.read_bytes()
            if not text.endswith(b"\n"):  # a torn last line (killed mid-write, disk full): cut it off, or the
                with open(jpath, "r+b") as fh:  # next line would be appended to it and lost with it
                    fh.truncate(text.rfind(b"\n") + 1)
            for line in text.decode("utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, RecursionError):  # the torn line is ignored
                    entry = json.loads(line)
                    if _journal_entry(entry):  # anything else is not a line record() wrote: the job is redone
                        self.journal[entry["key"]] = entry
        for tmp in path.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        self._journal = open(jpath, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    def verified(self, key: str) -> dict[str, Any] | None:
        """The journal entry of ``key`` if every file it wrote is present with its sha256."""
        entry = self.journal.get(key)
        if entry is None:
            return None
        for rel, digest in entry.get("files", {}).items():
            p = self.path / rel
            if not p.is_file() or sha256_file(p) != digest:
                return None
        return entry

    def write(self, o: Output, files: dict[str, str]) -> dict[str, str]:
        """Write one output's image (and mask); add their sha256 to ``files``; return its manifest row."""
        img, mask = o.paths()
        # not fsynced one by one (a third of the time on small files): the journal entry
        # carries each file's sha256, a resume re-verifies, and finish() syncs once
        write_bytes_atomic(self.path / img, o.image, durable=False)
        files[img] = hashlib.sha256(o.image).hexdigest()
        if o.mask is not None:
            write_bytes_atomic(self.path / mask, o.mask, durable=False)
            files[mask] = hashlib.sha256(o.mask).hexdigest()
        return {"path": img, "split": o.split, "label": o.label, "mask": mask, "patient": o.patient,
                "source": o.source, "slice": o.slice, "sha256": files[img]}

    def record(self, key: str, rows: list[dict[str, str]], skipped: list[tuple[str, str]],
               files: dict[str, str]) -> None:
        """Journal a finished job (one fsynced line, with the sha256 of its content): a resume
        keeps it if it verifies, and its files too."""
        entry = {"key": key, "rows": rows, "skipped": skipped, "files": files}
        entry["sha256"] = hashlib.sha256(json.dumps(entry).encode()).hexdigest()
        try:
            self._journal.write(json.dumps(entry) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise disk_full_error(self.path / JOURNAL, exc) from exc
            raise

    def finish(self, rows: list[dict[str, str]], skipped: list[tuple[str, str]]) -> None:
        self._journal.close()
        listed = {r["path"] for r in rows} | {r["mask"] for r in rows if r["mask"]} | {STATE, JOURNAL}
        for p in [p for p in self.path.rglob("*") if p.is_file()]:
            if p.relative_to(self.path).as_posix() not in listed:
                p.unlink()  # written by an earlier attempt at a job that a resume then skipped
        os.sync()  # every staged file on disk before the manifest makes the bench final
        write_text_atomic(self.path / "manifest.csv", manifest_text(rows))
        buf = io.StringIO()
        if skipped:
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["source", "reason"])
            w.writerows(sorted(skipped))
            write_text_atomic(self.path / SKIPPED, buf.getvalue())
        (self.path / JOURNAL).unlink()
        state = json.loads((self.path / STATE).read_text())
        state["manifest_sha256"] = hashlib.sha256(manifest_text(rows).encode()).hexdigest()
        state["skipped_sha256"] = hashlib.sha256(buf.getvalue().encode()).hexdigest()
        write_text_atomic(self.path / STATE, json.dumps(state, sort_keys=True) + "\n")


def _journal_entry(entry: Any) -> bool:
    """True for a journal entry as :meth:`_Stage.record` writes it: its content's sha256; a key;
    manifest rows (of MANIFEST_COLUMNS, known split and label) whose image and mask are exactly
    the entry's files; files at relative paths inside the bench, with their sha256; skipped
    (source, reason) pairs."""
    if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("rows"), list)
            and isinstance(entry.get("skipped"), list) and isinstance(entry.get("files"), dict)):
        return False
    content = {k: v for k, v in entry.items() if k != "sha256"}
    if hashlib.sha256(json.dumps(content).encode()).hexdigest() != entry.get("sha256"):
        return False
    files = entry["files"]
    if not all(_inside(rel) and isinstance(digest, str) for rel, digest in files.items()):
        return False
    if not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, str) for v in s) for s in entry["skipped"]):
        return False
    if not all(isinstance(r, dict) and set(r) == set(MANIFEST_COLUMNS) and all(isinstance(v, str) for v in r.values())
               and r["split"] in SPLITS and r["label"] in LABELS and files.get(r["path"]) == r["sha256"]
               for r in entry["rows"]):
        return False
    written = [r["path"] for r in entry["rows"]] + [r["mask"] for r in entry["rows"] if r["mask"]]
    return sorted(written) == sorted(files)


def manifest_text(rows: Sequence[dict[str, str]]) -> str:
    """``manifest.csv`` text for ``rows`` (columns :data:`bmad.reorganizer.MANIFEST_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def verified_bench(final: Path, fp: str) -> Summary | None:
    """A Summary for ``final`` if it was prepared with fingerprint ``fp`` and every file verifies.

    Reorganizers call it before a costly planning pass so that a re-run on the same
    inputs returns at once; :func:`write_bench` calls it too. Whatever does not read or
    verify (the state, the manifest, a row, skipped.csv) makes the bench untrusted: None.
    """
    try:
        state = json.loads((final / STATE).read_text())
        manifest = (final / "manifest.csv").read_text(encoding="utf-8")
        skipped = (final / SKIPPED).read_text(encoding="utf-8") if (final / SKIPPED).exists() else ""
        reader = csv.DictReader(io.StringIO(manifest))
        rows = list(reader)
        skipped_rows = list(csv.DictReader(io.StringIO(skipped)))
    except (OSError, ValueError, RecursionError, csv.Error):  # unreadable, not UTF-8, not JSON, too deep, bad CSV
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fp or hashlib.sha256(
        manifest.encode()
    ).hexdigest() != state.get("manifest_sha256") or tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS or not rows:
        return None
    # benches prepared before skipped.csv's sha256 was recorded have none
    if "skipped_sha256" in state and hashlib.sha256(skipped.encode()).hexdigest() != state["skipped_sha256"]:
        return None
    summary = Summary(final, kept=True)
    for line, r in enumerate(rows, start=2):
        if not _inside(r.get("path")) or not (r.get("mask") == "" or _inside(r.get("mask"))):
            log.warning("%s line %d: path %r / mask %r is not a relative path inside the bench folder: the bench "
                        "is not trusted", final / "manifest.csv", line, r.get("path"), r.get("mask"))
            return None
        if r.get("split") not in SPLITS or r.get("label") not in LABELS:
            return None
        p = final / r["path"]
        try:
            if not p.is_file() or sha256_file(p) != r["sha256"] or (r["mask"] and not (final / r["mask"]).is_file()):
                return None
        except OSError:  # a name too long for the file system
            return None
        summary.counts[(r["split"], r["label"])] = summary.counts.get((r["split"], r["label"]), 0) + 1
    if any(r.get("source") is None or r.get("reason") is None for r in skipped_rows):
        return None
    summary.skipped = [(r["source"], r["reason"]) for r in skipped_rows]
    return summary


def _inside(rel: Any) -> bool:
    """True for a relative POSIX path that stays inside its folder (no "..", not absolute, no
    backslash or NUL): what a manifest's ``path`` and ``mask`` must be."""
    return (isinstance(rel, str) and rel != "" and not rel.startswith("/") and "\\" not in rel and "\0" not in rel
            and ".." not in rel.split("/"))


def _commit(stage: Path, final: Path) -> None:
    """Rename the finished staging folder to ``final`` (replacing an old one via a trash folder)."""
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
        final.rename(trash)
        stage.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        stage.rename(final)


def read_csv(path: Path, hint: str, what: str = "") -> list[list[str]]:
    """The rows of the CSV file ``path`` (UTF-8, a byte-order mark allowed); DataError naming the
    file (as ``what`` ``path``) when it cannot be read, and the line for what the csv module
    refuses (a field over its 128 KiB limit, say)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {what + ' ' if what else ''}{path}: {exc}", hint=hint) from exc
    reader = csv.reader(io.StringIO(text))
    try:
        return list(reader)
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: {exc}", hint=hint) from None


def train_test_normals(n_normal: int, published: tuple[int, int], *, hint: str) -> tuple[int, int]:
    """(train, test) normal images for ``n_normal``, after a paper's ``published`` (train, test)
    split of ``sum(published)`` normals: the published test count from that many up, the rest to
    train; for fewer, the published proportions (:func:`proportional`, at least one each).
    DataError, with ``hint``, below 2."""
    if n_normal < 2:
        raise DataError(f"{n_normal} normal image(s) found: the split needs at least 2 (one for train, one for test)",
                        hint=hint)
    if n_normal >= sum(published):
        return n_normal - published[1], published[1]
    train, test = proportional(published, sum(published), n_normal)
    return train, test


def proportional(bmad_sizes: Sequence[int], bmad_total: int, n: int, *, minimum: int = 1) -> list[int]:
    """Scale BMAD's group sizes to ``n`` available units (largest remainder, each >= ``minimum``).

    With ``n == bmad_total`` the sizes are BMAD's exactly.
    """
    if n >= bmad_total:
        return list(bmad_sizes)
    raw = [s * n / bmad_total for s in bmad_sizes]
    sizes = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in order[: round(sum(raw)) - sum(sizes)]:
        sizes[i] += 1
    for i, s in enumerate(sizes):
        if s < minimum:
            j = max(range(len(sizes)), key=lambda k: (sizes[k], -k))
            if sizes[j] - 1 < minimum:
                raise DataError(f"{n} inputs are too few for {len(sizes)} non-empty groups",
                                hint="give more raw data")
            sizes[j] -= 1
            sizes[i] += 1
    return sizes


def share_quota(quota: int, capacity: Sequence[int]) -> list[int]:
    """Split ``quota`` as evenly as possible over units (patients, volumes, slides) with the given capacities.

    Capped units give all they have and the rest goes to the others; within a
    round the earlier units get the extra one.
    """
    take = [0] * len(capacity)
    remaining = quota
    active = [i for i, c in enumerate(capacity) if c > 0]
    while remaining > 0 and active:
        base, extra = divmod(remaining, len(active))
        still = []
        for j, i in enumerate(active):
            got = min(base + (j < extra), capacity[i] - take[i])
            take[i] += got
            remaining -= got
            if take[i] < capacity[i]:
                still.append(i)
        active = still
    return take


def spread(candidates: Sequence[int], k: int) -> list[int]:
    """``k`` of the sorted ``candidates``, evenly spaced and centred (all of them when k >= len)."""
    n = len(candidates)
    if k >= n:
        return list(candidates)
    return [candidates[int(np.floor((i + 0.5) * n / k))] for i in range(k)]


DEFLATE_MAX_RATIO = 1032
"""The most a deflate stream (gzip, zlib) expands: 1,032 bytes out per byte in."""


def check_nifti_size(img: Any, path: Path, hint: str) -> None:
    """DataError unless ``path`` can hold the voxel data the header of NIfTI image ``img``
    declares: the file's size for ``.nii``, at most :data:`DEFLATE_MAX_RATIO` times it for
    ``.nii.gz``. Checked before reading, so a corrupt header cannot make a reader allocate
    the terabytes it claims."""
    offset = float(img.header.get("vox_offset", 0))
    need = max(int(offset), 0) if np.isfinite(offset) else 0
    need += int(np.prod([int(d) for d in img.shape], dtype=object)) * img.get_data_dtype().itemsize
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if need > size * DEFLATE_MAX_RATIO:
            raise DataError(f"cannot read {path}: its header declares {need:,} bytes of voxel data (shape "
                            f"{tuple(img.shape)}), more than {size:,} gzip-compressed bytes can hold", hint=hint)
    elif size < need:
        raise DataError(f"cannot read {path}: truncated ({size} of {need} bytes)", hint=hint)


def decode_gray(path: Path) -> np.ndarray:
    """The image at ``path`` decoded to uint8 [H, W] (Pillow; colour converted with
    ITU-R 601-2 luma); DataError naming the file when it cannot be decoded."""
    hint = f"re-download or re-extract {path.name}, or delete it from the raw folder"
    try:
        with Image.open(path) as im:
            check_pixels(im, path)
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(f"{path} has {im.mode} pixels, not 8-bit", hint=hint)
            gray = im if im.mode == "L" else im.convert("L")
            pixels = np.asarray(gray, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"cannot decode {path}: {type(exc).__name__}: {exc}", hint=hint) from exc
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise DataError(f"{path} decodes to an empty image {pixels.shape}", hint=hint)
    return pixels


def parse_size(size: Sequence[int] | None, example: str = "256 256") -> tuple[int, int] | None:
    """``--size H W`` as a (H, W) tuple of positive ints (None stays None); UsageError otherwise."""
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise UsageError(f"--size {size!r} is not two integers H W", hint=f"e.g. --size {example}") from None
    if h < 1 or w < 1:
        raise UsageError(f"--size {h} {w}: both must be positive", hint=f"e.g. --size {example}")
    return h, w


def resize_gray(pixels: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """``pixels`` resized to ``size`` (H, W) with Pillow's bicubic filter; unchanged when None or equal."""
    if size is None or pixels.shape == size:
        return pixels
    h, w = size
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BICUBIC))
