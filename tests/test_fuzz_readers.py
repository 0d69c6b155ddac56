"""Fuzzing every reader of untrusted files with hypothesis: NIfTI volumes, DICOM, PNG/JPEG/TIFF
images, whole-slide TIFFs, ASAP annotation XML (entity bombs and external entities included),
label CSVs, a prepared bench's manifest, state and skipped list, a killed preparation's journal
and state, split lists, run records (with ``bmad leaderboard`` on top) and the reference file
of ``--compare``.

Inputs are mutations of real files (``../shared/fixtures/real``, when present, the shipped split
and reference files, records written by bmad's runner, a bench written by bmad's bench writer)
and of small generated ones: bit flips, random bytes, truncation, insertion, deletion, repeated
chunks and header fields set to extremes (huge dimensions, negative sizes, NaN scaling, odd
types); edits of JSON trees; structured CSV, JSON and XML generators (:mod:`tests.fuzz_inputs`).

The only outcomes allowed for an input are a correct read (checked against what the reader
promises: dtype, shape, range, paths inside their folder, the bench a clean preparation writes)
or bmad's own error (:class:`bmad.errors.BmadError`) naming the file; run records keep their
documented contract (``ValueError`` with the reason, which the leaderboard reports and skips),
and a prepared bench or journal that does not verify is not trusted (rebuilt, redone). Every target runs in a forked process with an address-space
limit (:data:`MEMORY` above what it had mapped) and a per-input watchdog
(:data:`INPUT_TIMEOUT`): a memory blow-up, a hang, a crash of a C library or any other
exception fails the test with hypothesis' minimal failing input.

The default selection tries :data:`SHORT` inputs per target; ``--runslow`` :data:`LONG`. Each
test records how many inputs it tried as the junit property ``fuzz_inputs`` (``--junitxml``)
and prints it (``-rP``). ``test_fuzz_finding_stays_fixed`` replays one small input of every
failure class the fuzzing found.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import faulthandler
import hashlib
import io
import json
import logging
import math
import os
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bmad.errors import BmadError
from tests.conftest import REAL, SHARED
from tests.fuzz_inputs import (
    Mutant,
    Seed,
    asap_text,
    csv_text,
    deep_json,
    dicom_fields,
    dumps,
    fix_png_crcs,
    gzip_bytes,
    jpeg_fields,
    json_mutated,
    json_values,
    mutated,
    nifti_fields,
    png_fields,
    text_bytes,
    tiff_fields,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and RLIMIT_AS are POSIX")

SHORT = 40
"""Inputs per target in the default selection."""
LONG = 400
"""Inputs per target with --runslow."""
MEMORY = 2 * 2**30
"""Address space a fuzzing process may map beyond what it had when it started (bytes)."""
INPUT_TIMEOUT = 60.0
"""Seconds one input may take before the watchdog dumps the stack and ends the process (a hang)."""
DEADLINE = timedelta(seconds=15)
"""Hypothesis' deadline per input: reads of these small files take milliseconds to a second."""

T = TypeVar("T")
TALLY: collections.Counter[str] = collections.Counter()
"""Reader calls of the fuzzing process that read their input / refused it with bmad's error."""


# ---------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------
def fuzz(name: str, strategy: st.SearchStrategy[Any], target: Callable[[Any], None], examples: int,
         work: Path) -> int:
    """Run ``target`` on ``examples`` inputs drawn from ``strategy`` (derandomized, no example
    database) in a forked process limited to :data:`MEMORY` more address space; return how
    many inputs were tried (shrinking included). Fails with hypothesis' report (the minimal
    failing input and its traceback), or with the watchdog's stack dump on a hang, or with the
    signal that killed the process."""
    work.mkdir(parents=True, exist_ok=True)
    result, hang = work / f"{name}.result.json", work / f"{name}.hang.txt"
    result.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            _fuzz_child(strategy, target, examples, result, hang)
            code = 0
        except BaseException:  # noqa: BLE001 - the harness itself failed: say why, then exit
            with contextlib.suppress(BaseException):
                hang.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    deadline = time.monotonic() + examples * INPUT_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{name}: the fuzzing process did not finish in {examples * INPUT_TIMEOUT:.0f} s")
        time.sleep(0.02)
    if result.is_file():
        outcome = json.loads(result.read_text())
        if outcome.get("error"):
            report = "\n".join(line if len(line) < 1000 else f"{line[:400]} ...[{len(line) - 600:,} characters]... "
                               f"{line[-200:]}" for line in outcome["error"].splitlines())
            pytest.fail(f"{name}: after {outcome['count']} inputs, hypothesis found:\n{report}", pytrace=False)
        print(f"fuzz {name}: {outcome['count']} inputs tried; reader calls: {outcome['tally']}")
        return int(outcome["count"])
    why = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    dump = hang.read_text(errors="replace") if hang.is_file() else ""
    pytest.fail(f"{name}: the fuzzing process died ({why}); the watchdog's dump (a hang) or the error:\n{dump}\n"
                f"the last input is in {work}", pytrace=False)


