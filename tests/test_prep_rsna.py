"""The RSNA Pneumonia reorganizer (``bmad prepare rsna``) and its synthetic raw generator."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from bmad.errors import DataError
from bmad.reorganizer import reorganizers
from datasets_prep.dicom import read_dicom_8bit, write_dicom
from datasets_prep.rsna import (
    CLASSES,
    IMAGES,
    LABELS,
    RSNA,
    plan_split,
    read_classes,
    split_sizes,
    synthetic_patient,
)
from tests.conftest import real_fixture
from tests.prep_helpers import read_manifest, tree_bytes

N = 36  # 12 Normal, 8 Lung Opacity, 16 No Lung Opacity / Not Normal
SIZE = 256  # RSNA's images are 1024x1024; smaller here to keep the tests fast


def csv_classes(path: Path) -> dict[str, set[str]]:
    """patientId -> the set of classes its rows give (read independently of the module)."""
    out: dict[str, set[str]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["patientId"], set()).add(row["class"])
    return out


def write_classes(path: Path, rows: list[tuple[str, str]], header: str = "patientId,class") -> None:
    path.write_text(header + "\n" + "".join(f"{p},{c}\n" for p, c in rows))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return RSNA.synthesize(tmp_path_factory.mktemp("raw"), n=N, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    summary = RSNA(**RSNA.synthetic_options(raw), workers=2).prepare(tmp_path_factory.mktemp("out"), progress=False)
    assert not summary.skipped and not summary.kept
    return summary.folder


def small_raw(raw: Path, dest: Path, n: int = 12) -> tuple[Path, list[str]]:
    """The first ``n`` synthetic patients (by index) copied to ``dest``: 4 normal, 8 abnormal for n = 12."""
    pids = [synthetic_patient(0, i, 8)[0] for i in range(n)]
    (dest / IMAGES).mkdir(parents=True)
    for pid in pids:
        shutil.copy(raw / IMAGES / f"{pid}.dcm", dest / IMAGES / f"{pid}.dcm")
    classes = csv_classes(raw / LABELS)
    write_classes(dest / LABELS, [(pid, c) for pid in pids for c in sorted(classes[pid])])
    return dest, pids


# -- the size rule ----------------------------------------------------------------------
def test_sizes_reproduce_bmad_for_the_full_stage2_train_set() -> None:
    sizes = split_sizes(8851, 17833)
    assert (sizes.train_good, sizes.valid_good, sizes.valid_ungood, sizes.test_good, sizes.test_ungood) == (
        8000, 745, 745, 106, 17088)
    assert sizes.totals() == {"train": 8000, "valid": 1490, "test": 17194}
    assert split_sizes(9000, 20000).counts() == {("train", "good"): 8000, ("valid", "good"): 745,
                                                 ("valid", "Ungood"): 745, ("test", "good"): 255,
                                                 ("test", "Ungood"): 19255}


def test_sizes_are_proportional_for_a_subset() -> None:
    assert tuple(split_sizes(885, 1783).counts().values()) == (800, 74, 74, 11, 1709)
    assert tuple(split_sizes(12, 24).counts().values()) == (10, 1, 1, 1, 23)
    assert tuple(split_sizes(100, 3).counts().values()) == (90, 2, 2, 8, 1)  # valid capped by the abnormal ones
    for n_good in range(3, 300, 7):
        for n_bad in (2, 5, 2 * n_good):
            s = split_sizes(n_good, n_bad)
            assert s.train_good + s.valid_good + s.test_good == n_good
            assert s.valid_ungood + s.test_ungood == n_bad
            assert s.valid_good == s.valid_ungood and min(s.counts().values()) >= 1
    with pytest.raises(DataError, match="too few"):
        split_sizes(2, 10)
    with pytest.raises(DataError, match="too few"):
        split_sizes(10, 1)


def test_plan_is_seeded_and_patient_level() -> None:
    labels = {f"p{i:03d}": ("good" if i % 3 == 0 else "Ungood") for i in range(90)}
    plan = plan_split(labels, seed=0)
    assert plan == plan_split(dict(reversed(labels.items())), seed=0)  # input order does not matter
    assert plan != plan_split(labels, seed=1)
    assert set(plan) == set(labels) and all(plan[p][1] == labels[p] for p in labels)
    counts: dict[tuple[str, str], int] = {}
    for group in plan.values():
        counts[group] = counts.get(group, 0) + 1
    assert counts == split_sizes(30, 60).counts()


# -- synthetic set -> prepare ----------------------------------------------------------------
def test_synthetic_set_has_the_kaggle_layout(raw: Path) -> None:
    classes = csv_classes(raw / LABELS)
    rows = (raw / LABELS).read_text().splitlines()
    assert rows[0] == "patientId,class" and len(rows) - 1 > len(classes) == N  # one row per box: duplicates
    assert all(len(c) == 1 for c in classes.values())
    assert sorted(c for cs in classes.values() for c in cs).count("Normal") == 12
    assert (raw / "stage_2_train_labels.csv").read_text().startswith("patientId,x,y,width,height,Target\n")
    pid = min(classes)
    ds = pydicom.dcmread(raw / IMAGES / f"{pid}.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline, like RSNA's files
    assert (ds.PatientID, ds.PhotometricInterpretation, ds.BitsStored, ds.Rows, ds.Columns) == (
        pid, "MONOCHROME2", 8, SIZE, SIZE)
    again = RSNA.synthesize(raw.parent / "again", n=2, seed=0, size=SIZE)
    first = synthetic_patient(0, 0, SIZE)[0]
    assert (again / IMAGES / f"{first}.dcm").read_bytes() == (raw / IMAGES / f"{first}.dcm").read_bytes()


def test_layout_labels_and_manifest(raw: Path, bench: Path) -> None:
    assert bench.name == "Chest"
    rows = read_manifest(bench)
    classes = csv_classes(raw / LABELS)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert len(rows) == N and len({r["patient"] for r in rows}) == N  # one image per patient, one split each
    n_good = sum(c == {"Normal"} for c in classes.values())
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(r["split"], r["label"])] = counts.get((r["split"], r["label"]), 0) + 1
        assert r["label"] == CLASSES[next(iter(classes[r["patient"]]))]
        assert r["path"] == f"{r['split']}/{r['label']}/img/{r['patient']}.png"
        assert r["source"] == f"{IMAGES}/{r['patient']}.dcm" and r["mask"] == "" and r["slice"] == ""
        assert hashlib.sha256((bench / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    assert counts == split_sizes(n_good, N - n_good).counts()
    written = {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")}
    assert written == {r["path"] for r in rows}
    assert not list(bench.rglob("anomaly_mask")) and not (bench / "skipped.csv").exists()
    assert not [p for p in bench.parent.iterdir() if p.name != "Chest"], "staging folder left behind"


def test_pixels_are_the_dicom_pixels(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    by_patient = {synthetic_patient(0, i, SIZE)[0]: i for i in range(N)}
    for r in (rows[0], rows[len(rows) // 2], rows[-1]):
        image = Image.open(bench / r["path"])
        assert image.mode == "L" and image.size == (SIZE, SIZE)
        pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels, read_dicom_8bit(raw / r["source"]))
        phantom = synthetic_patient(0, by_patient[r["patient"]], SIZE)[2]
        assert np.abs(pixels.astype(int) - phantom).mean() < 3  # JPEG-lossy copy of the phantom, not rescaled


def test_prepare_is_deterministic_and_idempotent(raw: Path, bench: Path, tmp_path: Path) -> None:
    again = RSNA(raw, workers=1).prepare(tmp_path, progress=False).folder
    assert tree_bytes(again) == tree_bytes(bench)
    before = (again / "manifest.csv").stat().st_mtime_ns
    summary = RSNA(raw).prepare(tmp_path, progress=False)
    assert summary.kept and (again / "manifest.csv").stat().st_mtime_ns == before
    assert sum(summary.counts.values()) == N


def test_split_seed_changes_the_split(raw: Path, bench: Path, tmp_path: Path) -> None:
    other = RSNA(raw, split_seed=1).prepare(tmp_path, progress=False).folder

    def groups(b: Path) -> dict[str, tuple[str, str]]:
        return {r["patient"]: (r["split"], r["label"]) for r in read_manifest(b)}

    assert groups(other) != groups(bench)
    assert sorted(groups(other).values()) == sorted(groups(bench).values())


def test_size_option_resizes(raw: Path, tmp_path: Path) -> None:
    small, _ = small_raw(raw, tmp_path / "raw")
    bench = RSNA(small, size=64).prepare(tmp_path / "out", progress=False).folder
    rows = read_manifest(bench)
    assert len(rows) == 12
    for r in rows[:3]:
        pixels = np.asarray(Image.open(bench / r["path"]))
        assert pixels.shape == (64, 64)
        full = read_dicom_8bit(small / r["source"]).astype(np.float64)
        assert np.abs(pixels - full.reshape(64, 4, 64, 4).mean(axis=(1, 3))).mean() < 4


def test_registered_and_runs_from_the_cli(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bmad.cli import main

    assert reorganizers.get("rsna").cls is RSNA
    small, _ = small_raw(raw, tmp_path / "raw")
    rc = main(["prepare", "rsna", "--raw", str(small), "--out", str(tmp_path / "data"), "--split-seed", "3",
               "--workers", "2", "--no-progress"])
    assert rc == 0
    assert "train: good 2" in capsys.readouterr().out  # 4 normal patients: 2 train, 1 valid, 1 test
    assert len(read_manifest(tmp_path / "data" / "Chest")) == 12
    assert main(["prepare", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "rsna  ->  bench rsna (folder Chest/)" in listing and f"{IMAGES}/<patientId>.dcm" in listing


# -- real chest X-rays in the RSNA layout -----------------------------------------------------
def test_real_nih_dicoms_in_the_rsna_layout(tmp_path: Path) -> None:
    sources = {name: real_fixture("dicom_cxr_udacity_nih", f"{name}.dcm") for name in ("test1", "test2", "test3")}
    raw = tmp_path / "raw"
    (raw / IMAGES).mkdir(parents=True)
    # test1 'No Finding' -> Normal (3 patients); test2 'Cardiomegaly' -> No Lung Opacity / Not Normal;
    # test3 'Effusion' -> Lung Opacity (two boxes: two rows)
    plan = [("test1", "Normal")] * 3 + [("test2", "No Lung Opacity / Not Normal")] * 2 + [("test3", "Lung Opacity")] * 2
    rows, origin = [], {}
    for i, (name, cls) in enumerate(plan):
        pid = f"{i:08x}-{name}-4e49-80ba-63a80b6bddd6"
        shutil.copy(sources[name], raw / IMAGES / f"{pid}.dcm")
        origin[pid] = name
        rows += [(pid, cls)] * (2 if cls == "Lung Opacity" else 1)
    write_classes(raw / LABELS, rows)
    bench = RSNA(raw).prepare(tmp_path / "out", progress=False).folder
    manifest = read_manifest(bench)
    assert len(manifest) == 7
    assert {(r["split"], r["label"]) for r in manifest} == {("train", "good"), ("valid", "good"), ("test", "good"),
                                                            ("valid", "Ungood"), ("test", "Ungood")}
    for r in manifest:
        assert r["label"] == ("good" if origin[r["patient"]] == "test1" else "Ungood")
        expected = pydicom.dcmread(sources[origin[r["patient"]]]).pixel_array
        np.testing.assert_array_equal(np.asarray(Image.open(bench / r["path"])), expected)


# -- bad input --------------------------------------------------------------------------------
def _fails(raw: Path, out: Path, match: str, **options: object) -> DataError:
    with pytest.raises(DataError, match=match) as err:
        RSNA(raw, on_error="fail", **options).prepare(out, progress=False)
    assert not (out / "Chest").exists()
    return err.value


def test_duplicate_rows_are_one_patient_and_conflicts_are_reported(raw: Path, tmp_path: Path) -> None:
    small, pids = small_raw(raw, tmp_path / "raw")
    classes = csv_classes(small / LABELS)
    rows = [(p, c) for p in pids for c in sorted(classes[p])]
    conflicted = next(p for p in pids if classes[p] == {"Normal"})
    write_classes(small / LABELS, rows + rows[:5] + [(conflicted, "Lung Opacity")])
    table = read_classes(small / LABELS)
    assert len(table.labels) == 11 and table.rows == len(rows) + 6
    assert "'Normal' (line" in table.conflicts[conflicted] and "'Lung Opacity' (line" in table.conflicts[conflicted]

    _fails(small, tmp_path / "fail", rf"{LABELS}: 1 patient\(s\) have conflicting classes, e\.g\. {conflicted}")
    summary = RSNA(small).prepare(tmp_path / "skip", progress=False)
    manifest = read_manifest(summary.folder)
    assert len(manifest) == 11 and conflicted not in {r["patient"] for r in manifest}
    with open(summary.folder / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [s["source"] for s in skipped] == [f"{IMAGES}/{conflicted}.dcm"]
    assert "conflicting classes" in skipped[0]["reason"] and "'Lung Opacity'" in skipped[0]["reason"]


def test_csv_with_unexpected_columns(raw: Path, tmp_path: Path) -> None:
    small, pids = small_raw(raw, tmp_path / "raw")
    write_classes(small / LABELS, [(p, "0") for p in pids], header="patientId,x,y,width,height,Target")
    err = _fails(small, tmp_path / "out", rf"{LABELS} has columns \['patientId', 'x', 'y', 'width', 'height', "
                                          r"'Target'\]; expected exactly \['patientId', 'class'\]")
    assert "stage_2_train_labels.csv" in str(err)
    write_classes(small / LABELS, [(pids[0], "Normal"), (pids[1], "Pneumonia")])
    _fails(small, tmp_path / "out", rf"{LABELS} line 3: unknown class 'Pneumonia' for patient {pids[1]}")


def test_missing_inputs(raw: Path, tmp_path: Path) -> None:
    small, _ = small_raw(raw, tmp_path / "raw")
    (small / LABELS).rename(small / "other.csv")
    _fails(small, tmp_path / "out", rf"the class CSV .*{LABELS} does not exist")
    _fails(small, tmp_path / "out", r"the image folder .*stage_1_train_images does not exist",
           images="stage_1_train_images", labels="other.csv")
    _fails(tmp_path / "nowhere", tmp_path / "out", r"--raw .*nowhere is not a folder")


def test_unlabelled_and_missing_images_are_left_out(raw: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    small, pids = small_raw(raw, tmp_path / "raw", n=13)
    (small / IMAGES / f"{pids[0]}.dcm").unlink()  # listed in the CSV, no DICOM
    lines = (small / LABELS).read_text().splitlines()
    (small / LABELS).write_text("\n".join(ln for ln in lines if not ln.startswith(pids[12])) + "\n")  # no CSV row
    bench = RSNA(small).prepare(tmp_path / "out", progress=False).folder
    assert {r["patient"] for r in read_manifest(bench)} == set(pids[1:12])
    assert f"1 patient(s) of {LABELS} have no DICOM" in caplog.text and pids[0] in caplog.text
    assert f"1 DICOM(s) in {IMAGES} have no row" in caplog.text and pids[12] in caplog.text


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_bad_dicoms_fail_or_are_skipped(raw: Path, tmp_path: Path) -> None:
    small, pids = small_raw(raw, tmp_path / "raw")
    classes = csv_classes(small / LABELS)
    abnormal = [p for p in pids if classes[p] != {"Normal"}]
    no_pixels, truncated, private = (small / IMAGES / f"{p}.dcm" for p in abnormal[:3])
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    write_dicom(private, np.zeros((8, 8), np.uint8), uid_seed=abnormal[2])
    ds = pydicom.dcmread(private)
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    ds.save_as(private)

    err = _fails(small, tmp_path / "fail", rf"{abnormal[0]}\.dcm has no Pixel Data")
    assert not list((tmp_path / "fail").glob(".Chest*/**/*.png.tmp"))
    assert "fix:" in str(err)
    summary = RSNA(small).prepare(tmp_path / "skip", progress=False)
    manifest = read_manifest(summary.folder)
    assert {r["patient"] for r in manifest} == set(pids) - set(abnormal[:3])
    with open(summary.folder / "skipped.csv", newline="") as fh:
        skipped = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(skipped) == {f"{IMAGES}/{p}.dcm" for p in abnormal[:3]}
    assert "has no Pixel Data" in skipped[f"{IMAGES}/{abnormal[0]}.dcm"]
    assert "truncated" in skipped[f"{IMAGES}/{abnormal[1]}.dcm"]
    assert "which pydicom cannot decode" in skipped[f"{IMAGES}/{abnormal[2]}.dcm"]
    assert "skipped 3 input(s)" in summary.text()
