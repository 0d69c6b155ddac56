"""The VinDr-CXR reorganizer (``bmad prepare vindr``): DDAD's shipped split, its synthetic raw set, errors."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from bmad.errors import DataError, UsageError
from bmad.reorganizer import reorganizers
from datasets_prep.dicom import read_dicom_8bit, write_dicom
from datasets_prep.vindr import (
    DDAD_COUNTS,
    GROUPS,
    IMAGES,
    KAGGLE_LABELS,
    PHYSIONET_LABELS,
    SPLIT_FILE,
    SPLIT_SHA256,
    VinDr,
    ddad_pixels,
    plan_split,
    read_labels,
    read_split,
)
from tests.conftest import real_fixture, run_bmad
from tests.prep_helpers import read_manifest, tree_bytes

N = 20  # 8 train normal, 2 + 2 unlabeled, 4 + 4 test
SIZE = 64  # VinDr's images are about 2,000-3,000 pixels a side; tiny here


def ddad_file() -> dict:
    return json.loads(SPLIT_FILE.read_text())


@pytest.fixture(scope="module")
def groups() -> dict[str, list[str]]:
    return read_split(SPLIT_FILE, sha256=SPLIT_SHA256)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return VinDr.synthesize(tmp_path_factory.mktemp("raw"), n=N, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    summary = VinDr(raw, valid=1, workers=2).prepare(tmp_path_factory.mktemp("out"), progress=False)
    assert not summary.skipped and not summary.kept
    return summary.folder


def copy_raw(raw: Path, dest: Path) -> Path:
    shutil.copytree(raw, dest)
    return dest


# -- DDAD's split file and the plan ------------------------------------------------------------
def test_shipped_split_is_ddads_file(groups: dict[str, list[str]]) -> None:
    assert hashlib.sha256(SPLIT_FILE.read_bytes()).hexdigest() == SPLIT_SHA256
    assert {g: len(ids) for g, ids in groups.items()} == DDAD_COUNTS
    doc = ddad_file()  # read independently: the file's own lists, in its order
    assert groups["train/good"] == [n[:-4] for n in doc["train"]["0"]]
    assert groups["test/Ungood"] == [n[:-4] for n in doc["test"]["1"]]
    every = [i for g in GROUPS for i in groups[g]]
    assert len(every) == len(set(every)) == 15000
    assert sum(len(groups[g]) for g in GROUPS if g.endswith("/good")) == 10606  # Kaggle's "No finding" images
    source = (SPLIT_FILE.parent / "SOURCE.md").read_text()
    assert SPLIT_SHA256 in source and "MIT License" in source and "caiyu6666/DDAD" in source


def test_plan_of_the_full_training_set_is_ddads_protocol(groups: dict[str, list[str]]) -> None:
    every = {i for g in GROUPS for i in groups[g]}
    plan = plan_split(groups, every, seed=0)
    counts: dict[tuple[str, str], int] = {}
    for key in plan.assign.values():
        counts[key] = counts.get(key, 0) + 1
    assert counts == {("train", "good"): 4000, ("valid", "good"): 100, ("valid", "Ungood"): 100,
                      ("test", "good"): 1000, ("test", "Ungood"): 1000}
    assert not plan.missing
    for group in ("train/good", "test/good", "test/Ungood"):  # DDAD's groups exactly
        assert {i for i, v in plan.assign.items() if v == tuple(group.split("/"))} == set(groups[group])
    for label in ("good", "Ungood"):  # valid only from the pool DDAD's one-class protocol never uses
        valid = {i for i, v in plan.assign.items() if v == ("valid", label)}
        assert valid <= set(groups[f"unlabeled/{label}"])
    again = plan_split(groups, every, seed=0)
    other = plan_split(groups, every, seed=1)
    assert again.assign == plan.assign and other.assign != plan.assign
    assert {i for i, v in other.assign.items() if v[0] == "test"} == {i for i, v in plan.assign.items()
                                                                       if v[0] == "test"}
    none = plan_split(groups, every, valid_per_label=0)
    assert len(none.assign) == 6000 and all(s != "valid" for s, _ in none.assign.values())
    with pytest.raises(UsageError, match="--valid"):
        plan_split(groups, every, valid_per_label=-1)


def test_plan_of_a_partial_download_counts_what_is_missing(groups: dict[str, list[str]]) -> None:
    some = set(groups["train/good"][:10] + groups["test/Ungood"][:3] + groups["unlabeled/good"][:2])
    plan = plan_split(groups, some | {"not-in-the-split"}, valid_per_label=5)
    assert set(plan.assign) == some
    assert plan.missing == {"train/good": 3990, "test/good": 1000, "test/Ungood": 997}
    assert sum(v == ("valid", "good") for v in plan.assign.values()) == 2


def test_bad_split_files_are_refused(tmp_path: Path) -> None:
    altered = tmp_path / "vin_data.json"
    altered.write_bytes(SPLIT_FILE.read_bytes().replace(b'"test"', b'"test" '))
    with pytest.raises(DataError, match="altered"):
        read_split(altered, sha256=SPLIT_SHA256)
    assert len(read_split(altered)["test/good"]) == 1000  # a user's own copy is not hash-checked
    doc = ddad_file()
    del doc["train"]["unlabeled"]
    (tmp_path / "a.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"not DDAD's split file.*unlabeled"):
        read_split(tmp_path / "a.json")
    doc = ddad_file()
    doc["test"]["0"].append(doc["train"]["0"][0])
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="in both train/good and test/good"):
        read_split(tmp_path / "b.json")
    doc = ddad_file()
    doc["test"]["1"][0] = 7
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'<image_id>.png'"):
        read_split(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(DataError, match="not DDAD's split file"):
        read_split(tmp_path / "d.json")


# -- the synthetic raw set end to end -----------------------------------------------------------
def test_synthetic_set_has_the_kaggle_layout(raw: Path, groups: dict[str, list[str]]) -> None:
    files = sorted((raw / IMAGES).iterdir())
    assert len(files) == N and all(p.suffix == ".dicom" for p in files)
    where = {i: g for g in GROUPS for i in groups[g]}
    assert {where[p.stem] for p in files} == set(GROUPS)
    kinds = set()
    for p in files:
        ds = pydicom.dcmread(p)
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (SIZE, SIZE, 12)
        kinds.add(str(ds.PhotometricInterpretation))
    assert kinds == {"MONOCHROME1", "MONOCHROME2"}
    with open(raw / KAGGLE_LABELS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * N
    for r in rows:
        assert (r["class_name"] == "No finding") == where[r["image_id"]].endswith("/good")


def test_layout_labels_and_manifest(raw: Path, bench: Path, groups: dict[str, list[str]]) -> None:
    rows = read_manifest(bench)
    where = {i: g for g in GROUPS for i in groups[g]}
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        iid = Path(r["path"]).stem
        assert r["path"] == f"{r['split']}/{r['label']}/img/{iid}.png" and (bench / r["path"]).is_file()
        assert r["source"] == f"train/{iid}.dicom" and r["patient"] == iid and r["mask"] == ""
        group, label = where[iid].split("/")
        assert r["label"] == label
        assert r["split"] == ("valid" if group == "unlabeled" else group)
        assert hashlib.sha256((bench / r["path"]).read_bytes()).hexdigest() == r["sha256"]
        counts[(r["split"], r["label"])] = counts.get((r["split"], r["label"]), 0) + 1
    assert counts == {("train", "good"): 8, ("valid", "good"): 1, ("valid", "Ungood"): 1,
                      ("test", "good"): 4, ("test", "Ungood"): 4}
    assert not (bench / "train" / "Ungood").exists()


def test_pixels_are_the_dicom_display_pixels(raw: Path, bench: Path) -> None:
    for r in read_manifest(bench)[::3]:
        ours = np.asarray(Image.open(bench / r["path"]))
        assert ours.dtype == np.uint8 and ours.shape == (SIZE, SIZE)
        assert np.array_equal(ours, read_dicom_8bit(raw / r["source"]))
    # MONOCHROME1 is shown with bone bright: the spine column (centre) is brighter than the lungs
    mono1 = [r for r in read_manifest(bench) if pydicom.dcmread(raw / r["source"]).PhotometricInterpretation
             == "MONOCHROME1"]
    img = np.asarray(Image.open(bench / mono1[0]["path"]), np.float64)
    assert img[SIZE // 2, SIZE // 2 - 1: SIZE // 2 + 1].mean() > img[SIZE // 2, SIZE // 4]


def test_prepare_is_deterministic_idempotent_and_resumable(raw: Path, bench: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    one = VinDr(raw, valid=1, workers=1).prepare(tmp_path / "one", progress=False)
    assert tree_bytes(one.folder) == tree_bytes(bench)
    kept = VinDr(raw, valid=1, workers=2).prepare(tmp_path / "one", progress=False)
    assert kept.kept and tree_bytes(kept.folder) == tree_bytes(bench)
    with pytest.raises(UsageError, match="--overwrite"):
        VinDr(raw, valid=0).prepare(tmp_path / "one", progress=False)

    calls = {"n": 0}
    real_job = VinDr._job

    def dying(self: VinDr, task):  # an interruption after 5 images
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_job(self, task)

    monkeypatch.setattr(VinDr, "_job", dying)
    with pytest.raises(KeyboardInterrupt):
        VinDr(raw, valid=1, workers=1).prepare(tmp_path / "two", progress=False)
    assert not (tmp_path / "two" / "VinDr").exists() and (tmp_path / "two" / ".VinDr.partial").is_dir()
    monkeypatch.setattr(VinDr, "_job", real_job)
    resumed = VinDr(raw, valid=1, workers=2).prepare(tmp_path / "two", progress=False)
    assert resumed.reused == 5 and tree_bytes(resumed.folder) == tree_bytes(bench)


def test_ddad_pixels_and_size(raw: Path, tmp_path: Path) -> None:
    summary = VinDr(raw, valid=0, pixels="ddad", size=(24, 40)).prepare(tmp_path, progress=False)
    for r in read_manifest(summary.folder):
        ds = pydicom.dcmread(raw / r["source"])
        v = ds.pixel_array.astype(np.float64)  # DDAD's rule, computed here independently
        if ds.PhotometricInterpretation == "MONOCHROME1":
            v = v.max() - v
        full = np.floor((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)
        assert np.array_equal(ddad_pixels(raw / r["source"]), full)
        expect = np.asarray(Image.fromarray(full).resize((40, 24), Image.Resampling.BILINEAR))
        assert np.array_equal(np.asarray(Image.open(summary.folder / r["path"])), expect)
    with pytest.raises(UsageError, match="--pixels"):
        VinDr(raw, pixels="voi")
    with pytest.raises(UsageError, match="--size"):
        VinDr(raw, size=(0, 5))


def test_label_csvs_are_checked_against_ddad(raw: Path, tmp_path: Path, groups: dict[str, list[str]],
                                             caplog: pytest.LogCaptureFixture) -> None:
    assert read_labels(tmp_path) is None
    path, labels = read_labels(raw)
    where = {i: g.split("/")[1] for g in GROUPS for i in groups[g]}
    assert path.name == KAGGLE_LABELS and labels == {i: where[i] for i in labels} and len(labels) == N

    work = copy_raw(raw, tmp_path / "raw")
    flip = next(i for i in labels if labels[i] == "good")
    text = (work / KAGGLE_LABELS).read_text().splitlines()
    text = [ln.replace("No finding,14", "Nodule/Mass,8", 1) if ln.startswith(flip) and "R2" in ln else ln
            for ln in text]
    (work / KAGGLE_LABELS).write_text("\n".join(text) + "\n")
    with caplog.at_level(logging.WARNING, logger="datasets_prep.vindr"):
        summary = VinDr(work, valid=1).prepare(tmp_path / "out", progress=False)
    assert f"1 image(s) are labelled differently in {KAGGLE_LABELS}" in caplog.text and flip in caplog.text
    row = next(r for r in read_manifest(summary.folder) if Path(r["path"]).stem == flip)
    assert row["label"] == "good"  # DDAD's label is the protocol's

    # PhysioNet's per-radiologist table: image_id, rad_id, ..., No finding
    (work / KAGGLE_LABELS).unlink()
    (work / "annotations").mkdir()
    lines = ["image_id,rad_id,Aortic enlargement,No finding"]
    lines += [f"{i},R{r},{int(lab == 'Ungood')},{int(lab == 'good')}" for i, lab in labels.items() for r in (1, 2)]
    (work / PHYSIONET_LABELS).write_text("\n".join(lines) + "\n")
    path, physio = read_labels(work)
    assert path.name == "image_labels_train.csv" and physio == labels
    (work / PHYSIONET_LABELS).write_text("patientId,class\nx,Normal\n")
    with pytest.raises(DataError, match="'No finding'"):
        VinDr(work).prepare(tmp_path / "out2", progress=False)


def test_wrong_raw_folders_say_what_is_expected(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        VinDr(tmp_path / "nope").prepare(tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="has no train/ folder") as exc:
        VinDr(raw / IMAGES).prepare(tmp_path / "o", progress=False)
    assert f"pass its parent, {raw}" in exc.value.hint
    (tmp_path / "empty" / IMAGES).mkdir(parents=True)
    with pytest.raises(DataError, match="no .dicom files"):
        VinDr(tmp_path / "empty").prepare(tmp_path / "o", progress=False)
    other = tmp_path / "test_set" / IMAGES
    other.mkdir(parents=True)
    write_dicom(other / "0123456789abcdef0123456789abcdef.dicom", np.zeros((8, 8), np.uint16), bits_stored=12)
    with pytest.raises(DataError, match="none of the 1 DICOMs") as exc:
        VinDr(tmp_path / "test_set").prepare(tmp_path / "o", progress=False)
    assert "training" in exc.value.hint
    assert not (tmp_path / "o" / "VinDr").exists()


def test_bad_dicoms_are_skipped_or_fatal(raw: Path, tmp_path: Path, groups: dict[str, list[str]]) -> None:
    work = copy_raw(raw, tmp_path / "raw")
    victim = next(p for p in sorted((work / IMAGES).iterdir()) if p.stem in set(groups["train/good"]))
    victim.write_bytes(b"not a dicom at all" * 10)
    with pytest.raises(DataError, match=victim.name):
        VinDr(work, valid=1, on_error="fail").prepare(tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / "VinDr").exists()
    summary = VinDr(work, valid=1).prepare(tmp_path / "skip", progress=False)
    assert [s for s, _ in summary.skipped] == [f"train/{victim.name}"]
    with open(summary.folder / "skipped.csv", newline="") as fh:
        assert [r["source"] for r in csv.DictReader(fh)] == [f"train/{victim.name}"]
    assert sum(summary.counts.values()) == N - 2 - 1  # 2 pool images unused, 1 skipped


def test_cli_prepare_list_and_shots(raw: Path, bench: Path, toy_plugin: Path, tmp_path: Path) -> None:
    assert reorganizers.get("vindr").cls is VinDr
    listed = run_bmad("prepare", "--list")
    assert listed.returncode == 0 and "vindr  ->  bench vindr (folder VinDr/)" in listed.stdout
    out = run_bmad("prepare", "vindr", "--raw", str(raw), "--out", str(tmp_path / "data"), "--valid", "1",
                   "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "train: good 8" in out.stdout
    assert tree_bytes(tmp_path / "data" / "VinDr") == tree_bytes(bench)
    bad = run_bmad("prepare", "vindr", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "is not a folder" in bad.stderr and "Traceback" not in bad.stderr

    res = tmp_path / "res"
    run = run_bmad("run", "--algo", "toy", "--bench", "vindr", "--shots", "4", "--seeds", "2", "--data-root",
                   str(tmp_path / "data"), "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert run.returncode == 0, run.stderr
    records = [json.loads(p.read_text()) for p in sorted((res / "runs" / "vindr" / "toy").rglob("seed*.json"))]
    train = {r["path"] for r in read_manifest(bench) if r["split"] == "train"}
    assert len(records) == 2
    for r in records:
        assert r["status"] == "ok" and r["shots"] == 4 and r["data"]["n_train"] == 4
        assert set(r["data"]["train_files"]) <= train and len(r["data"]["train_files"]) == 4
        assert r["data"]["n_test"] == 8 and r["data"]["n_valid"] == 2
        assert r["metrics"]["image_auroc"] is not None and r["metrics"]["pixel_auroc"] is None
    assert records[0]["data"]["train_files"] != records[1]["data"]["train_files"]


def test_a_real_monochrome1_jpeg2000_chest_dicom(tmp_path: Path, groups: dict[str, list[str]]) -> None:
    """A real CR chest radiograph (uint16 MONOCHROME1, JPEG 2000) named as one of DDAD's test images."""
    src = real_fixture("dicom_pydicom_data", "RG1_J2KI.dcm")
    raw = tmp_path / "raw"
    (raw / IMAGES).mkdir(parents=True)
    abnormal, normal = groups["test/Ungood"][0], groups["train/good"][0]
    shutil.copy(src, raw / IMAGES / f"{abnormal}.dicom")
    write_dicom(raw / IMAGES / f"{normal}.dicom", np.full((16, 16), 900, np.uint16), bits_stored=12)
    summary = VinDr(raw).prepare(tmp_path / "out", progress=False)
    assert summary.counts == {("train", "good"): 1, ("test", "Ungood"): 1} and not summary.skipped
    ours = np.asarray(Image.open(summary.folder / "test" / "Ungood" / "img" / f"{abnormal}.png"))
    ds = pydicom.dcmread(src)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ours.shape == (ds.Rows, ds.Columns)
    assert np.array_equal(ours, read_dicom_8bit(src))
    ddad = VinDr(raw, pixels="ddad").prepare(tmp_path / "ddad", progress=False)
    theirs = np.asarray(Image.open(ddad.folder / "test" / "Ungood" / "img" / f"{abnormal}.png"))
    v = ds.pixel_array.astype(np.float64)
    v = v.max() - v
    assert np.array_equal(theirs, np.floor((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8))
