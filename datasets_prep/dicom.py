"""One DICOM image -> 8-bit grayscale pixels, the way a viewer would display it.

:func:`read_dicom_8bit` is shared by the reorganizers that read DICOM (``rsna``).
It reads one single-frame image with pydicom 3 and applies, in the order of the
DICOM grayscale pipeline (PS3.4 N.2.1):

1. decoding: native transfer syntaxes directly, compressed ones through
   pydicom's decoder plugins (``pylibjpeg`` + ``pylibjpeg-libjpeg`` for JPEG
   baseline/extended/lossless and JPEG-LS, ``pylibjpeg-openjpeg`` for JPEG 2000
   and HTJ2K, pydicom's own or ``pylibjpeg-rle`` for RLE). When pylibjpeg can
   decode the syntax it is used first, so the pixels of lossy files do not depend
   on whether Pillow or GDCM is installed too. Signed data and Bits Stored < Bits
   Allocated are handled by pydicom; a High Bit other than Bits Stored - 1 (the
   retired "bits not at the bottom" layout of native data) is shifted down here.
2. Modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence
   (``pydicom.pixels.apply_modality_lut``).
3. VOI LUT: a VOI LUT Sequence, else the first Window Center/Width (with its VOI
   LUT Function: LINEAR, LINEAR_EXACT or SIGMOID), via
   ``pydicom.pixels.apply_voi_lut``. Its output range (the LUT's smallest to
   largest entry; the window's full output range) is mapped to 0..255.
   Without a VOI transform: data of at most 8 stored bits keep their values (the
   whole stored range, through the Modality LUT, maps to 0..255: for 8-bit
   unsigned data without rescale the pixels are unchanged), deeper data are
   stretched from their minimum to their maximum (pixels equal to Pixel Padding
   Value excluded from the range).
4. MONOCHROME1 is inverted (255 - v), so bone and other dense tissue is bright as
   in MONOCHROME2. Presentation LUT Shape is not applied: in DX/CR files
   ``INVERSE`` accompanies MONOCHROME1 and means this same inversion.

Colour images (RGB, and YBR_* which pydicom and the codecs convert to RGB) are
scaled to 8 bits over their stored range and turned to gray with the ITU-R BT.601
luma weights (0.299 R + 0.587 G + 0.114 B, as Pillow's ``convert("L")``).

:func:`write_dicom` writes a single-frame DICOM file (native, RLE, JPEG baseline or
JPEG 2000 lossless), for synthetic raw sets and tests.

Everything that cannot give one such image raises :class:`bmad.errors.DataError`
naming the file: not a DICOM file, a truncated or corrupt one, no Pixel Data,
multi-frame, an unsupported photometric interpretation (e.g. PALETTE COLOR), or a
transfer syntax that no installed plugin decodes (the message names the pip
packages that would).
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import numpy as np

from bmad.errors import DataError

log = logging.getLogger(__name__)

PREFERRED_PLUGIN = "pylibjpeg"
"""Tried first when it can decode the transfer syntax (then pydicom's own order)."""

LUMA = (0.299, 0.587, 0.114)

_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
RECOMMENDED_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless, First-Order Prediction
    "1.2.840.10008.1.2.4.80": _LIBJPEG,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE Lossless
}
"""pip packages (space separated) that decode each compressed transfer syntax through pydicom."""

PIP_NAMES = {"gdcm": "python-gdcm", "pil": "pillow"}
"""Python distribution names in pydicom's dependency messages -> pip package names."""

CONVERT_HINT = ("decompress it first, e.g. `gdcmconv --raw IN.dcm OUT.dcm` (GDCM) or `dcmconv +te IN.dcm OUT.dcm` "
                "(DCMTK), or move the file out of the raw folder")

MAX_FRAME_BYTES = 2**28
"""The largest decoded frame read (256 MiB; the largest radiographs and mammograms take about 45 MB):
checked before decoding, so a corrupt Rows/Columns cannot make a decoder allocate gigabytes."""

_NOT_DECODER_ERRORS = (KeyboardInterrupt, SystemExit, GeneratorExit)
"""BaseExceptions that are not a decoder failing (a Rust decoder's panic is a BaseException too)."""


