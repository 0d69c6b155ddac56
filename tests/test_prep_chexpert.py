"""The CheXpert reorganizer: SQUID's rule (frontal PA, test 250 + 250 by patient), pixels, bad inputs, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError
from datasets_prep.chexpert import HEADER, PATHOLOGIES, CheXpert, Row, plan_split, read_table, row_label
from tests.conftest import run_bmad
from tests.prep_helpers import decoded, png, read_manifest, tree_bytes

FOLDER = "CheXpert"
SIZE = (24, 20)  # (H, W) of the generated radiographs: small, so the tests stay fast
N = 60  # training patients of the generated set (6 validation patients)


def csv_labels(root: Path, name: str) -> dict[str, str]:
    """rel path -> good | Ungood for the frontal PA rows of a CSV, read independently of the module."""
    out = {}
    with open(root / name, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Frontal/Lateral"] != "Frontal" or row["AP/PA"] != "PA":
                continue
            normal = row["No Finding"] == "1.0"
            abnormal = any(row[p] == "1.0" for p in PATHOLOGIES)
            if normal != abnormal:
                out[row["Path"].split("/", 1)[1]] = "good" if normal else "Ungood"
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = CheXpert.synthesize(tmp_path_factory.mktemp("raw"), n=N, seed=0, size=SIZE)
    return top / "CheXpert-v1.0-small"


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    summary = CheXpert(raw, workers=2).prepare(out, progress=False)
    assert summary.folder == out / FOLDER and not summary.kept
    return out / FOLDER


def copy_raw(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "CheXpert-v1.0-small"))


# -- the rule, without images ------------------------------------------------------------------
def test_row_label() -> None:
    blank = dict.fromkeys(("No Finding", *PATHOLOGIES), None)
    assert row_label({**blank, "No Finding": 1}) == "good"
    assert row_label({**blank, "Edema": 1, "Fracture": -1}) == "Ungood"
    assert row_label({**blank, "Edema": -1}) == ""  # uncertain only
    assert row_label({**blank, "Cardiomegaly": 0}) == ""  # negative mentions only
    assert row_label({**blank, "No Finding": 1, "Pneumothorax": 1}) == ""  # contradictory


def chexpert_listing(n_patients: int, seed: int = 0) -> list[Row]:
    """Labelled frontal PA rows of a CheXpert-sized training set: 1..3 studies per patient, one in
    six normal (CheXpert's train.csv: ~5k normal of ~29k labelled frontal PA images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        for s in range(1, int(rng.integers(1, 4)) + 1):
            label = "good" if rng.random() < 1 / 6 else "Ungood"
            rows.append(Row(f"train/patient{p:05d}/study{s}/view1_frontal.jpg", f"patient{p:05d}", label,
                            "train.csv", len(rows) + 2))
    return rows


def test_full_size_listing_gives_250_plus_250_test_images_of_distinct_patients() -> None:
    rows = chexpert_listing(15_000)
    valid = [Row(f"valid/patient{p}/study1/view1_frontal.jpg", f"patient{p}", lab, "valid.csv", i + 2)
             for i, (p, lab) in enumerate([(64541, "good"), (64542, "Ungood"), (64543, "Ungood")])]
    plan = plan_split(rows, valid, seed=0)
    assert Counter(r.label for r in plan.test) == {"good": 250, "Ungood": 250}
    test_patients = {r.patient for r in plan.test}
    assert len(test_patients) == 500  # one image per test patient
    assert plan.train == sorted((r for r in rows if r.label == "good" and r.patient not in test_patients),
                                key=lambda r: (r.patient, r.rel))
    assert plan.valid == valid and not any("test has" in n for n in plan.notes)
    assert any("other frontal PA image(s) of the 500 test patients are left out" in n for n in plan.notes)
    again = plan_split(rows[::-1], valid[::-1], seed=0)  # input order does not matter
    assert (again.train, again.valid, again.test) == (plan.train, plan.valid, plan.test)
    assert {r.rel for r in plan_split(rows, valid, seed=1).test} != {r.rel for r in plan.test}


def test_small_listing_halves_the_normal_patients_and_says_so() -> None:
    rows = chexpert_listing(40, seed=3)
    normal_patients = {r.patient for r in rows if r.label == "good"}
    plan = plan_split(rows, [], seed=0)
    k = len(normal_patients) // 2
    assert Counter(r.label for r in plan.test) == {"good": k, "Ungood": k}
    assert plan.train and not {r.patient for r in plan.train} & {r.patient for r in plan.test}
    assert f"test has {k} normal and {k} abnormal images" in plan.notes[0]
    with pytest.raises(DataError, match="needs at least 2"):
        plan_split([r for r in rows if r.label == "Ungood" or r.patient == min(normal_patients)], [], seed=0)


# -- a generated raw set with images ---------------------------------------------------------------
def test_layout_manifest_labels_and_pixels(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    train_csv, valid_csv = csv_labels(raw, "train.csv"), csv_labels(raw, "valid.csv")
    by_split = {s: {r["source"]: r["label"] for r in rows if r["split"] == s} for s in ("train", "valid", "test")}
    assert by_split["valid"] == valid_csv and set(valid_csv.values()) == {"good", "Ungood"}
    assert all(train_csv[src] == lab for s in ("train", "test") for src, lab in by_split[s].items())
    assert set(by_split["train"].values()) == {"good"}
    test_patients = {r["patient"] for r in rows if r["split"] == "test"}
    normal_patients = {src.split("/")[1] for src, lab in train_csv.items() if lab == "good"}
    k = len(normal_patients) // 2
    assert Counter(by_split["test"].values()) == {"good": k, "Ungood": k} and len(test_patients) == 2 * k
    assert set(by_split["train"]) == {src for src, lab in train_csv.items()
                                      if lab == "good" and src.split("/")[1] not in test_patients}
    for r in rows:
        path = bench / r["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        patient, study, view = r["source"].split("/")[1:]
        assert r["path"] == f"{r['split']}/{r['label']}/img/{patient}_{study}_{view[:-4]}.png"
        assert r["patient"] == patient and r["mask"] == "" and r["slice"] == ""
        np.testing.assert_array_equal(png(path), decoded(raw / r["source"]))
    assert {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")} == {r["path"] for r in rows}


def test_read_table_counts_what_it_leaves_out(raw: Path) -> None:
    table = read_table(raw / "train.csv", "train")
    with open(raw / "train.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    frontal_pa = [r for r in listed if r["Frontal/Lateral"] == "Frontal" and r["AP/PA"] == "PA"]
    assert table.other_views == len(listed) - len(frontal_pa) > 0
    assert len(table.rows) == len(csv_labels(raw, "train.csv")) and table.unlabelled > 0
    assert len(table.rows) + table.unlabelled == len(frontal_pa)
    assert table.rows[0].line == 2 + listed.index(next(r for r in listed if r["Path"].endswith(table.rows[0].rel)))


def test_deterministic_idempotent_and_seeded(raw: Path, bench: Path, tmp_path: Path) -> None:
    CheXpert(raw, workers=1).prepare(tmp_path / "a", progress=False)
    assert tree_bytes(tmp_path / "a" / FOLDER) == tree_bytes(bench)
    again = CheXpert(raw, workers=2).prepare(tmp_path / "a", progress=False)
    assert again.kept and sum(again.counts.values()) == len(read_manifest(bench))
    CheXpert(raw, split_seed=1).prepare(tmp_path / "b", progress=False)
    test0 = {r["source"] for r in read_manifest(bench) if r["split"] == "test"}
    test1 = {r["source"] for r in read_manifest(tmp_path / "b" / FOLDER) if r["split"] == "test"}
    assert len(test1) == len(test0) and test1 != test0


def test_size_option_resizes_bicubic(raw: Path, tmp_path: Path) -> None:
    CheXpert(raw, size=(16, 12)).prepare(tmp_path, progress=False)
    rows = read_manifest(tmp_path / FOLDER)
    for r in rows[:5]:
        want = np.asarray(Image.fromarray(decoded(raw / r["source"])).resize((12, 16), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(png(tmp_path / FOLDER / r["path"]), want)


# -- bad inputs -------------------------------------------------------------------------------------
def test_wrong_raw_folders_name_the_right_one(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        CheXpert(tmp_path / "nowhere").prepare(tmp_path / "out", progress=False)
    for wrong in (raw.parent, raw / "train"):
        with pytest.raises(DataError) as exc:
            CheXpert(wrong).prepare(tmp_path / "out", progress=False)
        assert f"{wrong} has no train.csv" in str(exc.value) and f"pass --raw {str(raw)!r}" in str(exc.value)
    assert not (tmp_path / "out").exists()


def _edit_csv(root: Path, name: str, fn) -> None:
    with open(root / name, newline="") as fh:
        rows = list(csv.reader(fh))
    fn(rows)
    with open(root / name, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda rows: [r.pop(5) for r in rows], "train.csv has no column 'No Finding'"),
    (lambda rows: rows[3].__setitem__(HEADER.index("Edema"), "yes"),
     "train.csv line 4: Edema is 'yes'; CheXpert's values are 1.0, 0.0, -1.0 or blank"),
    (lambda rows: rows[1].__setitem__(0, "CheXpert-v1.0-small/valid/patient00001/study1/view1_frontal.jpg"),
     r"train.csv line 2: Path '.*valid/patient00001/study1/view1_frontal.jpg' is not an image under train/"),
])
def test_malformed_csv_is_named_with_its_line(raw: Path, tmp_path: Path, edit, message: str) -> None:
    bad = copy_raw(raw, tmp_path)
    first = next(csv.reader(open(bad / "train.csv")))
    assert first == list(HEADER)
    _edit_csv(bad, "train.csv", edit)
    if "line 4" in message:  # the edited row must be one the reader parses (frontal PA)
        with open(bad / "train.csv", newline="") as fh:
            row = list(csv.reader(fh))[3]
        assert row[3:5] == ["Frontal", "PA"], row
    with pytest.raises(DataError, match=message):
        CheXpert(bad).prepare(tmp_path / "out", progress=False)


def test_missing_image_named_by_the_csv_fails_or_is_skipped(raw: Path, bench: Path, tmp_path: Path) -> None:
    bad = copy_raw(raw, tmp_path)
    rows = read_manifest(bench)
    gone = next(r for r in rows if r["split"] == "train")
    (bad / gone["source"]).unlink()
    with open(bad / "train.csv", newline="") as fh:
        line = next(i for i, r in enumerate(csv.reader(fh), start=1) if r[0].endswith(gone["source"]))
    with pytest.raises(DataError) as exc:
        CheXpert(bad, on_error="fail").prepare(tmp_path / "fail", progress=False)
    assert f"1 image(s) named by the CSVs are missing under {bad}, e.g. {gone['source']} (train.csv line {line})" in str(
        exc.value)
    assert not (tmp_path / "fail").exists()
    summary = CheXpert(bad).prepare(tmp_path / "skip", progress=False)
    assert summary.skipped == [(gone["source"], f"named by train.csv line {line} but missing")]
    with open(tmp_path / "skip" / FOLDER / "skipped.csv", newline="") as fh:
        assert [(r["source"], r["reason"]) for r in csv.DictReader(fh)] == summary.skipped
    kept = read_manifest(tmp_path / "skip" / FOLDER)
    assert [r["source"] for r in kept] == [r["source"] for r in rows if r is not gone]  # the split is unchanged


def test_corrupt_jpeg_fails_or_is_skipped_and_listed(raw: Path, bench: Path, tmp_path: Path) -> None:
    bad = copy_raw(raw, tmp_path)
    victim = next(r for r in read_manifest(bench) if r["split"] == "test")
    (bad / victim["source"]).write_bytes(b"not a JPEG")
    with pytest.raises(DataError, match="cannot decode"):
        CheXpert(bad, on_error="fail").prepare(tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / FOLDER).exists()
    summary = CheXpert(bad, workers=2).prepare(tmp_path / "skip", progress=False)
    assert [s for s, _ in summary.skipped] == [victim["source"]] and "cannot decode" in summary.skipped[0][1]
    assert victim["source"] not in {r["source"] for r in read_manifest(tmp_path / "skip" / FOLDER)}


# -- the command line and the runner ----------------------------------------------------------------
def test_cli_prepare_list_and_errors(raw: Path, bench: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from bmad.cli import main

    assert main(["prepare", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "chexpert  ->  bench chexpert (folder CheXpert/)" in listed and "train.csv, valid.csv" in listed
    out = tmp_path / "data"
    assert main(["prepare", "chexpert", "--raw", str(raw), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    assert (out / FOLDER / "manifest.csv").read_bytes() == (bench / "manifest.csv").read_bytes()
    assert main(["prepare", "chexpert", "--raw", str(raw.parent), "--out", str(out)]) == 2
    assert "has no train.csv" in capsys.readouterr().err

    from bmad.cli import build_parser

    args = build_parser().parse_args(["prepare", "chexpert", "--raw", str(raw), "--out", "x", "--split-seed", "5",
                                      "--size", "256", "256", "--on-error", "fail", "--workers", "3"])
    r = CheXpert.from_args(args)
    assert (r.raw, r.split_seed, r.size, r.on_error, r.workers) == (raw, 5, (256, 256), "fail", 3)


def test_shots_draw_k_training_images_of_the_bench(bench: Path, toy_plugin: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = run_bmad("run", "--algo", "toy", "--bench", "chexpert", "--data-root", str(bench.parent), "--shots", "4",
                   "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    [record] = [json.loads(p.read_text()) for p in res.rglob("seed*.json")]
    rows = read_manifest(bench)
    train = {r["path"] for r in rows if r["split"] == "train"}
    assert record["status"] == "ok" and record["bench"] == "chexpert" and record["shots"] == 4
    assert record["data"]["n_train"] == 4 < len(train) and set(record["data"]["train_files"]) <= train
    assert record["data"]["n_test"] == sum(r["split"] == "test" for r in rows)
