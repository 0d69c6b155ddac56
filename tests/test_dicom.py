"""datasets_prep.dicom: DICOM -> 8-bit gray pixels (grayscale pipeline, codecs, bad files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from bmad.errors import DataError
from datasets_prep.dicom import missing_decoder_packages, read_dicom_8bit, write_dicom
from tests.conftest import real_fixture


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR) to 0..255, written out here."""
    y = ((np.asarray(x, np.float64) - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(y, 0, 255)


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x - x.min()) / (x.max() - x.min()) * 255


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: float = 0.5 + 1e-6) -> None:
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert np.abs(actual.astype(np.float64) - expected).max() <= tol


def phantom16(shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    """A 12-bit ramp with a plateau: every value 0..4095 occurs."""
    ramp = np.linspace(0, 4095, shape[0] * shape[1]).reshape(shape)
    return np.round(ramp).astype(np.uint16)


# -- the grayscale pipeline ------------------------------------------------------------
def test_monochrome2_8bit_keeps_its_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(3, 251, (48, 40)).astype(np.uint8)  # not the full 0..255: must not be stretched
    out = read_dicom_8bit(write_dicom(tmp_path / "a.dcm", pixels))
    np.testing.assert_array_equal(out, pixels)


def test_monochrome1_16bit_comes_out_with_bone_bright(tmp_path: Path) -> None:
    # MONOCHROME1: low stored values are displayed white. Bone (spine, ribs) is stored low,
    # air in the lungs high, soft tissue in between.
    stored = np.full((64, 64), 30000, np.uint16)  # lungs
    stored[:, 28:36] = 4000  # spine
    stored[10:14, :] = 9000  # a rib
    stored[:, :4] = 18000  # soft tissue
    out = read_dicom_8bit(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    assert out[32, 32] == 255 and out[40, 10] == 0  # spine white, lung black
    assert out[40, 32] > out[12, 10] > out[40, 2] > out[40, 10]
    assert_close(out, 255 - minmax(stored))


def test_12bit_in_16_with_rescale_and_window(tmp_path: Path) -> None:
    stored = phantom16()
    path = write_dicom(tmp_path / "ct.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=[1000, 40], WindowWidth=[2000, 400])
    out = read_dicom_8bit(path)
    hu = stored.astype(np.float64) * 2 - 1024
    assert_close(out, linear_window(hu, 1000, 2000), tol=1.0)  # the first window of two
    assert out[hu <= 0].max() == 0 and out[hu > 2000].min() == 255
    assert (out == 0).sum() > 100 and (out == 255).sum() > 100


def test_window_functions_and_a_bad_window(tmp_path: Path) -> None:
    stored = phantom16()
    exact = read_dicom_8bit(write_dicom(tmp_path / "e.dcm", stored, bits_stored=12, WindowCenter=2048,
                                        WindowWidth=1024, VOILUTFunction="LINEAR_EXACT"))
    x = stored.astype(np.float64)
    assert_close(exact, np.clip(((x - 2048) / 1024 + 0.5) * 255, 0, 255), tol=1.0)
    sigmoid = read_dicom_8bit(write_dicom(tmp_path / "s.dcm", stored, bits_stored=12, WindowCenter=2048,
                                          WindowWidth=1024, VOILUTFunction="SIGMOID"))
    assert_close(sigmoid, 255 / (1 + np.exp(-4 * (x - 2048) / 1024)), tol=1.0)
    # a negative slope: the window is in rescaled units, below it is still black
    flipped = read_dicom_8bit(write_dicom(tmp_path / "f.dcm", stored, bits_stored=12, RescaleSlope=-1,
                                          RescaleIntercept=4095, WindowCenter=1000, WindowWidth=500))
    assert_close(flipped, linear_window(4095 - x, 1000, 500), tol=1.0)
    # a LINEAR window narrower than 1 is invalid: ignored, the data are stretched instead
    bad = read_dicom_8bit(write_dicom(tmp_path / "b.dcm", stored, bits_stored=12, WindowCenter=100, WindowWidth=0))
    assert_close(bad, minmax(stored))


def test_signed_16bit_without_window_is_stretched_over_its_range(tmp_path: Path) -> None:
    hu = np.linspace(-1024, 3071, 64 * 64).reshape(64, 64).astype(np.int16)
    hu[:4] = -2000  # padding outside the field of view
    out = read_dicom_8bit(write_dicom(tmp_path / "s16.dcm", hu, RescaleSlope=1, RescaleIntercept=0,
                                      PixelPaddingValue=-2000))
    inside = hu[4:].astype(np.float64)
    assert_close(out[4:], (inside - inside.min()) / (inside.max() - inside.min()) * 255)
    assert not out[:4].any()


def test_signed_12bit_in_16_is_sign_extended(tmp_path: Path) -> None:
    values = np.linspace(-2048, 2047, 64 * 64).round().astype(np.int16).reshape(64, 64)
    raw = (values.view(np.uint16) & 0x0FFF).view(np.int16)  # the 4 unused high bits are zero
    path = write_dicom(tmp_path / "s12.dcm", raw, bits_stored=12)
    assert pydicom.dcmread(path).PixelRepresentation == 1
    assert_close(read_dicom_8bit(path), minmax(values))


def test_high_bit_above_bits_stored_is_shifted_down(tmp_path: Path) -> None:
    stored = phantom16()
    window = {"WindowCenter": 2048, "WindowWidth": 1024}  # in stored units: wrong if the bits are not shifted
    normal = read_dicom_8bit(write_dicom(tmp_path / "n.dcm", stored, bits_stored=12, **window))
    high = read_dicom_8bit(write_dicom(tmp_path / "h.dcm", (stored << 4) | 0x5, bits_stored=12, HighBit=15, **window))
    np.testing.assert_array_equal(high, normal)
    assert_close(normal, linear_window(stored, 2048, 1024), tol=1.0)


def test_voi_lut_sequence_is_applied_and_preferred_to_the_window(tmp_path: Path) -> None:
    stored = phantom16()
    table = np.round(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # 12-bit values in 16-bit entries
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = table.tolist()
    item["LUTData"].VR = "US"
    path = write_dicom(tmp_path / "voi.dcm", stored, bits_stored=12, VOILUTSequence=Sequence([item]),
                       WindowCenter=100, WindowWidth=50)
    out = read_dicom_8bit(path)
    assert_close(out, table[stored].astype(np.float64) / 4095 * 255)
    assert out[stored == 1024].mean() > 120  # sqrt brightens the darks: 1024 -> 2048 of 4095


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, ImplicitVRLittleEndian])
def test_lossless_syntaxes_give_the_native_result(tmp_path: Path, syntax: str) -> None:
    stored = phantom16()
    native = read_dicom_8bit(write_dicom(tmp_path / "native.dcm", stored, bits_stored=12, photometric="MONOCHROME1",
                                         RescaleSlope=1.5, RescaleIntercept=-50))
    path = write_dicom(tmp_path / "c.dcm", stored, bits_stored=12, photometric="MONOCHROME1", transfer_syntax=syntax,
                       RescaleSlope=1.5, RescaleIntercept=-50)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_dicom_8bit(path), native)
    assert_close(native, 255 - minmax(stored))


def test_jpeg_baseline_8bit(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:64, :64]
    pixels = (40 + 3 * xx + yy).astype(np.uint8)
    out = read_dicom_8bit(write_dicom(tmp_path / "j.dcm", pixels, transfer_syntax=JPEGBaseline8Bit))
    assert np.abs(out.astype(int) - pixels).mean() < 1.5  # lossy, but no rescaling


def test_colour_images_become_luma(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
    luma = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float64)
    assert_close(read_dicom_8bit(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")), luma, tol=1.0)
    from pydicom.pixels import convert_color_space

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    assert_close(read_dicom_8bit(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")), luma, tol=2.0)


def test_a_file_without_the_dicm_header_is_read(tmp_path: Path) -> None:
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", pixels))
    bare = Dataset()
    for elem in ds:
        bare.add(elem)
    path = tmp_path / "acr_nema.dcm"
    bare.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    assert_close(read_dicom_8bit(path), minmax(pixels))


def test_write_dicom_is_deterministic(tmp_path: Path) -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    a = write_dicom(tmp_path / "a" / "same.dcm", pixels, transfer_syntax=JPEGBaseline8Bit).read_bytes()
    b = write_dicom(tmp_path / "b" / "same.dcm", pixels, transfer_syntax=JPEGBaseline8Bit).read_bytes()
    assert a == b and a[128:132] == b"DICM"


# -- bad files ---------------------------------------------------------------------------
def _set_syntax(path: Path, syntax: str) -> Path:
    """Rewrite ``path`` claiming ``syntax``, with an encapsulated (bogus) codestream."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "sr.dcm", np.zeros((8, 8), np.uint8)))
    del ds.PixelData
    ds.save_as(tmp_path / "sr.dcm")
    with pytest.raises(DataError, match=r"sr\.dcm has no Pixel Data"):
        read_dicom_8bit(tmp_path / "sr.dcm")


def test_not_a_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "photo.dcm"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")
    with pytest.raises(DataError, match=r"photo\.dcm is not a DICOM file"):
        read_dicom_8bit(path)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGBaseline8Bit])
def test_truncated_file(tmp_path: Path, syntax: str) -> None:
    rng = np.random.default_rng(0)
    path = write_dicom(tmp_path / "t.dcm", rng.integers(0, 256, (128, 128)).astype(np.uint8), transfer_syntax=syntax)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match=r"t\.dcm") as err:
        read_dicom_8bit(path)
    assert "truncated" in str(err.value) or "less than expected" in str(err.value)


def test_multi_frame(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cine.dcm", np.zeros((2, 8, 8), np.uint8).reshape(16, 8), NumberOfFrames=2)
    ds = pydicom.dcmread(path)
    ds.Rows = 8
    ds.save_as(path)
    with pytest.raises(DataError, match=r"cine\.dcm is a multi-frame DICOM \(2 frames\)"):
        read_dicom_8bit(path)


def test_missing_decoder_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _set_syntax(write_dicom(tmp_path / "ls.dcm", np.zeros((8, 8), np.uint8)), JPEGLSLossless)
    monkeypatch.setattr(get_decoder(JPEGLSLossless), "_available", {})  # as if pylibjpeg-libjpeg were absent
    with pytest.raises(DataError) as err:
        read_dicom_8bit(path)
    msg = str(err.value)
    assert "ls.dcm" in msg and "JPEG-LS Lossless" in msg
    for package in ("pip install pylibjpeg pylibjpeg-libjpeg", "pip install pyjpegls", "pip install python-gdcm"):
        assert package in msg


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    private = "1.2.826.0.1.3680043.9.9999.1"
    path = _set_syntax(write_dicom(tmp_path / "private.dcm", np.zeros((8, 8), np.uint8)), private)
    with pytest.raises(DataError, match=r"private\.dcm uses transfer syntax 1\.2\.826\.0\.1\.3680043\.9\.9999\.1.*"
                                        r"no pip package") as err:
        read_dicom_8bit(path)
    assert "gdcmconv --raw" in str(err.value)


def test_corrupt_codestream(tmp_path: Path) -> None:
    path = _set_syntax(write_dicom(tmp_path / "bad.dcm", np.zeros((8, 8), np.uint8)), JPEGBaseline8Bit)
    with pytest.raises(DataError, match=r"cannot decode the pixel data of .*bad\.dcm \(JPEG Baseline"):
        read_dicom_8bit(path)


def test_missing_decoder_packages_table() -> None:
    messages = ["gdcm - requires gdcm>=3.0.10", "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0",
                "pillow - requires numpy and pillow>=10.0"]
    assert missing_decoder_packages(JPEG2000Lossless, messages) == [
        "pylibjpeg pylibjpeg-openjpeg", "python-gdcm", "pillow"]
    assert missing_decoder_packages("1.2.3.4", []) == []


# -- real files -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test1.dcm", "test2.dcm", "test3.dcm"])
def test_real_nih_chest_xrays_are_unchanged(name: str) -> None:
    path = real_fixture("dicom_cxr_udacity_nih", name)
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.BitsStored) == ("MONOCHROME2", 8)
    out = read_dicom_8bit(path)
    assert out.shape == (1024, 1024)
    np.testing.assert_array_equal(out, ds.pixel_array)


def test_real_monochrome1_jpeg2000_chest_has_bone_bright() -> None:
    path = real_fixture("dicom_pydicom_data", "RG1_J2KI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    out = read_dicom_8bit(path)
    raw = ds.pixel_array
    assert out.shape == raw.shape == (1955, 1841)
    h, w = out.shape
    rows = slice(int(0.3 * h), int(0.5 * h))
    mediastinum = out[rows, int(0.45 * w):int(0.52 * w)].mean()
    lungs = (out[rows, int(0.22 * w):int(0.32 * w)].mean() + out[rows, int(0.66 * w):int(0.76 * w)].mean()) / 2
    assert mediastinum > lungs + 40
    assert np.corrcoef(out.ravel()[::97], raw.ravel()[::97].astype(np.float64))[0, 1] < -0.99
    # the file's window (centre 15000, width 30000) is applied before the inversion
    assert_close(out, 255 - linear_window(raw, 15000, 30000), tol=1.0)


def test_real_mr_with_overlays() -> None:
    path = real_fixture("dicom_pydicom_data", "MR-SIEMENS-DICOM-WithOverlays.dcm")
    out = read_dicom_8bit(path)
    raw = pydicom.dcmread(path).pixel_array
    assert out.shape == (484, 484) and raw.dtype == np.uint16
    assert_close(out, linear_window(raw, 450, 790), tol=1.0)  # the first of its two windows