def read_dicom_8bit(path: str | os.PathLike) -> np.ndarray:
    """The displayed image of a single-frame DICOM file as uint8 [H, W] (see the module docs).

    Raises :class:`DataError` naming ``path`` when the file is not a DICOM image this
    function can turn into one gray image.
    """
    path = Path(path)
    ds = read_dataset(path)
    arr = decode_pixels(ds, path)
    try:
        return to_8bit(arr, ds, path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUTs and headers raise many kinds
        raise DataError(f"cannot convert the pixels of {path} to 8 bits: {type(exc).__name__}: {exc}",
                        hint=_bad_file_hint(path)) from exc


def _bad_file_hint(path: Path) -> str:
    return f"re-download or re-extract {path.name}, or move it out of the raw folder"


_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little and big endian


def read_dataset(path: Path):  # -> pydicom.dataset.FileDataset
    """Read ``path`` with pydicom and check it holds one frame of pixel data.

    A file without the DICM preamble is accepted when it parses as a dataset with
    Rows, Columns and Pixel Data (old ACR-NEMA style files); its transfer syntax is
    then taken from how it was encoded.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file", hint="check the raw folder")
    try:
        # parsed from memory: a corrupt length field then reads at most what the file holds, where a
        # file object would first allocate the gigabytes it claims
        data = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        ds = None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise EOFError, OSError, ValueError...
        raise DataError(f"cannot read {path} as DICOM: {type(exc).__name__}: {exc}", hint=_bad_file_hint(path)) \
            from exc
    if ds is None:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ok = all(k in ds for k in ("Rows", "Columns", "PixelData")) and int(ds.Rows) > 0
        except Exception:  # noqa: BLE001 - anything that does not parse is "not DICOM"
            ok = False
        if not ok:
            raise DataError(f"{path} is not a DICOM file (no 'DICM' header and no image dataset)",
                            hint=_bad_file_hint(path))
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            implicit, little = ds.original_encoding
            ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            )
    ds.filename = str(path)
    if "PixelData" not in ds:
        if len(ds) == 0 or any(tag in data for tag in _PIXEL_DATA_TAGS):
            raise DataError(f"{path} is truncated or corrupt: its Pixel Data element could not be read",
                            hint=_bad_file_hint(path))
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"has {other[0]} (floating-point pixels), which is not supported" if other else "has no Pixel Data"
        raise DataError(f"{path} {what} (SOP class {ds.get('SOPClassUID', 'unknown')!s})",
                        hint="it is not an image; move it out of the raw folder")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if k not in ds]
    if missing:
        raise DataError(f"{path} lacks the image attribute(s) {', '.join(missing)}", hint=_bad_file_hint(path))
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise DataError(f"{path} has Number of Frames {ds.get('NumberOfFrames')!r}, not a number",
                        hint=_bad_file_hint(path)) from None
    if frames != 1:
        raise DataError(f"{path} is a multi-frame DICOM ({frames} frames); only single-frame images are supported",
                        hint="move it out of the raw folder, or split it into single frames first")
    if "TransferSyntaxUID" not in ds.file_meta:
        raise DataError(f"{path} has no Transfer Syntax UID in its file meta information",
                        hint=_bad_file_hint(path))
    return ds


def _parse_requirements(messages: list[str]) -> list[str]:
    """pydicom's "gdcm - requires gdcm>=3.0.10" lines -> ["pip install python-gdcm", ...]."""
    options = []
    for line in messages:
        _, _, reqs = line.partition(" - requires ")
        names = []
        for req in re.split(r",\s*|\s+and\s+", reqs):
            name = re.split(r"[<>=!~ ]", req.strip(), maxsplit=1)[0].lower()
            if name and name != "numpy":
                names.append(PIP_NAMES.get(name, name))
        if names:
            options.append(" ".join(names))
    return options


def missing_decoder_packages(uid: str, pydicom_messages: list[str] | None = None) -> list[str]:
    """pip package sets (each "a b") that would decode transfer syntax ``uid``, best first."""
    options = [RECOMMENDED_PACKAGES[uid]] if uid in RECOMMENDED_PACKAGES else []
    for opt in _parse_requirements(pydicom_messages or []):
        if opt not in options and not (options and set(opt.split()) <= set(options[0].split())):
            options.append(opt)
    return options


def decode_pixels(ds, path: Path) -> np.ndarray:
    """The decoded pixel array of ``ds`` (read from ``path``), as pydicom returns it."""
    from pydicom.pixels import get_decoder, pixel_array

    tsuid = ds.file_meta.TransferSyntaxUID
    name = f"{tsuid.name} ({tsuid})" if tsuid.name != tsuid else str(tsuid)
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise DataError(f"{path} uses transfer syntax {name}, which pydicom cannot decode with any plugin "
                        "(no pip package adds a decoder for it)", hint=CONVERT_HINT) from None
    if not decoder.is_available:
        options = missing_decoder_packages(str(tsuid), decoder.missing_dependencies)
        pkgs = " | ".join(f"pip install {o}" for o in options) or "a pydicom decoder plugin"
        raise DataError(f"{path} uses transfer syntax {name} and no installed package decodes it; "
                        f"it needs: {pkgs}", hint=f"install one of them ({pkgs}), or {CONVERT_HINT}")

    try:
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored") or bits_allocated)
        high_bit = int(ds.get("HighBit", bits_stored - 1))
        frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * -(-bits_allocated // 8)
    except Exception as exc:  # noqa: BLE001 - a corrupt element converts to a list, text or nothing
        raise DataError(f"{path} has malformed image attributes (Rows, Columns, Samples per Pixel, Bits Allocated, "
                        f"Bits Stored, High Bit): {type(exc).__name__}: {exc}", hint=_bad_file_hint(path)) from None
    if frame_bytes > MAX_FRAME_BYTES:
        raise DataError(f"{path} declares a {ds.Columns}x{ds.Rows} image of {frame_bytes:,} bytes, more than the "
                        f"{MAX_FRAME_BYTES:,} bytes bmad decodes", hint=_bad_file_hint(path))
    shift = high_bit + 1 - bits_stored if not tsuid.is_encapsulated else 0
    if shift < 0 or high_bit >= bits_allocated:
        raise DataError(f"{path} has inconsistent High Bit {high_bit} / Bits Stored {bits_stored} / "
                        f"Bits Allocated {ds.BitsAllocated}", hint=_bad_file_hint(path))
    if shift:
        ds.BitsStored = high_bit + 1  # decode up to the high bit, then drop the low bits below
    plugins = [PREFERRED_PLUGIN, ""] if PREFERRED_PLUGIN in decoder.available_plugins else [""]
    try:
        for i, plugin in enumerate(plugins):
            try:
                arr = pixel_array(ds, decoding_plugin=plugin)
                break
            except BaseException as exc:  # noqa: BLE001 - fall back to pydicom's other plugins, then report
                if isinstance(exc, _NOT_DECODER_ERRORS) or i == len(plugins) - 1:
                    raise
    except BaseException as exc:  # noqa: BLE001 - a Rust decoder (pylibjpeg-rle) panics with a BaseException
        if isinstance(exc, _NOT_DECODER_ERRORS):
            raise
        msg = " ".join(str(exc).split())
        raise DataError(f"cannot decode the pixel data of {path} ({name}): {type(exc).__name__}: {msg}",
                        hint=_bad_file_hint(path)) from exc
    finally:
        if shift:
            ds.BitsStored = bits_stored
    if shift:
        arr = np.right_shift(arr, shift)  # arithmetic for signed data: keeps the sign
    return arr


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo`` -> 0, ``hi`` -> 255, linear between (clipped, rounded half up); all 0 when lo == hi.

    ``hi < lo`` is allowed (pydicom's window output range runs downwards for a negative
    Rescale Slope): ``lo`` is black whichever way round.
    """
    if hi == lo or not (np.isfinite(lo) and np.isfinite(hi)):
        return np.zeros(values.shape, np.uint8)
    if values.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):
        return values.copy()  # 8-bit data shown as stored (the RSNA case): nothing to compute
    out = (np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo))
    return np.floor(np.clip(out, 0.0, 255.0) + 0.5).astype(np.uint8)


def _stored_range(ds) -> np.ndarray:
    """Every value the stored bits can hold."""
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.int64)
    return np.arange(0, 2**bits, dtype=np.int64)


def _has_voi_lut(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds) -> bool:
    return all(ds.get(k) not in (None, "") for k in ("WindowCenter", "WindowWidth"))


def _gray_to_8bit(arr: np.ndarray, ds, path: str | os.PathLike | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    if _has_voi_lut(ds):
        # a VOI LUT maps integers: round the Modality LUT's output
        ints = np.floor(np.asarray(values, np.float64) + 0.5).astype(np.int64) if values.dtype.kind == "f" else values
        item = ds.VOILUTSequence[0]
        n_entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        table = apply_voi_lut(np.arange(first, first + n_entries, dtype=np.int64), ds)
        return _scale(apply_voi_lut(ints, ds), float(table.min()), float(table.max()))
    if _has_window(ds):
        try:
            out = apply_voi_lut(np.asarray(values, np.float64), ds, prefer_lut=False)
        except ValueError as exc:  # width < 1, unknown VOI LUT Function: treat as no window
            log.warning("ignoring the window of %s: %s", path or ds.filename, exc)
        else:
            with np.errstate(over="ignore"):  # the output far below / far above the window: black / white
                ends = apply_voi_lut(np.array([-1e300, 1e300]), ds, prefer_lut=False)
            return _scale(out, float(ends[0]), float(ends[1]))
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if bits <= 8:
        span = apply_modality_lut(_stored_range(ds), ds)
        return _scale(values, float(span.min()), float(span.max()))
    keep = np.ones(arr.shape, bool)
    if "PixelPaddingValue" in ds:
        keep = arr != int(ds.PixelPaddingValue)
    if not keep.any():
        return np.zeros(arr.shape, np.uint8)
    return _scale(values, float(values[keep].min()), float(values[keep].max()))


def _color_to_gray(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    rgb8 = np.asarray(rgb, np.float64) * (255.0 / full_scale)
    gray = rgb8[..., 0] * LUMA[0] + rgb8[..., 1] * LUMA[1] + rgb8[..., 2] * LUMA[2]
    return np.floor(np.clip(gray, 0.0, 255.0) + 0.5).astype(np.uint8)


def to_8bit(arr: np.ndarray, ds, path: str | os.PathLike | None = None) -> np.ndarray:
    """Decoded pixels ``arr`` of dataset ``ds`` -> uint8 [H, W] (module docs, steps 2-4).

    ``path``: the file named in errors (default: ``ds.filename``).
    """
    pi = str(ds.PhotometricInterpretation).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if pi in ("MONOCHROME1", "MONOCHROME2") and samples == 1 and arr.ndim == 2:
        out = _gray_to_8bit(arr, ds, path)
        return 255 - out if pi == "MONOCHROME1" else out
    if (pi == "RGB" or pi.startswith("YBR_")) and arr.ndim == 3 and arr.shape[-1] == 3:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        return _color_to_gray(arr, float(2**bits - 1))
    raise DataError(f"{path or ds.filename}: photometric interpretation {pi!r} with {samples} sample(s) per pixel "
                    f"and pixel array shape {arr.shape} is not supported",
                    hint="only MONOCHROME1/2, RGB and YBR images can be converted; move it out of the raw folder")


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    jpeg_quality: int = 95,
    uid_seed: str | None = None,
    **elements: object,
) -> Path:
    """Write ``pixels`` (uint8/uint16/int16 [H, W], or uint8 [H, W, 3] RGB) as a DICOM file.

    The dataset is a Secondary Capture image with proper file meta information; Bits
    Allocated/Stored, High Bit and Pixel Representation follow ``pixels``' dtype and
    ``bits_stored``. ``transfer_syntax``: a native one (default Explicit VR Little
    Endian), RLE Lossless and JPEG 2000 Lossless (pydicom's encoders) or JPEG Baseline
    (8-bit, Pillow's encoder at ``jpeg_quality``, encapsulated). ``elements``: more
    attributes by keyword (e.g. ``RescaleSlope=2``, ``WindowCenter=40``, ``HighBit=15``),
    set after the defaults. UIDs derive from ``uid_seed`` (default: the file name), so
    the same call writes the same bytes.
    """
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    pixels = np.ascontiguousarray(pixels)
    tsuid = UID(transfer_syntax)
    seed = uid_seed if uid_seed is not None else path.name
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop"])
    meta.TransferSyntaxUID = tsuid
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
    ds.Modality = "OT"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape[:2])
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for key, value in elements.items():
        setattr(ds, key, value)
    if tsuid == JPEGBaseline8Bit:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=jpeg_quality)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        if pixels.ndim == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    elif tsuid.is_compressed:
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.compress(tsuid, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