def _fuzz_child(strategy: st.SearchStrategy[Any], target: Callable[[Any], None], examples: int, result: Path,
                hang: Path) -> None:
    with open("/proc/self/status") as fh:
        mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + MEMORY, resource.getrlimit(resource.RLIMIT_AS)[1]))
    logging.getLogger("nibabel").setLevel(logging.ERROR)  # warnings about odd inputs would fill the log
    warnings.simplefilter("ignore")
    count = 0
    watchdog = open(hang, "w")  # noqa: SIM115 - open until os._exit

    @settings(max_examples=examples, derandomize=True, database=None, deadline=DEADLINE, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(strategy)
    def run(value: Any) -> None:
        nonlocal count
        count += 1
        faulthandler.dump_traceback_later(INPUT_TIMEOUT, exit=True, file=watchdog)
        try:
            target(value)
        finally:
            faulthandler.cancel_dump_traceback_later()

    try:
        run()
        error = None
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as text
        error = "".join(traceback.format_exception(exc))
    result.write_text(json.dumps({"count": count, "error": error, "tally": TALLY}))


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def outcome(call: Callable[[], T], path: Path, allowed: tuple[type[BaseException], ...] = (BmadError,)) -> T | None:
    """``call()``'s result, or None when it raised one of ``allowed`` naming ``path`` (and not
    because memory ran out: a reader that maps a MemoryError to its error still tried to
    allocate what the file claimed). Any other exception propagates: a fuzzing failure."""
    try:
        result = call()
    except allowed as exc:
        assert path.name in str(exc), f"the error does not name the file {path.name}: {exc}"
        assert not any(isinstance(e, MemoryError) for e in _chain(exc)) and "MemoryError" not in str(exc), \
            f"memory blow-up turned into an error: {exc}"
        TALLY["refused"] += 1
        return None
    TALLY["read"] += 1
    return result


def _write(work: Path, m: Mutant) -> Path:
    path = work / f"input{m.suffix}"
    path.write_bytes(m.data)
    return path


@pytest.fixture(params=[pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.slow)])
def examples(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _real(*parts: str) -> Path | None:
    """A real fixture file, or None when ../shared is absent (a user's clone: generated seeds only)."""
    if not SHARED.is_dir():
        return None
    path = REAL.joinpath(*parts)
    assert path.is_file(), f"{path} is missing from the shared fixtures"
    return path


def _report(record_property: Callable[[str, Any], None], n: int, examples: int) -> None:
    record_property("fuzz_inputs", n)
    # hypothesis stops early only when it has tried every input the strategy can make
    assert n >= examples, f"only {n} of {examples} inputs were tried"


# ---------------------------------------------------------------------------------------
# NIfTI volumes: brats2021 (whole volume) and liver (slice by slice)
# ---------------------------------------------------------------------------------------
def _nifti_seeds() -> list[Seed]:
    import nibabel as nib

    seeds = []
    rng = np.random.default_rng(0)
    made = [
        ("int16-lps", rng.integers(-1000, 2000, (8, 7, 5)).astype(np.int16), np.diag([-1.0, -1.0, 2.0, 1.0]), None),
        ("float32-scaled", rng.normal(0, 1, (6, 6, 4)).astype(np.float32), np.diag([0.8, 0.8, 3.0, 1.0]), (2.0, -1.0)),
        ("uint8-4d", rng.integers(0, 5, (6, 5, 4, 1)).astype(np.uint8), np.eye(4), None),
        ("float64-oblique", rng.normal(0, 1, (5, 5, 3)),
         np.array([[0.0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), None),
    ]
    for name, arr, affine, scale in made:
        img = nib.Nifti1Image(arr, affine)
        if scale:
            img.header.set_slope_inter(*scale)
        payload = img.to_bytes()
        fields = nifti_fields(payload)
        seeds.append(Seed(f"{name}.nii", payload, ".nii", fields))
        seeds.append(Seed(f"{name}.nii.gz", payload, ".nii.gz", fields, gzip_bytes))
    for parts in (("ct_totalseg", "example_seg_fast_liver.nii.gz"), ("ct_totalseg", "example_seg.nii.gz"),
                  ("brats2015_deepmedic", "brats_2013_pat0001_1", "OTMultiClass.nii.gz")):
        path = _real(*parts)
        if path is not None:
            payload = zlib.decompress(path.read_bytes(), 31)
            seeds.append(Seed(path.name, payload, ".nii.gz", nifti_fields(payload), gzip_bytes))
    return seeds


def _check_nifti(work: Path) -> Callable[[Mutant], None]:
    from datasets_prep import brats2021, liver

    def target(m: Mutant) -> None:
        path = _write(work, m)
        shape = outcome(lambda: brats2021._canonical_shape(path), path)
        vol = outcome(lambda: brats2021._load(path), path)
        if vol is not None:
            assert vol.ndim == 3 and vol.size > 0, vol.shape
            assert shape is not None and vol.shape == shape, (vol.shape, shape)
        v = outcome(lambda: liver.Volume(path, "--raw"), path)
        if v is not None:
            assert len(v.canonical_shape) == 3 and min(v.canonical_shape) > 0
            for k in sorted({0, v.depth // 2, v.depth - 1}):
                plane = outcome(lambda k=k: v.plane(k), path)
                if plane is not None:
                    assert plane.shape == v.canonical_shape[:2], (plane.shape, v.canonical_shape)
                    assert v.labels(plane).shape == plane.shape
        if not m.edits:  # a seed as it is: both readers must read it
            assert vol is not None and v is not None, m

    return target


def test_fuzz_nifti(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    n = fuzz("nifti", mutated(_nifti_seeds()), _check_nifti(tmp_path), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# DICOM (rsna; any reorganizer reading DICOM through datasets_prep.dicom)
# ---------------------------------------------------------------------------------------
def _dicom_seeds(work: Path) -> list[Seed]:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from datasets_prep.dicom import write_dicom

    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (12, 10)).astype(np.uint8)
    gray16 = rng.integers(0, 4096, (12, 10)).astype(np.uint16)
    signed = rng.integers(-1000, 1000, (10, 12)).astype(np.int16)
    rgb = rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = list(range(255, -1, -1))
    lut["LUTData"].VR = "US"
    made = {
        "native8": (gray8, {"NumberOfFrames": 1}),
        "native16-window": (gray16, {"bits_stored": 12, "RescaleSlope": 2, "RescaleIntercept": -1024,
                                     "WindowCenter": 100, "WindowWidth": 400}),
        "signed-mono1-sigmoid": (signed, {"photometric": "MONOCHROME1", "WindowCenter": 0, "WindowWidth": 300,
                                          "VOILUTFunction": "SIGMOID", "PixelPaddingValue": -1000}),
        "voi-lut": (gray8, {"VOILUTSequence": Sequence([lut])}),
        "rgb": (rgb, {"photometric": "RGB"}),
        "implicit": (gray16, {"transfer_syntax": "1.2.840.10008.1.2"}),
        "rle": (gray16, {"transfer_syntax": "1.2.840.10008.1.2.5"}),
        "jpeg": (gray8, {"transfer_syntax": "1.2.840.10008.1.2.4.50"}),
        "j2k": (np.tile(gray16, (3, 4)), {"transfer_syntax": "1.2.840.10008.1.2.4.90"}),  # openjpeg: >= 32 px
    }
    seeds = []
    for name, (pixels, kw) in made.items():
        data = write_dicom(work / f"{name}.dcm", pixels, uid_seed=name, **kw).read_bytes()
        seeds.append(Seed(name, data, ".dcm", dicom_fields(data)))
    for parts in (("dicom_cxr_udacity_nih", "test1.dcm"), ("dicom_pydicom_data", "RG3_J2KI.dcm"),
                  ("dicom_pydicom_data", "MR-SIEMENS-DICOM-WithOverlays.dcm")):
        path = _real(*parts)
        if path is not None:
            data = path.read_bytes()
            seeds.append(Seed(path.name, data, ".dcm", dicom_fields(data)))
    return seeds


def _check_dicom(work: Path) -> Callable[[Mutant], None]:
    from datasets_prep.dicom import read_dicom_8bit

    def target(m: Mutant) -> None:
        path = _write(work, m)
        pixels = outcome(lambda: read_dicom_8bit(path), path)
        if pixels is not None:
            assert pixels.dtype == np.uint8 and pixels.ndim == 2 and pixels.size > 0, (pixels.dtype, pixels.shape)
        elif not m.edits:
            pytest.fail(f"the seed {m.seed} itself is not read")

    return target


def test_fuzz_dicom(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    n = fuzz("dicom", mutated(_dicom_seeds(tmp_path)), _check_dicom(tmp_path), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# images: bench images and masks (bmad.data), reorganizers' decoders (resc, oct2017)
# ---------------------------------------------------------------------------------------
def _image_bytes(arr: np.ndarray, fmt: str, mode: str | None = None, **kw: Any) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image_seeds() -> list[Seed]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 16)).astype(np.uint8)
    rgb = rng.integers(0, 256, (18, 14, 3)).astype(np.uint8)
    made = [
        ("L.png", _image_bytes(gray, "PNG")),
        ("LA.png", _image_bytes(gray, "PNG", "LA")),
        ("P.png", _image_bytes(rgb, "PNG", "P")),
        ("RGB-interlaced.png", _image_bytes(rgb, "PNG", interlace=1)),
        ("RGBA.png", _image_bytes(rgb, "PNG", "RGBA")),
        ("1.png", _image_bytes(gray > 128, "PNG")),
        ("I16.png", _image_bytes(rng.integers(0, 65536, (12, 10)).astype(np.uint16), "PNG")),
        ("L.jpg", _image_bytes(gray, "JPEG")),
        ("RGB-progressive.jpg", _image_bytes(rgb, "JPEG", progressive=True)),
        ("RGB.bmp", _image_bytes(rgb, "BMP")),
        ("L.tif", _image_bytes(gray, "TIFF")),
        ("F.tif", _image_bytes(rng.random((10, 12)).astype(np.float32), "TIFF")),
        ("I16.tif", _image_bytes(rng.integers(0, 65536, (10, 12)).astype(np.uint16), "TIFF")),
        ("RGB-deflate.tif", _image_bytes(rgb, "TIFF", compression="tiff_adobe_deflate")),
    ]
    for parts in (("brain_mri_yes_no", "brain_tumor_dataset", "yes", "Y254.jpg"),
                  ("brain_mri_yes_no", "brain_tumor_dataset", "yes", "Y92.png"),
                  ("oct_kermany", "CNV-53018-2.jpeg")):
        path = _real(*parts)
        if path is not None:
            made.append((path.name, path.read_bytes()))
    seeds = []
    for name, data in made:
        suffix = Path(name).suffix
        if suffix == ".png":
            seeds.append(Seed(name, data, suffix, png_fields(), fix_png_crcs))
        elif suffix in (".jpg", ".jpeg"):
            seeds.append(Seed(name, data, suffix, jpeg_fields(data)))
        elif suffix == ".tif":
            seeds.append(Seed(name, data, suffix, tiff_fields(data)))
        else:
            seeds.append(Seed(name, data, suffix))
    return seeds


def _check_image(work: Path) -> Callable[[Mutant], None]:
    from bmad import images
    from datasets_prep import busi, common, resc

    def target(m: Mutant) -> None:
        path = _write(work, m)
        size = outcome(lambda: images.image_size(path), path)
        img = outcome(lambda: images.read_image(path), path)
        if img is not None:
            assert img.dtype == np.float32 and img.ndim == 3 and img.shape[0] in (1, 3), (img.dtype, img.shape)
            assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1, (img.min(), img.max())
            assert size == img.shape[1:], (size, img.shape)
            mask = outcome(lambda: images.read_mask(path), path)
            assert mask is not None and mask.dtype == bool and mask.shape == size
        for decode in (resc.read_gray, common.decode_gray):
            gray = outcome(lambda decode=decode: decode(path), path)
            if gray is not None:
                assert gray.dtype == np.uint8 and gray.ndim == 2 and gray.size > 0, (gray.dtype, gray.shape)
                assert size == gray.shape, (size, gray.shape)
        lesion = outcome(lambda: busi.read_mask(path), path)
        if lesion is not None:
            assert lesion.dtype == bool and lesion.shape == size, (lesion.dtype, lesion.shape, size)
        header = outcome(lambda: resc.image_size(path), path)
        assert header == size or header is None or size is None, (header, size)
        if not m.edits:
            assert img is not None, f"the seed {m.seed} itself is not read"

    return target


def test_fuzz_images(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    n = fuzz("image", mutated(_image_seeds()), _check_image(tmp_path), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# whole-slide TIFFs (camelyon16 through datasets_prep.wsi)
# ---------------------------------------------------------------------------------------
def _slide_seeds(work: Path) -> list[Seed]:
    from datasets_prep.wsi import write_pyramid_tiff

    def render(x: int, y: int, w: int, h: int, ds: int) -> np.ndarray:
        yy, xx = np.mgrid[y: y + h, x: x + w]
        tissue = ((xx * ds - 350) ** 2 + (yy * ds - 250) ** 2) < 200**2
        out = np.full((h, w, 3), 235, np.uint8)
        out[tissue] = (190, 90, 160)
        return out

    seeds = []
    for compression in ("jpeg", "zlib"):
        path = write_pyramid_tiff(work / f"pyramid-{compression}.tif", 700, 500, render, tile=128,
                                  compression=compression, mpp=0.5)
        data = path.read_bytes()
        seeds.append(Seed(path.name, data, ".tif", tiff_fields(data)))
    for name in ("cmu1_small_region_pyramid_generic.tif", "pathml_small_HE.svs"):
        path = _real("wsi", name)
        if path is not None:
            data = path.read_bytes()
            seeds.append(Seed(name, data, path.suffix, tiff_fields(data)))
    return seeds


def _check_slide(work: Path) -> Callable[[Mutant], None]:
    from datasets_prep import wsi

    def read(path: Path) -> tuple[dict[str, Any], wsi.Thumbnail, np.ndarray]:
        with wsi.open_slide(path) as slide:
            info = wsi.slide_info(slide)
            thumb = wsi.saturation_thumbnail(slide, 16, path=path)
            w, h = info["dimensions"]
            patch = wsi.read_rgb(slide, w // 2 - 128, h // 2 - 128, 256, 256, path=path)
        return info, thumb, patch

    def target(m: Mutant) -> None:
        path = _write(work, m)
        got = outcome(lambda: read(path), path)
        if got is not None:
            info, thumb, patch = got
            w, h = info["dimensions"]
            assert w > 0 and h > 0 and info["levels"] >= 1, info
            assert thumb.sat.dtype == np.uint8 and thumb.sat.ndim == 2 and thumb.sat.size > 0
            assert abs(thumb.sat.shape[1] * thumb.px_x - w) <= thumb.px_x, (thumb.sat.shape, thumb.px_x, w)
            assert patch.shape == (256, 256, 3) and patch.dtype == np.uint8
        elif not m.edits:
            pytest.fail(f"the seed {m.seed} itself is not read")

    return target


def test_fuzz_slides(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    n = fuzz("slide", mutated(_slide_seeds(tmp_path)), _check_slide(tmp_path), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# ASAP annotation XML (camelyon16 through datasets_prep.wsi)
# ---------------------------------------------------------------------------------------
SLIDE_SIZE = (100_000, 80_000)
"""Level-0 size of the slide the fuzzed annotations are laid on (about a Camelyon16 slide)."""
_LAUGHS = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
XML_ATTACKS = {
    # entity expansion: a billion "lol"s from 1 kB, and a 40 MB attribute from 60 kB
    "billion-laughs": f'<!DOCTYPE ASAP_Annotations [<!ENTITY l0 "lol">{_LAUGHS}]>'
                      '<ASAP_Annotations><Annotations><Annotation Name="&l9;" PartOfGroup="Tumor"/></Annotations>'
                      '</ASAP_Annotations>',
    "quadratic": f'<!DOCTYPE ASAP_Annotations [<!ENTITY e "{"x" * 20_000}">]><ASAP_Annotations><Annotations>'
                 f'<Annotation Name="{"&e;" * 2000}"/></Annotations></ASAP_Annotations>',
    # external entities and DTDs: a reader must not open files (or URLs) an annotation names
    "external-entity": '<!DOCTYPE ASAP_Annotations [<!ENTITY e SYSTEM "file:///etc/passwd">]><ASAP_Annotations>'
                       '<Annotations><Annotation Name="a" PartOfGroup="Tumor">&e;</Annotation></Annotations>'
                       '</ASAP_Annotations>',
    "external-dtd": '<!DOCTYPE ASAP_Annotations SYSTEM "file:///etc/passwd"><ASAP_Annotations/>',
    "parameter-entity": '<!DOCTYPE ASAP_Annotations [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
                        '<ASAP_Annotations/>',
    "internal-entity": '<!DOCTYPE ASAP_Annotations [<!ENTITY t "Tumor">]><ASAP_Annotations><Annotations>'
                       '<Annotation Name="a" PartOfGroup="&t;"><Coordinates><Coordinate Order="0" X="1" Y="1"/>'
                       '<Coordinate Order="1" X="9" Y="1"/><Coordinate Order="2" X="5" Y="9"/></Coordinates>'
                       '</Annotation></Annotations></ASAP_Annotations>',
}


def _xml_seeds() -> tuple[list[Seed], dict[str, tuple[int, int, int]]]:
    """Seeds, and for those that must be read: (tumour, exclusion, ignored) polygons."""
    from datasets_prep import wsi

    square = [(1000.0, 1000.0), (3000.0, 1000.0), (3000.0, 3000.0), (1000.0, 3000.0)]
    hole = [(1500.0, 1500.0), (2000.0, 1500.0), (2000.0, 2000.0)]
    small = [(70_000.5, 40_000.25), (70_100.0, 40_000.0), (70_050.0, 40_090.75)]  # holds no grid centre
    made = {
        "camelyon16-train.xml": (wsi.asap_xml([("_0", square), ("_2", hole), ("_1", small), ("None", square[:3]),
                                               ("Tumor", square[:2])]).encode(), (2, 1, 2)),
        "camelyon16-test.xml": (wsi.asap_xml([("Tumor", square), ("Exclusion", hole)]).encode(), (1, 1, 0)),
        # out of order, comma decimals, a spline, no Order, Latin-1 text: as some exports write them
        "odd-export.xml": (('<?xml version="1.0" encoding="ISO-8859-1"?>\n<ASAP_Annotations><Annotations>'
                           '<Annotation Name="Région" Type="Spline" PartOfGroup="metastases"><Coordinates>'
                           '<Coordinate Order="2" X="5,5" Y="9"/><Coordinate Order="0" X="1" Y="1,25"/>'
                           '<Coordinate Order="1" X="9" Y="1"/></Coordinates></Annotation>'
                           '<Annotation Name="b" PartOfGroup="normal"><Coordinates><Coordinate X="2" Y="2"/>'
                           '<Coordinate X="3" Y="2"/><Coordinate X="3" Y="3"/></Coordinates></Annotation>'
                           '</Annotations></ASAP_Annotations>\n').encode("latin-1"), (1, 1, 0)),
        "utf-16.xml": (wsi.asap_xml([("Tumor", small)]).replace('version="1.0"', 'version="1.0" encoding="UTF-16"')
                       .encode("utf-16"), (1, 0, 0)),
    }
    for enc in ("shift_jis", "x-unknown"):  # declared encodings that expat does not decode
        made[f"{enc}.xml"] = (wsi.asap_xml([("Tumor", square)]).replace('version="1.0"', f'version="1.0" '
                                                                        f'encoding="{enc}"').encode(), None)
    for name, text in XML_ATTACKS.items():
        made[f"{name}.xml"] = (('<?xml version="1.0"?>\n' + text).encode(), None)
    seeds = [Seed(name, data, ".xml") for name, (data, _) in made.items()]
    return seeds, {name: n for name, (_, n) in made.items() if n is not None}


def _check_xml(work: Path, expected: dict[str, tuple[int, int, int]]) -> Callable[[Mutant], None]:
    from datasets_prep import camelyon16, wsi

    def target(m: Mutant) -> None:
        path = _write(work, m)
        ann = outcome(lambda: wsi.parse_asap_xml(path), path)
        if ann is None:
            assert m.edits or m.seed not in expected, f"the seed {m.seed} itself is not read"
            return
        polys = (*ann.tumour, *ann.exclusion, *ann.ignored)
        for p in polys:
            assert p.points.dtype == np.float64 and p.points.ndim == 2 and p.points.shape[1] == 2
            assert np.isfinite(p.points).all(), p
            assert "root:" not in p.name + p.group, "an external entity was read"
        assert all(len(p.points) >= 3 and p.group.lower() in wsi.TUMOUR_GROUPS for p in ann.tumour)
        assert all(len(p.points) >= 3 and p.group.lower() in wsi.EXCLUSION_GROUPS for p in ann.exclusion)
        if not m.edits:
            assert (len(ann.tumour), len(ann.exclusion), len(ann.ignored)) == expected[m.seed]
        # what camelyon16 does with them: patch origins inside the slide, inside tumour
        origins = camelyon16.tumour_origins(ann, *SLIDE_SIZE)
        assert origins.dtype == np.int64 and origins.ndim == 2 and origins.shape[1] == 2
        half = camelyon16.PATCH // 2
        assert ann.contains(origins + half).all()
        assert (origins >= 0).all() and (origins[:, 0] + camelyon16.PATCH <= SLIDE_SIZE[0]).all()
        assert (origins[:, 1] + camelyon16.PATCH <= SLIDE_SIZE[1]).all()
        for p in polys:
            point = wsi.interior_point(p.points)
            assert point is None or all(math.isfinite(v) for v in point)

    return target


def test_fuzz_asap_xml(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    seeds, expected = _xml_seeds()
    strategy = st.one_of(mutated(seeds), asap_text().map(lambda t: Mutant(t.encode(), "asap_text", ".xml", (t,))))
    n = fuzz("asap_xml", strategy, _check_xml(tmp_path, expected), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# label CSVs: rsna, camelyon16 (reference.csv), chexpert, vindr (two label files), brainmri's
# duplicates.csv (read back from a prepared bench)
# ---------------------------------------------------------------------------------------
def _csv_inputs(header: tuple[str, ...], plausible: tuple[tuple[str, ...], ...], seeds: dict[str, str],
                no_header: bool = False) -> st.SearchStrategy[Mutant]:
    """Generated CSV text (through :func:`csv_text`, in several encodings) or a mutated valid file."""
    generated = text_bytes(csv_text(header if not no_header else plausible_row(plausible), plausible))
    options = [generated.map(lambda b: Mutant(b, "csv_text", ".csv", ("generated",)))]
    if seeds:
        options.append(mutated([Seed(name, text.encode(), ".csv") for name, text in seeds.items()], header=256))
    return st.one_of(*options)


def plausible_row(plausible: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    """A first row of plausible values (for a CSV without a header)."""
    return tuple(values[0] for values in plausible)


def _csv_rsna(work: Path) -> tuple[st.SearchStrategy[Mutant], Callable[[Mutant], None]]:
    from datasets_prep import rsna

    valid = ("patientId,class\np0,Normal\np1,Lung Opacity\np1,Lung Opacity\np2,No Lung Opacity / Not Normal\n"
             "p3,Normal\np3,Lung Opacity\n\n")
    expected = {"p0": "good", "p1": "Ungood", "p2": "Ungood"}
    ids = ("p0", "0004cfab-14fd-4e49-80ba-63a80b6bddd6", " p1 ", "p/../x")

    def target(m: Mutant) -> None:
        path = _write(work, m)
        table = outcome(lambda: rsna.read_classes(path), path)
        if table is None:
            assert m.edits, f"the seed {m.seed} itself is not read"
            return
        assert set(table.labels.values()) <= {"good", "Ungood"} and not set(table.labels) & set(table.conflicts)
        assert all(pid and pid == pid.strip() for pid in (*table.labels, *table.conflicts))
        assert table.rows >= len(table.labels) + len(table.conflicts) > 0
        if not m.edits:
            assert table.labels == expected and list(table.conflicts) == ["p3"] and table.rows == 6

    return _csv_inputs(rsna.COLUMNS, (ids, tuple(rsna.CLASSES)), {"rsna.csv": valid}), target


def _csv_camelyon16(work: Path) -> tuple[st.SearchStrategy[Mutant], Callable[[Mutant], None]]:
    from datasets_prep import camelyon16

    seeds = {"reference.csv": "test_001,Tumor,Macro,\ntest_002,Normal,,\nTest_003.tif,tumour,Micro,\n",
             "with-header.csv": "image,type,label\ntest_004,Macro,Tumor\ntest_005,,Normal\n"}
    expected = {"reference.csv": {"test_001": "Ungood", "test_002": "good", "test_003": "Ungood"},
                "with-header.csv": {"test_004": "Ungood", "test_005": "good"}}
    plausible = (("test_001", "Test_002.tif", "normal_001", "test_1", "test_٠٠١", "x"),
                 ("Tumor", "Normal", "tumour", "NORMAL"), ("Macro", "Micro", ""))

    def target(m: Mutant) -> None:
        path = _write(work, m)
        labels = outcome(lambda: camelyon16.read_reference(path), path)
        if labels is None:
            assert m.edits, f"the seed {m.seed} itself is not read"
            return
        assert all(camelyon16.SLIDE_RE.fullmatch(k) for k in labels), labels  # none: a header and no rows
        assert set(labels.values()) <= {camelyon16.GOOD, camelyon16.UNGOOD}
        if not m.edits:
            assert labels == expected[m.seed]

    strategy = st.one_of(_csv_inputs(("image", "label", "type"), plausible, seeds),
                         _csv_inputs((), plausible, {}, no_header=True))
    return strategy, target


def _csv_chexpert(work: Path) -> tuple[st.SearchStrategy[Mutant], Callable[[Mutant], None]]:
    from datasets_prep import chexpert

    def row(path: str, view: str, no_finding: str, sick: str = "") -> str:
        return ",".join([path, "Female", "68", view, "PA" if view == "Frontal" else "", no_finding,
                         sick, *[""] * (len(chexpert.PATHOLOGIES) - 1), "1.0"])

    head = ",".join(chexpert.HEADER)
    seeds = {
        "train.csv": "\n".join([head, row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                          "Frontal", "1.0"),
                                row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Frontal",
                                    "", "1.0"),
                                row("CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg", "Lateral", ""),
                                row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Frontal",
                                    "", "-1.0"), ""]),
        "valid.csv": "\n".join([head, row("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "0.0", "1"),
                                ""]),
    }
    expected = {"train.csv": ("train", 2, 1, 1), "valid.csv": ("valid", 1, 0, 0)}
    paths = ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "valid/p/s/v.jpg", "train/p/x.jpg",
             "train/../../etc/passwd", "train/p\\q/s/v.jpg", "/train/p/s/v.jpg", "train")
    values = ("1.0", "0.0", "-1.0", "", "1", "2", "nan")
    plausible = (paths, ("Male", "Female"), ("68", ""), ("Frontal", "Lateral"), ("PA", "AP", ""),
                 *[values] * (len(chexpert.PATHOLOGIES) + 2))

    def target(m: Mutant) -> None:
        path = _write(work, m)
        for split in ("train", "valid"):
            table = outcome(lambda split=split: chexpert.read_table(path, split), path)
            if table is None:
                assert m.edits or expected[m.seed][0] != split, f"the seed {m.seed} itself is not read"
                continue
            for r in table.rows:
                parts = r.rel.split("/")
                assert parts[0] == split and len(parts) >= 3 and ".." not in parts and r.patient == parts[1], r
                assert r.label in ("good", "Ungood") and "/" not in r.name, r
            if not m.edits:
                assert (split, len(table.rows), table.other_views, table.unlabelled) == expected[m.seed]

    return _csv_inputs(chexpert.HEADER, plausible, seeds), target


VINDR_KAGGLE = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
VINDR_PHYSIONET = ("image_id", "rad_id", "Aortic enlargement", "Lung tumor", "Pneumonia", "Other diseases",
                   "No finding")


def _csv_vindr(work: Path, physionet: bool) -> tuple[st.SearchStrategy[Mutant], Callable[[Mutant], None]]:
    from datasets_prep import vindr

    ids = ("000434271f63a053c4128a0ba6352c7f", "a", "", " b ")
    if physionet:
        header, rel = VINDR_PHYSIONET, vindr.PHYSIONET_LABELS
        seed = ("image_id,rad_id,Aortic enlargement,Lung tumor,Pneumonia,Other diseases,No finding\n"
                "a,R8,0,0,0,0,1\na,R9,0,0,0,0,1.0\nb,R8,1,0,0,0,0\nb,R9,0,0,0,0,1\n")
        plausible = (ids, ("R8", "R9"), *[("0", "1", "1.0", "", "x", "nan", "inf")] * 5)
    else:
        header, rel = VINDR_KAGGLE, vindr.KAGGLE_LABELS
        seed = ("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\na,No finding,14,R1,,,,\n"
                "b,Aortic enlargement,0,R2,691,1375,1653,1831\nb,No finding,14,R3,,,,\n")
        plausible = (ids, ("No finding", "Aortic enlargement", "no finding"), ("14", "0"), ("R1", "R2"))

    def target(m: Mutant) -> None:
        raw = work / "raw"
        shutil.rmtree(raw, ignore_errors=True)
        path = raw / rel
        path.parent.mkdir(parents=True)
        path.write_bytes(m.data)
        got = outcome(lambda: vindr.read_labels(raw), path)
        if got is None:
            assert m.edits, f"the seed {m.seed} itself is not read"
            return
        assert got[0] == path and set(got[1].values()) <= {"good", "Ungood"} and all(got[1]), got
        if not m.edits:
            assert got[1] == {"a": "good", "b": "Ungood"}

    return _csv_inputs(header, plausible, {Path(rel).name: seed}), target


def _csv_duplicates(work: Path) -> tuple[st.SearchStrategy[Mutant], Callable[[Mutant], None]]:
    from datasets_prep import brainmri

    seed = ("group,source,split,label,path\n1,no/1 no.jpeg,test,good,test/good/img/1_no.png\n"
            "1,no/no 1.jpg,train,good,train/good/img/no_1.png\n2,yes/Y1.jpg,test,Ungood,test/Ungood/img/Y1.png\n"
            "2,yes/Y1 copy.jpg,test,Ungood,test/Ungood/img/Y1_copy.png\n")
    plausible = (("1", "2", ""), ("no/1 no.jpeg", "yes/Y1.jpg"), ("train", "test"), ("good", "Ungood"),
                 ("test/good/img/1_no.png",))

    def target(m: Mutant) -> None:
        final = work / "BrainMRI"
        final.mkdir(exist_ok=True)
        (final / brainmri.DUPLICATES).write_bytes(m.data)
        groups = brainmri.read_duplicates(final)  # None: missing or malformed, the bench is then rebuilt
        TALLY["read" if groups is not None else "refused"] += 1
        if groups is None:
            assert m.edits, f"the seed {m.seed} itself is not read"
            return
        assert all(g and all(isinstance(s, str) for s in g) for g in groups), groups
        if not m.edits:
            assert groups == [["no/1 no.jpeg", "no/no 1.jpg"], ["yes/Y1.jpg", "yes/Y1 copy.jpg"]]

    return _csv_inputs(brainmri.DUPLICATE_COLUMNS, plausible, {"duplicates.csv": seed}), target


CSV_READERS = {"rsna": _csv_rsna, "camelyon16": _csv_camelyon16, "chexpert": _csv_chexpert,
               "vindr-kaggle": lambda work: _csv_vindr(work, False), "vindr-physionet": lambda work: _csv_vindr(work, True),
               "brainmri-duplicates": _csv_duplicates}


@pytest.mark.parametrize("reader", list(CSV_READERS))
def test_fuzz_label_csv(reader: str, tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    strategy, target = CSV_READERS[reader](tmp_path)
    n = fuzz(f"csv-{reader}", strategy, target, examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# a prepared bench (datasets_prep.common): manifest.csv, prepare.json and skipped.csv read back by
# verified_bench; a killed preparation's staging folder (journal.jsonl, prepare.json) resumed by
# write_bench
# ---------------------------------------------------------------------------------------
BENCH = "Fuzz"
FINGERPRINT = "fuzz-fingerprint"
_PLACES = (("train", "good"), ("valid", "good"), ("test", "good"), ("test", "Ungood"), None, ("test", "Ungood"))
"""The jobs of the tiny bench: one image each (None: an input the job skips with a DataError)."""


def _bench_jobs(fail_at: int | None = None) -> tuple[list[Any], Callable[[int], list[Any]]]:
    """The tiny bench's jobs and job function (``fail_at``: that job raises, as a kill would stop it)."""
    from bmad.errors import DataError
    from datasets_prep.common import Job, Output, mask_png, png_bytes

    def fn(i: int) -> list[Output]:
        if i == fail_at:
            raise RuntimeError("stopped on purpose")
        if _PLACES[i] is None:
            raise DataError(f"src/{i}.png: unreadable on purpose")
        split, label = _PLACES[i]
        pixels = np.arange(20, dtype=np.uint8).reshape(4, 5) * (i + 1)
        mask = mask_png(pixels > 30) if label == "Ungood" else None
        return [Output(split, label, f"{i}.png", png_bytes(pixels), mask, patient=f"p{i}", source=f"src/{i}.png")]

    return [Job(f"src/{i}.png", f"src/{i}.png", i) for i in range(len(_PLACES))], fn


def _prepare(out: Path, fail_at: int | None = None, overwrite: bool = False) -> Any:
    from datasets_prep.common import write_bench

    jobs, fn = _bench_jobs(fail_at)
    return write_bench(out, BENCH, jobs, fn, fingerprint=FINGERPRINT, overwrite=overwrite, progress=False)


def _bench_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _bench_seeds(work: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """The tiny bench prepared (``work/clean/Fuzz``), a staging folder left by a preparation
    stopped at its last job (``work/killed/.Fuzz.partial``), and the clean bench's files."""
    from datasets_prep.common import JOURNAL

    _prepare(work / "clean")
    with pytest.raises(RuntimeError, match="on purpose"):
        _prepare(work / "killed", fail_at=len(_PLACES) - 1)
    stage = work / "killed" / f".{BENCH}.partial"
    assert len((stage / JOURNAL).read_text().splitlines()) == len(_PLACES) - 1
    return work / "clean" / BENCH, stage, _bench_files(work / "clean" / BENCH)


@st.composite
def _manifest_rows(draw: st.DrawFn, manifest: str) -> tuple[bytes, tuple[str, ...]]:
    """``manifest`` with one cell of one row set to a path that escapes the bench, an odd split
    or label, an empty or a wrong hash."""
    rows = list(csv.reader(io.StringIO(manifest)))
    i = draw(st.integers(1, len(rows) - 1))
    j = draw(st.integers(0, len(rows[0]) - 1))
    rows[i][j] = draw(st.sampled_from(ESCAPES + ("bogus", "", "0" * 64, rows[1][j])))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode(), (f"row {i} {rows[0][j]}={rows[i][j]!r}",)


FORGED = "checksum redone"
"""Marks a journal line edited and given the checksum of its new content, as a forger would: its
content is then trusted where it is consistent (files inside the bench that verify), so the bench
may differ from the clean one (another job's outcome under this job's key, another patient
name), but it must be a bench whose every file verifies, inside its folder."""
ESCAPES = ("../escape.png", "../../etc/passwd", "/etc/passwd", "train/good/img/../../../x.png", "train\\..\\..\\x",
           "train/good/img/\0.png", "x" * 300, "./train/good/img/0.png", "train//good/img/0.png")
"""Paths that leave the bench folder, or are not the plain relative paths bmad writes."""


def _signed(entry: Any) -> Any:
    """A journal entry with the sha256 of its content as the writer computes it (a forger's
    line), so that what it holds is checked, not just its checksum; non-entries as they are."""
    if not isinstance(entry, dict):
        return entry
    content = {k: v for k, v in entry.items() if k != "sha256"}
    return {**content, "sha256": hashlib.sha256(json.dumps(content).encode()).hexdigest()}


@st.composite
def _forged_journal(draw: st.DrawFn, journal: str) -> tuple[bytes, tuple[str, ...]]:
    """``journal`` with a line replaced or added: a real entry whose row points outside the
    bench, whose files are not listed, or whose key is another job's; its checksum redone or not."""
    lines = journal.splitlines()
    entry = json.loads(draw(st.sampled_from(lines)))
    edits = []
    if entry["rows"]:
        field = draw(st.sampled_from(("path", "mask", "split", "label", "sha256")))
        entry["rows"][0][field] = draw(st.sampled_from(ESCAPES + ("bogus", "")))
        edits.append(f"rows[0].{field}={entry['rows'][0][field]!r}")
    entry["files"] = draw(st.sampled_from(({}, entry["files"], {"../outside.png": "0" * 64},
                                           {**entry["files"], "../../outside.png": "0" * 64})))
    key = draw(st.sampled_from((entry["key"], "src/5.png", "src/0.png")))
    edits.append(f"files={list(entry['files'])} key {entry['key']} -> {key}")
    entry["key"] = key
    signed = draw(st.booleans())
    if signed:
        edits.append(FORGED)
    line = json.dumps(_signed(entry) if signed else entry)
    if draw(st.booleans()):
        lines[draw(st.integers(0, len(lines) - 1))] = line
    else:
        lines.append(line)
    return ("\n".join(lines) + "\n").encode(), tuple(edits)


def _bench_inputs(final: Path, stage: Path) -> st.SearchStrategy[tuple[str, Mutant, bool]]:
    """(where: "final" | "stage", the file's mutated bytes as a Mutant named by the file, whether
    to give prepare.json the mutated manifest's sha256 (a forged state))."""
    from datasets_prep.common import JOURNAL, SKIPPED, STATE

    def seeds(folder: Path, names: tuple[str, ...]) -> list[Seed]:
        return [Seed(n, (folder / n).read_bytes(), Path(n).suffix) for n in names]

    def wrap(where: str, name: str, sha: bool) -> Callable[[tuple[bytes, tuple[str, ...]]], tuple[str, Mutant, bool]]:
        return lambda got: (where, Mutant(got[0], name, Path(name).suffix, got[1]), sha)

    manifest = (final / "manifest.csv").read_text()
    journal = (stage / JOURNAL).read_text()
    entries = [json.loads(line) for line in journal.splitlines()]
    journal_tree = st.tuples(st.sampled_from(range(len(entries))), st.booleans()).flatmap(
        lambda t: json_mutated(entries[t[0]]).map(
            lambda got, i=t[0], sign=t[1]: ("\n".join(json.dumps(e) if k != i else dumps(_signed(got[0]) if sign else got[0])
                                                     for k, e in enumerate(entries)).encode() + b"\n",
                                           got[1] + ((FORGED,) if sign else ()))))
    deep = st.sampled_from((10, 999, 10**5)).map(lambda d: (deep_json(d).encode() + b"\n", (f"deep {d}",)))
    return st.one_of(
        st.tuples(st.just("final"), mutated(seeds(final, ("manifest.csv", STATE, SKIPPED)), header=256), st.booleans()),
        _manifest_rows(manifest).map(wrap("final", "manifest.csv", True)),
        deep.map(wrap("final", STATE, False)),
        st.tuples(st.just("stage"), mutated(seeds(stage, (JOURNAL, STATE)), header=256), st.just(False)),
        journal_tree.map(wrap("stage", JOURNAL, False)),
        _forged_journal(journal).map(wrap("stage", JOURNAL, False)),
        deep.map(wrap("stage", STATE, False)),
        deep.map(lambda got: (got[0] * 2 + journal.encode(), got[1])).map(wrap("stage", JOURNAL, False)),
    )


def _inside_folder(folder: Path, rel: str) -> bool:
    return (folder / rel).resolve().is_relative_to(folder.resolve())


def _check_bench(work: Path, final: Path, stage: Path, clean: dict[str, bytes]) -> Callable[[tuple[str, Mutant, bool]],
                                                                                          None]:
    from bmad.fsutil import sha256_file
    from bmad.reorganizer import MANIFEST_COLUMNS
    from datasets_prep.common import LABELS, SPLITS, STATE, verified_bench

    out = work / "out"

    def target(value: tuple[str, Mutant, bool]) -> None:
        where, m, forge = value
        shutil.rmtree(out, ignore_errors=True)
        folder = out / (BENCH if where == "final" else f".{BENCH}.partial")
        shutil.copytree(final if where == "final" else stage, folder)
        (folder / m.seed).write_bytes(m.data)
        if forge and m.seed == "manifest.csv":  # prepare.json made to vouch for the edited manifest
            text = (folder / m.seed).read_bytes().decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
            state = json.loads(clean[STATE])
            state["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            (folder / STATE).write_text(json.dumps(state))
        kept = None
        if where == "final":
            kept = verified_bench(folder, FINGERPRINT)  # None: not trusted (rebuilt); never an exception
            TALLY["read" if kept is not None else "refused"] += 1
            if kept is not None:
                rows = list(csv.DictReader(io.StringIO((folder / "manifest.csv").read_text())))
                assert rows and all(set(r) == set(MANIFEST_COLUMNS) for r in rows)
                for r in rows:
                    assert _inside_folder(folder, r["path"]) and sha256_file(folder / r["path"]) == r["sha256"], r
                    assert r["mask"] == "" or (_inside_folder(folder, r["mask"]) and (folder / r["mask"]).is_file())
                assert set(kept.counts) <= {(s, lab) for s in SPLITS for lab in LABELS} and kept.text()
                assert sum(kept.counts.values()) == len(rows)
                assert all(isinstance(v, str) for s in kept.skipped for v in s) and len(kept.skipped[0]) == 2
            elif not m.edits:
                pytest.fail(f"the clean bench's {m.seed} itself is not trusted")
        # preparing again (resuming the staging folder, or replacing an untrusted bench) gives the clean bench
        summary = _prepare(out, overwrite=True)
        if where == "stage":
            TALLY["read" if summary.reused else "refused"] += 1
            assert summary.reused or m.edits, "the journal of the clean stage was not used"
        got = _bench_files(out / BENCH)
        if FORGED in m.edits:
            assert verified_bench(out / BENCH, FINGERPRINT) is not None
            listed = {r[k] for r in csv.DictReader(io.StringIO(got["manifest.csv"].decode())) for k in ("path", "mask")}
            assert set(got) - {"manifest.csv", STATE, "skipped.csv"} <= listed, sorted(got)
            return
        if kept is not None and forge:  # a forged state that vouches for a manifest whose files verify is kept
            got.pop("manifest.csv"), got.pop(STATE)
            assert got == {k: v for k, v in clean.items() if k not in ("manifest.csv", STATE)}
        else:
            assert got == clean, sorted(set(got.items()) ^ set(clean.items()))[:4]
        assert not any(p.name.startswith(".") for p in out.iterdir()), list(out.iterdir())

    return target


def test_fuzz_prepared_bench(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    final, stage, clean = _bench_seeds(tmp_path / "seeds")
    n = fuzz("bench", _bench_inputs(final, stage), _check_bench(tmp_path, final, stage, clean), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# split lists: DDAD's VinDr-CXR repartition file (datasets_prep.vindr.read_split), shipped
# and user-supplied (--split-file)
# ---------------------------------------------------------------------------------------
def _json_inputs(seed: str, doc: Any, data: bytes) -> st.SearchStrategy[Mutant]:
    """JSON files: the seed's bytes mutated, its tree edited (:func:`json_mutated`), any JSON
    value, or arrays nested deeper than Python's recursion limit."""
    return st.one_of(
        mutated([Seed(seed, data, ".json")]),
        json_mutated(doc).map(lambda got: Mutant(dumps(got[0]).encode("utf-8", "surrogatepass"), seed, ".json",
                                                 got[1])),
        json_values().map(lambda v: Mutant(dumps(v).encode("utf-8", "surrogatepass"), "json_values", ".json",
                                           ("generated",))),
        st.sampled_from((10, 999, 5000, 10**5)).map(lambda d: Mutant(deep_json(d).encode(), "deep_json", ".json",
                                                                     (f"depth {d}",))),
    )


def _check_split(work: Path) -> Callable[[Mutant], None]:
    from datasets_prep import vindr

    def target(m: Mutant) -> None:
        path = _write(work, m)
        shipped = outcome(lambda: vindr.read_split(path, sha256=vindr.SPLIT_SHA256), path)
        assert (shipped is not None) == (m.data == vindr.SPLIT_FILE.read_bytes()), m
        groups = outcome(lambda: vindr.read_split(path), path)
        if groups is None:
            assert m.edits, "the shipped split file itself is not read"
            return
        assert list(groups) == list(vindr.GROUPS)
        ids = [i for g in groups.values() for i in g]
        assert all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids)
        available = set(ids[::3])
        plan = vindr.plan_split(groups, available, valid_per_label=5, seed=1)
        assert set(plan.assign) <= available
        assert set(plan.assign.values()) <= {(s, lab) for s in ("train", "valid", "test") for lab in ("good", "Ungood")}

    return target


def test_fuzz_split_files(tmp_path: Path, examples: int, record_property: Callable[[str, Any], None]) -> None:
    from datasets_prep import vindr

    data = vindr.SPLIT_FILE.read_bytes()
    strategy = _json_inputs(vindr.SPLIT_FILE.name, json.loads(data), data)
    n = fuzz("split", strategy, _check_split(tmp_path), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# run records (bmad.records) and what reads them: `bmad leaderboard` in its variants; the
# reference file of --compare (bmad.compare, user-supplied with --references)
# ---------------------------------------------------------------------------------------
LEADERBOARD_ARGS = (("--format", "md"), ("--format", "latex"), ("--format", "csv"), ("--format", "html"),
                    ("--stats",), ("--stats", "--test", "wilcoxon"), ("--bootstrap", "100", "--efficiency"),
                    ("--compare", "all", "--compare-missing"), ("--transfer",),
                    ("--metric", "image_auroc,aupro", "--format", "csv"))
"""`bmad leaderboard` variants the fuzzed records go through (one drawn per input)."""


@pytest.fixture(scope="module")
def made_records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with records written by bmad's runner: three ok seeds and a failed run
    of a tiny algorithm (registered here) on a tiny bench."""
    from bmad.algorithm import Algorithm, Prediction, batch_images
    from bmad.registry import algorithms
    from bmad.runner import RunSpec, Sweep, SweepOptions
    from tests.conftest import make_bench

    class FuzzMean(Algorithm):
        """Distance to the mean training image."""

        family = "toy"
        pixel_level = True
        channels = 1

        def __init__(self, fail: bool = False) -> None:
            self.fail = fail

        def fit(self, train: Any, val: Any = None) -> None:
            if self.fail:
                raise RuntimeError("failed on purpose")
            images = [batch_images(b).float() for b in train]
            self.mean = sum(x.sum(0) for x in images) / sum(len(x) for x in images)

        def predict_map(self, images: Any) -> Prediction:
            maps = (images - self.mean).abs().mean(1)
            return Prediction(maps.flatten(1).max(1).values, maps)

    algorithms.add("fuzz_mean", FuzzMean)
    root = tmp_path_factory.mktemp("records")
    bench = make_bench(root / "Toy", n_train=4, n_valid=(1, 1), n_test=(3, 3), size=16)
    sweep = Sweep(SweepOptions(results=root / "results", random_init=True, progress=False, verbose=False,
                               save_maps=2))
    for seed, params in ((0, None), (1, None), (2, None), (3, {"fail": True})):
        out = sweep.run_one(RunSpec(f"folder:{bench}", "fuzz_mean", seed, params=params))
        assert out.status == ("failed" if params else "ok"), out.error
    algorithms.names()  # every built-in algorithm loaded here, not in each fuzzing process (--compare needs them)
    return root / "results"


def _record_seeds(results: Path) -> tuple[Path, Path]:
    from bmad.records import read_record

    paths = sorted(results.rglob("seed*.json"))
    ok = next(p for p in paths if read_record(p)["status"] == "ok")
    failed = next(p for p in paths if read_record(p)["status"] == "failed")
    return ok, failed


def _check_records(work: Path, results: Path) -> Callable[[tuple[Mutant, tuple[str, ...]]], None]:
    from contextlib import redirect_stderr, redirect_stdout

    from bmad.cli import main
    from bmad.records import read_record

    res = work / "results"
    shutil.copytree(results, res)
    path = res / "runs" / "fuzzed" / "fuzz_mean" / "0123456789ab" / "seed0.json"
    path.parent.mkdir(parents=True)

    def target(value: tuple[Mutant, tuple[str, ...]]) -> None:
        m, args = value
        path.write_bytes(m.data)
        reason = None
        try:
            rec = read_record(path)
            TALLY["read"] += 1
        except ValueError as exc:  # the contract: a bad record is a ValueError with the reason
            reason = str(exc)
            assert reason, "a refusal without a reason"
            TALLY["refused"] += 1
        if not m.edits:
            assert reason is None, f"the record {m.seed} itself is not read: {reason}"
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["leaderboard", "--results", str(res), *args])
        skipped = [line for line in err.getvalue().splitlines() if line.startswith("bmad: skipped ")]
        assert skipped == ([f"bmad: skipped {path}: {reason}"] if reason else []), skipped
        if args[0] == "--transfer":  # the good records are no cross-bench runs
            assert code == 0 or (code == 2 and "no cross-bench runs" in err.getvalue()), err.getvalue()
        else:
            assert code == 0 and "fuzz" in out.getvalue(), err.getvalue()
        if reason is None:
            assert rec["status"] in ("ok", "failed")

    return target


RECORD_PARTS = ("config", "data", "env", "history", "sizes", "run", "map_sample", "train_bench", "started", "error",
                "failure", "timing", "memory", "params", "sweep", "shots")
"""Parts of a record that the leaderboards read or show and the validation checks little or not at all."""


@st.composite
def _record_parts(draw: st.DrawFn, rec: dict[str, Any]) -> Mutant:
    """A record with one of its :data:`RECORD_PARTS` edited (most such records are valid: the
    leaderboards must take whatever they hold)."""
    key = draw(st.sampled_from(RECORD_PARTS))
    part, edits = draw(json_mutated(rec.get(key, {})))
    return Mutant(dumps({**rec, key: part}).encode("utf-8", "surrogatepass"), f"seed{rec['seed']}.json", ".json",
                  tuple(f"{key}: {e}" for e in edits))


def test_fuzz_run_records(made_records: Path, tmp_path: Path, examples: int,
                          record_property: Callable[[str, Any], None]) -> None:
    ok, failed = _record_seeds(made_records)
    records = st.one_of(_json_inputs(ok.name, json.loads(ok.read_bytes()), ok.read_bytes()),
                        _json_inputs(failed.name, json.loads(failed.read_bytes()), failed.read_bytes()),
                        _record_parts(json.loads(ok.read_bytes())), _record_parts(json.loads(ok.read_bytes())))
    strategy = st.tuples(records, st.sampled_from(LEADERBOARD_ARGS))
    n = fuzz("records", strategy, _check_records(tmp_path, made_records), examples, tmp_path)
    _report(record_property, n, examples)


COMPARED = (("brats2021", "patchcore", None), ("brats2021", "lerec", None), ("brainmri", "patchcore", 4),
            ("brainmri", "mediclip", 16))
"""Rows (bench, algorithm, shots) of the leaderboards compared with the fuzzed reference file:
ones the shipped file has entries for (variants with their configuration, few-shot entries)."""


def _check_references(work: Path, results: Path) -> Callable[[Mutant], None]:
    from bmad.compare import add_comparison, load_references
    from bmad.leaderboard import FORMATS, build_tables, render
    from bmad.records import load_records

    good = [r for r in load_records(results).records if r["status"] == "ok"]
    records = [{**r, "bench": bench, "algo": algo, "shots": shots, "config_hash": f"{algo}{shots}"}
               for bench, algo, shots in COMPARED for r in good]

    def target(m: Mutant) -> None:
        path = _write(work, m)
        refs = outcome(lambda: load_references(path), path)
        if refs is None:
            assert m.edits, "the shipped reference file itself is not read"
            return
        for missing in (False, True):
            tables = build_tables(records)
            legend = add_comparison(tables, refs, list(refs.sources), missing=missing)
            for fmt in FORMATS:
                assert render(tables, fmt, legend)

    return target


def test_fuzz_reference_file(made_records: Path, tmp_path: Path, examples: int,
                             record_property: Callable[[str, Any], None]) -> None:
    from bmad.compare import default_reference_file

    data = default_reference_file().read_bytes()
    strategy = _json_inputs("reference_results.json", json.loads(data), data)
    n = fuzz("references", strategy, _check_references(tmp_path, made_records), examples, tmp_path)
    _report(record_property, n, examples)


# ---------------------------------------------------------------------------------------
# the failures fuzzing found, one small input each (fast, in the default selection)
# ---------------------------------------------------------------------------------------
def _bomb_jpeg(path: Path) -> Path:
    """A 16 x 16 JPEG whose header says 13,000 x 13,000 pixels (under Pillow's error threshold)."""
    data = bytearray(_image_bytes(np.zeros((16, 16, 3), np.uint8), "JPEG"))
    i = data.find(b"\xff\xc0")
    data[i + 5: i + 9] = struct.pack(">HH", 13_000, 13_000)
    path.write_bytes(data)
    return path


def _refused(call: Callable[[], Any], *words: str) -> None:
    with pytest.raises(BmadError) as info:
        call()
    assert all(w in str(info.value) for w in words), str(info.value)


def _regress_decompression_bomb(work: Path) -> None:
    from bmad import images
    from datasets_prep import busi, common, resc

    path = _bomb_jpeg(work / "bomb.jpg")
    for read in (images.read_image, resc.read_gray, common.decode_gray, busi.read_mask):
        _refused(lambda read=read: read(path), "13000x13000", "bomb.jpg")


def _regress_nan_tiff(work: Path) -> None:
    from bmad import images

    path = work / "nan.tif"
    path.write_bytes(_image_bytes(np.array([[0.5, np.nan], [np.inf, 0.1]], np.float32), "TIFF"))
    _refused(lambda: images.read_image(path), "NaN", "nan.tif")


def _regress_nifti_header(work: Path) -> None:
    import nibabel as nib

    from datasets_prep import brats2021, liver

    payload = bytearray(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)).to_bytes())
    negative, huge = bytearray(payload), bytearray(payload)
    struct.pack_into("<h", negative, 42, -4)  # dim[1]
    struct.pack_into("<hhh", huge, 42, 32767, 32767, 32767)  # 70 TB of voxels in a 400-byte file
    for name, data in (("negative.nii", negative), ("huge.nii", huge), ("huge.nii.gz", gzip_bytes(bytes(huge)))):
        path = work / name
        path.write_bytes(data)
        _refused(lambda path=path: brats2021._load(path), name)
        _refused(lambda path=path: liver.Volume(path, "--raw"), name)


def _regress_dicom_size(work: Path) -> None:
    from datasets_prep.dicom import read_dicom_8bit, write_dicom

    path = write_dicom(work / "big.dcm", np.zeros((8, 8), np.uint16), uid_seed="big")
    data = bytearray(path.read_bytes())
    for f in dicom_fields(bytes(data)):
        if f.size:
            struct.pack_into(f.fmt, data, f.offset, 65535)
    path.write_bytes(data)
    _refused(lambda: read_dicom_8bit(path), "big.dcm", "bytes bmad decodes")


def _regress_slide_levels(work: Path) -> None:
    from datasets_prep import wsi

    seed = next(s for s in _slide_seeds(work) if s.name == "pyramid-jpeg.tif")
    data = bytearray(seed.payload)
    last = max(int(f.name[4:].split(".")[0]) for f in seed.fields)
    width = next(f for f in seed.fields if f.name == f"page{last}.width")
    struct.pack_into(width.fmt, data, width.offset, 112_308_703)  # the smallest level becomes a 112 M x 63 level 0
    path = work / "levels.tif"
    path.write_bytes(data)

    def read() -> None:
        with wsi.open_slide(path) as slide:
            wsi.saturation_thumbnail(slide, 16, path=path)

    _refused(read, "levels.tif", "corrupt size")


def _regress_asap_xml(work: Path) -> None:
    from datasets_prep import camelyon16, wsi

    for name, text in XML_ATTACKS.items():
        path = work / f"{name}.xml"
        path.write_text(text)
        _refused(lambda path=path: wsi.parse_asap_xml(path), "document type declaration", path.name)
    path = work / "encoding.xml"
    path.write_bytes(b'<?xml version="1.0" encoding="shift_jis"?><ASAP_Annotations/>')
    _refused(lambda: wsi.parse_asap_xml(path), "encoding.xml", "not well-formed")
    square = [(0.0, 0.0), (2e9, 0.0), (2e9, 2e9), (0.0, 2e9)]
    path.write_text(wsi.asap_xml([("Tumor", [(0.0, 0.0), (1e300, 0.0), (0.0, 1e300)])]))
    _refused(lambda: wsi.parse_asap_xml(path), "beyond")
    path.write_text(wsi.asap_xml([("Tumor", square)]))  # a tumour far larger than its slide: a grid of the slide only
    assert len(camelyon16.tumour_origins(wsi.parse_asap_xml(path), 1024, 768)) == 12


def _regress_label_csvs(work: Path) -> None:
    from datasets_prep import brainmri, camelyon16, chexpert, rsna, vindr

    huge = "a" * 140_000
    path = work / "labels.csv"
    for header, read in ((",".join(rsna.COLUMNS), rsna.read_classes), ("", camelyon16.read_reference),
                         (",".join(chexpert.HEADER), lambda p: chexpert.read_table(p, "train"))):
        path.write_text(f"{header}\n{huge},x\n")
        _refused(lambda read=read: read(path), "labels.csv", "field larger than field limit")
    (work / vindr.KAGGLE_LABELS).write_text(f"image_id,class_name\na,No finding,extra,cells\nb,{huge}\n")
    _refused(lambda: vindr.read_labels(work), "train.csv", "field larger")
    (work / vindr.KAGGLE_LABELS).write_text("image_id,class_name\na,No finding,extra,cells\nb\n")
    assert vindr.read_labels(work) == (work / vindr.KAGGLE_LABELS, {"a": "good", "b": "Ungood"})
    (work / brainmri.DUPLICATES).write_text(f"group,source\n1,{huge}\n")
    assert brainmri.read_duplicates(work) is None
    (work / brainmri.DUPLICATES).write_text("group,source,split\n1\n")
    assert brainmri.read_duplicates(work) is None


def _regress_prepared_bench(work: Path) -> None:
    from datasets_prep.common import JOURNAL, SKIPPED, STATE, verified_bench

    final, stage, clean = _bench_seeds(work / "seeds")
    out = work / "out"
    # a journal line (checksum redone) whose row points outside the bench: not used, the job is redone
    lines = (stage / JOURNAL).read_text().splitlines()
    entry = json.loads(lines[0])
    entry["rows"][0]["path"] = "../escape.png"
    entry["files"] = {}
    shutil.copytree(stage, out / stage.name)
    (out / stage.name / JOURNAL).write_text("\n".join([json.dumps(_signed(entry)), *lines[1:]]) + "\n")
    summary = _prepare(out)
    assert summary.reused == len(lines) - 1 and _bench_files(out / BENCH) == clean
    # an edited skipped.csv, a deep prepare.json, a path too long for the file system: not trusted
    for name, data in ((SKIPPED, b"source,reason\n"), (STATE, deep_json(10**5).encode()),
                       ("manifest.csv", clean["manifest.csv"].replace(b"test/good/img/2.png", b"x" * 300))):
        shutil.rmtree(out)
        shutil.copytree(final, out / BENCH)
        (out / BENCH / name).write_bytes(data)
        if name == "manifest.csv":
            state = json.loads(clean[STATE])
            state["manifest_sha256"] = hashlib.sha256(data).hexdigest()
            (out / BENCH / STATE).write_text(json.dumps(state))
        assert verified_bench(out / BENCH, FINGERPRINT) is None, name


def _regress_records(work: Path) -> None:
    from bmad.records import read_record

    base = {"bench": "b", "algo": "a", "seed": 0, "shots": None, "config": {}, "config_hash": "h", "status": "ok",
            "metrics": {"image_auroc": 0.5}}
    for extra, words in (({"per_image": {"scores": [0.1, 0.2], "labels": [[0], 1]}}, "0/1"),
                         ({"timing": {"fit_s": 10**400}}, "timing.fit_s"),
                         ({"per_image": {"scores": [10**400, 0.2], "labels": [0, 1]}}, "finite")):
        path = work / "seed0.json"
        path.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ValueError, match=words):
            read_record(path)


def _regress_json_files(work: Path) -> None:
    from bmad.compare import default_reference_file, load_references
    from datasets_prep import vindr

    path = work / "deep.json"
    path.write_text(deep_json(10**5))
    _refused(lambda: vindr.read_split(path), "deep.json", "RecursionError")
    _refused(lambda: load_references(path), "deep.json")
    doc = json.loads(default_reference_file().read_text())
    for edit, words in ((lambda d: d["entries"][0].update(shots="4"), "shots '4'"),
                        (lambda d: d["entries"][0].update(variant=["x"]), "'variant' must be"),
                        (lambda d: d["entries"][0].update(config={"k": {"one_of": 3}}), "one_of"),
                        (lambda d: d["sources"].update(extra=[1]), "object of objects")):
        bad = json.loads(json.dumps(doc))
        edit(bad)
        path.write_text(json.dumps(bad))
        _refused(lambda: load_references(path), "deep.json", words)


REGRESSIONS = {
    "decompression-bomb": _regress_decompression_bomb, "nan-tiff": _regress_nan_tiff,
    "nifti-header": _regress_nifti_header, "dicom-size": _regress_dicom_size, "slide-levels": _regress_slide_levels,
    "asap-xml": _regress_asap_xml,
    "label-csvs": _regress_label_csvs, "prepared-bench": _regress_prepared_bench, "records": _regress_records,
    "json-files": _regress_json_files,
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_fuzz_finding_stays_fixed(name: str, tmp_path: Path) -> None:
    """Each failure class the fuzzing found, on one small input: read correctly or refused with bmad's error."""
    warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the header is checked before decoding
    REGRESSIONS[name](tmp_path)
