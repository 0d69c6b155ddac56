"""The OCT2017 (Kermany) reorganizer: layout, patient-level stratified split, pixels, bad inputs, CLI."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError
from bmad.reorganizer import reorganizers
from datasets_prep.oct2017 import (
    CLASSES,
    OCT2017,
    REAL_SIZES,
    Item,
    parse_name,
    plan_eval_split,
    split_sizes,
)
from tests.conftest import real_fixture
from tests.prep_helpers import decoded, png, read_manifest, tree_bytes

FOLDER = "Retina_OCT2017"
SIZE = (48, 64)  # (H, W) of the generated B-scans: small, so the tests stay fast
N, PER_CLASS = 64, 10  # 64 images: 40 in test/ (10 per class), 24 NORMAL in train/


def raw_images(root: Path, split: str) -> dict[str, str]:
    """source -> class of every image under root/split/<CLASS>/."""
    return {p.relative_to(root).as_posix(): p.parent.name for p in sorted((root / split).glob("*/*.jpeg"))}


def by_class(rows: list[dict[str, str]]) -> Counter[tuple[str, str]]:
    return Counter((r["split"], r["source"].split("/")[1]) for r in rows)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = OCT2017.synthesize(tmp_path_factory.mktemp("raw"), n=N, seed=0, test_per_class=PER_CLASS, size=SIZE)
    (raw / "test" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored
    (raw / "train" / "NORMAL" / "Thumbs.db").write_bytes(b"\0junk")  # not an image: listed in skipped.csv
    return raw


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    summary = OCT2017(raw, workers=2).prepare(out, progress=False)
    assert summary.folder == out / FOLDER and not summary.kept
    return out / FOLDER


def copy_raw(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "raw"))


# -- the split rule, without data --------------------------------------------------------
def test_split_sizes_are_bmads_for_the_full_test_set_and_proportional_below() -> None:
    full = split_sizes(dict.fromkeys(CLASSES, 250))
    assert full == dict.fromkeys(CLASSES, (8, 242))
    assert sum(v for v, _ in full.values()) == 32 and sum(t for _, t in full.values()) == 968
    assert split_sizes({"NORMAL": 125, "CNV": 62, "DME": 10, "DRUSEN": 2}) == {
        "NORMAL": (4, 121), "CNV": (2, 60), "DME": (1, 9), "DRUSEN": (1, 1)}
    assert split_sizes({"NORMAL": 1, "CNV": 0, "DME": 300}) == {"NORMAL": (0, 1), "CNV": (0, 0), "DME": (8, 292)}


def kermany_like_items(seed: int = 0) -> list[Item]:
    """1,000 test items, 250 per class, patients of 1..4 images, some in two classes."""
    rng = np.random.default_rng(seed)
    items, pid, earlier = [], 100_000, []
    for cls in CLASSES:
        left, this = 250, []
        while left:
            k = min(int(rng.integers(1, 5)), left)
            p = earlier.pop() if earlier and rng.random() < 0.1 else pid  # sometimes a patient of an earlier class
            this.append(p)
            for j in range(k):
                name = f"{cls}-{p}-{j + 1}"
                items.append(Item(Path(f"/raw/test/{cls}/{name}.jpeg"), f"test/{cls}/{name}.jpeg", cls,
                                  *parse_name(name)))
            pid += 1
            left -= k
        earlier += this
    assert len({it.source for it in items}) == 1000
    return items


def test_eval_split_at_full_size_is_stratified_patient_level_and_seeded() -> None:
    items = kermany_like_items()
    plan = plan_eval_split(items, seed=0)
    assert not plan.shortfalls
    assert Counter(it.cls for it in plan.valid) == dict.fromkeys(CLASSES, 8)
    assert Counter(it.cls for it in plan.test) == dict.fromkeys(CLASSES, 242)
    assert not {it.patient for it in plan.valid} & {it.patient for it in plan.test}
    again = plan_eval_split(list(reversed(items)), seed=0)  # input order does not matter
    assert [it.source for it in again.valid] == [it.source for it in plan.valid]
    other = plan_eval_split(items, seed=1)
    assert {it.source for it in other.valid} != {it.source for it in plan.valid}


def test_eval_split_reports_a_quota_it_cannot_fill_without_splitting_a_patient() -> None:
    items = [Item(Path(f"/r/{c}-{p}-{j}.jpeg"), f"test/{c}/{c}-{p}-{j}.jpeg", c, str(p), str(j))
             for c, base in (("NORMAL", 10), ("CNV", 20)) for p in range(base, base + 5) for j in (1, 2)]
    plan = plan_eval_split(items, seed=0)  # 10 per class -> quota 1, but every patient has 2 images
    assert plan.valid == [] and len(plan.test) == 20
    assert len(plan.shortfalls) == 2 and "valid has 0 of 1 NORMAL images" in plan.shortfalls[0]


def test_parse_name() -> None:
    assert parse_name("CNV-53018-2") == ("53018", "2")
    assert parse_name("NORMAL-1001666-12") == ("1001666", "12")
    assert parse_name("scan 7") == ("scan 7", "")


# -- a generated raw set in the true layout ----------------------------------------------
def test_synthesize_writes_kermanys_layout_names_and_sizes(tmp_path: Path) -> None:
    raw = OCT2017.synthesize(tmp_path, n=8, seed=3, test_per_class=1, train_disease=1)
    assert raw == tmp_path
    files = sorted(raw.rglob("*.jpeg"))
    assert {p.relative_to(raw).parts[:2] for p in files} == {
        ("train", "NORMAL"), ("train", "CNV"), ("train", "DME"), ("train", "DRUSEN"),
        ("test", "NORMAL"), ("test", "CNV"), ("test", "DME"), ("test", "DRUSEN")}
    for p in files:
        cls, patient, number = p.stem.split("-")
        assert cls == p.parent.name and patient.isdigit() and number.isdigit()
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "L" and (im.height, im.width) in REAL_SIZES


def test_layout_manifest_labels_and_pixels(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    train_src, test_src = raw_images(raw, "train"), raw_images(raw, "test")
    assert {r["source"] for r in rows if r["split"] == "train"} == {s for s, c in train_src.items() if c == "NORMAL"}
    assert {r["source"] for r in rows if r["split"] != "train"} == set(test_src)
    assert len(rows) == len({r["source"] for r in rows}) == N
    for r in rows:
        path = bench / r["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        assert r["path"] == f"{r['split']}/{r['label']}/img/{Path(r['source']).stem}.png"
        assert r["mask"] == "" and not (bench / r["split"] / r["label"] / "anomaly_mask").exists()
        cls = r["source"].split("/")[1]
        assert r["label"] == ("good" if cls == "NORMAL" else "Ungood")
        assert (r["patient"], r["slice"]) == parse_name(Path(r["source"]).stem)
        np.testing.assert_array_equal(png(path), decoded(raw / r["source"]))
    assert {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")} == {r["path"] for r in rows}


def test_valid_and_test_are_stratified_and_patient_disjoint(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    sizes = split_sizes(Counter(raw_images(raw, "test").values()))
    counts = by_class(rows)
    for cls, (n_valid, n_test) in sizes.items():
        assert (counts[("valid", cls)], counts[("test", cls)]) == (n_valid, n_test)
    assert sizes == dict.fromkeys(CLASSES, (1, 9))  # 10 per class: 8/250 of 10 rounds to 0, at least 1
    valid = {r["patient"] for r in rows if r["split"] == "valid"}
    test = {r["patient"] for r in rows if r["split"] == "test"}
    assert valid and test and not valid & test


def test_train_test_patient_overlap_is_reported_and_kept(raw: Path, bench: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    rows = read_manifest(bench)
    eval_patients = {r["patient"] for r in rows if r["split"] != "train"}
    shared = [r for r in rows if r["split"] == "train" and r["patient"] in eval_patients]
    assert shared  # the generator, like Kermany's split, puts some test patients in train
    with caplog.at_level(logging.INFO, logger="datasets_prep.oct2017"):
        OCT2017(raw).plan()
    n_pat = len({r["patient"] for r in shared})
    assert f"{len(shared)} training image(s) of {n_pat} patient(s) who are also in the test set are kept" in caplog.text


def test_non_image_file_is_listed_in_skipped_csv(bench: Path) -> None:
    with open(bench / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [(s["source"], "not a .jpeg" in s["reason"]) for s in skipped] == [("train/NORMAL/Thumbs.db", True)]


def test_deterministic_idempotent_and_seeded(raw: Path, bench: Path, tmp_path: Path) -> None:
    OCT2017(raw, workers=1).prepare(tmp_path / "a", progress=False)
    assert tree_bytes(tmp_path / "a" / FOLDER) == tree_bytes(bench)
    again = OCT2017(raw, workers=1).prepare(tmp_path / "a", progress=False)
    assert again.kept and sum(again.counts.values()) == N
    OCT2017(raw, split_seed=1).prepare(tmp_path / "b", progress=False)
    valid = {r["source"] for r in read_manifest(bench) if r["split"] == "valid"}
    valid1 = {r["source"] for r in read_manifest(tmp_path / "b" / FOLDER) if r["split"] == "valid"}
    assert len(valid1) == len(valid) and valid1 != valid


def test_disjoint_train_leaves_out_test_patients(raw: Path, bench: Path, tmp_path: Path) -> None:
    OCT2017(raw, disjoint_train=True).prepare(tmp_path, progress=False)
    rows = read_manifest(tmp_path / FOLDER)
    eval_patients = {r["patient"] for r in rows if r["split"] != "train"}
    train = {r["source"] for r in rows if r["split"] == "train"}
    assert not {r["patient"] for r in rows if r["split"] == "train"} & eval_patients
    full_train = {r["source"]: r["patient"] for r in read_manifest(bench) if r["split"] == "train"}
    assert train == {s for s, p in full_train.items() if p not in eval_patients} != set(full_train)


def test_size_option_resizes_bicubic(raw: Path, tmp_path: Path) -> None:
    OCT2017(raw, size=(32, 40)).prepare(tmp_path, progress=False)
    rows = read_manifest(tmp_path / FOLDER)
    for r in rows[:8]:
        want = np.asarray(Image.fromarray(decoded(raw / r["source"])).resize((40, 32), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(png(tmp_path / FOLDER / r["path"]), want)
    for r in rows:
        with Image.open(tmp_path / FOLDER / r["path"]) as im:
            assert im.size == (40, 32)


def test_real_kermany_jpeg_is_written_with_its_decoded_pixels(tmp_path: Path) -> None:
    fixture = real_fixture("oct_kermany", "CNV-53018-2.jpeg")
    raw = OCT2017.synthesize(tmp_path / "raw", n=24, seed=1, test_per_class=4, size=SIZE)
    shutil.copy(fixture, raw / "test" / "CNV" / fixture.name)
    OCT2017(raw).prepare(tmp_path / "out", progress=False)
    bench = tmp_path / "out" / FOLDER
    [row] = [r for r in read_manifest(bench) if r["source"] == "test/CNV/CNV-53018-2.jpeg"]
    assert row["label"] == "Ungood" and row["patient"] == "53018" and row["slice"] == "2"
    assert row["path"] == f"{row['split']}/Ungood/img/CNV-53018-2.png"
    out = png(bench / row["path"])
    src = decoded(fixture)
    assert out.shape == src.shape == (496, 512) and out.std() > 10  # a real B-scan, not a blank
    np.testing.assert_array_equal(out, src)


# -- the Kaggle mirror ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = OCT2017.synthesize(tmp_path_factory.mktemp("kaggle"), n=64, seed=2, test_per_class=10, size=SIZE,
                             kaggle=True)
    assert sorted(p.name for p in (top / "OCT2017 ").iterdir()) == ["test", "train", "val"]
    return top


def test_kaggle_folder_one_level_too_high_names_the_right_one(kaggle: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        OCT2017(kaggle).prepare(tmp_path, progress=False)
    assert "has no train/ and no test/" in str(exc.value)
    assert repr(str(kaggle / "OCT2017 ")) in str(exc.value) and "trailing space" in str(exc.value)
    assert not (tmp_path / FOLDER).exists()


def test_kaggle_val_and_test_are_pooled_and_resplit_by_default(kaggle: Path, tmp_path: Path) -> None:
    root = kaggle / "OCT2017 "
    OCT2017(root).prepare(tmp_path, progress=False)
    rows = read_manifest(tmp_path / FOLDER)
    pool = set(raw_images(root, "test")) | set(raw_images(root, "val"))
    assert {r["source"] for r in rows if r["split"] != "train"} == pool
    assert any(s.startswith("val/") for s in pool)
    counts = by_class(rows)
    assert all((counts[("valid", c)], counts[("test", c)]) == (1, 9) for c in CLASSES)
    assert not {r["patient"] for r in rows if r["split"] == "valid"} & {r["patient"] for r in rows
                                                                       if r["split"] == "test"}


def test_kaggle_split_keeps_the_mirrors_val_and_test(kaggle: Path, tmp_path: Path) -> None:
    root = kaggle / "OCT2017 "
    OCT2017(root, split="kaggle").prepare(tmp_path, progress=False)
    rows = read_manifest(tmp_path / FOLDER)
    assert {r["source"] for r in rows if r["split"] == "valid"} == set(raw_images(root, "val"))
    assert {r["source"] for r in rows if r["split"] == "test"} == set(raw_images(root, "test"))


def test_same_name_in_val_and_test_gets_two_outputs(kaggle: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(kaggle / "OCT2017 ", tmp_path / "raw"))
    src = max((root / "test" / "DRUSEN").iterdir())
    (root / "val" / "DRUSEN" / src.name).write_bytes(src.read_bytes())  # a duplicate under the same name
    OCT2017(root, split="kaggle").prepare(tmp_path / "out", progress=False)
    rows = {r["source"]: r for r in read_manifest(tmp_path / "out" / FOLDER)}
    a, b = rows[f"test/DRUSEN/{src.name}"], rows[f"val/DRUSEN/{src.name}"]
    assert a["path"] == f"test/Ungood/img/{src.stem}.png"
    assert b["path"] == f"valid/Ungood/img/{src.stem}.png"
    OCT2017(root).prepare(tmp_path / "out2", progress=False)  # pooled: may land in the same folder
    rows = {r["source"]: r for r in read_manifest(tmp_path / "out2" / FOLDER)}
    a, b = rows[f"test/DRUSEN/{src.name}"], rows[f"val/DRUSEN/{src.name}"]
    assert a["path"] != b["path"] and a["sha256"] == b["sha256"] and a["split"] == b["split"]  # same patient


def test_kaggle_split_without_val_folder_is_refused(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs the Kaggle mirror's val/"):
        OCT2017(raw, split="kaggle").prepare(tmp_path, progress=False)


# -- bad inputs ----------------------------------------------------------------------------
def test_missing_folders_are_named(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        OCT2017(tmp_path / "nowhere").prepare(tmp_path / "out", progress=False)
    bad = copy_raw(raw, tmp_path)
    shutil.rmtree(bad / "test")
    with pytest.raises(DataError) as exc:
        OCT2017(bad).prepare(tmp_path / "out", progress=False)
    assert f"{bad} has no test/ folder" in str(exc.value)
    shutil.copytree(raw / "test", bad / "test")
    shutil.rmtree(bad / "train" / "NORMAL")
    with pytest.raises(DataError, match=r"no NORMAL training images in .*train/NORMAL"):
        OCT2017(bad).prepare(tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / FOLDER).exists()


@pytest.mark.parametrize("where", ["test/AMD", "train/normal_old"])
def test_unexpected_class_folder_is_refused(raw: Path, tmp_path: Path, where: str) -> None:
    bad = copy_raw(raw, tmp_path)
    (bad / where).mkdir()
    shutil.copy(next((bad / "test" / "CNV").iterdir()), bad / where / "CNV-1-1.jpeg")
    with pytest.raises(DataError) as exc:
        OCT2017(bad).prepare(tmp_path / "out", progress=False)
    assert f"unexpected class folder {bad / where}" in str(exc.value) and "NORMAL, CNV, DME, DRUSEN" in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def corrupt_raw(raw: Path, tmp_path: Path) -> Path:
    bad = copy_raw(raw, tmp_path)
    dme = sorted((bad / "test" / "DME").iterdir())
    data = dme[0].read_bytes()
    dme[0].write_bytes(data[: len(data) // 2])  # truncated JPEG
    dme[1].write_bytes(b"this is not a JPEG at all")  # garbage with a .jpeg name
    return bad


def test_corrupt_jpeg_fails_with_on_error_fail(corrupt_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        OCT2017(corrupt_raw, on_error="fail").prepare(tmp_path / "out", progress=False)
    assert "cannot decode" in str(exc.value) and str(corrupt_raw / "test" / "DME") in str(exc.value)
    assert not (tmp_path / "out" / FOLDER).exists()


def test_corrupt_jpeg_is_skipped_and_listed(corrupt_raw: Path, tmp_path: Path) -> None:
    summary = OCT2017(corrupt_raw, workers=2).prepare(tmp_path / "out", progress=False)
    dme = sorted((corrupt_raw / "test" / "DME").iterdir())
    bad = {p.relative_to(corrupt_raw).as_posix() for p in dme[:2]}
    assert bad <= {s for s, _ in summary.skipped}
    bench = tmp_path / "out" / FOLDER
    with open(bench / "skipped.csv", newline="") as fh:
        listed = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert all("cannot decode" in listed[s] for s in bad)
    rows = read_manifest(bench)
    assert not bad & {r["source"] for r in rows} and len(rows) == N - 2
    assert "skipped 3 input(s)" in summary.text()


# -- the command line ----------------------------------------------------------------------
def test_cli_prepare_writes_the_same_bench(raw: Path, bench: Path, tmp_path: Path) -> None:
    from bmad.cli import main

    assert "oct2017" in reorganizers.names()
    out = tmp_path / "data"
    assert main(["prepare", "oct2017", "--raw", str(raw), "--out", str(out), "--workers", "2",
                 "--split-seed", "0", "--no-progress"]) == 0
    assert (out / FOLDER / "manifest.csv").read_bytes() == (bench / "manifest.csv").read_bytes()
    assert main(["prepare", "oct2017", "--raw", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_cli_options_reach_the_constructor(raw: Path) -> None:
    from bmad.cli import build_parser

    args = build_parser().parse_args(["prepare", "oct2017", "--raw", str(raw), "--out", "x", "--split", "kaggle",
                                      "--split-seed", "5", "--size", "496", "512", "--disjoint-train",
                                      "--on-error", "fail", "--workers", "3"])
    r = OCT2017.from_args(args)
    assert (r.raw, r.split, r.split_seed, r.size, r.disjoint_train, r.on_error, r.workers) == (
        raw, "kaggle", 5, (496, 512), True, "fail", 3)
