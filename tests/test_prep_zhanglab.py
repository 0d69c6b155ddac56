"""The ZhangLab (Kermany chest X-ray) reorganizer: protocol sizes, patient-level valid, pixels, bad inputs, CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError
from datasets_prep.zhanglab import (
    KERMANY_TEST,
    KERMANY_TRAIN,
    ZhangLab,
    parse_name,
    plan_valid,
    scan_split,
    valid_sizes,
)
from tests.conftest import real_fixture, run_bmad
from tests.prep_helpers import decoded, png, read_manifest, tree_bytes

FOLDER = "ZhangLab"
SIZE = (24, 32)  # (H, W) of the generated radiographs: small, so the tests stay fast
N = 120  # images of the generated raw set: 28 + 79 train, 5 + 8 test (Kermany's proportions)


def raw_images(root: Path, split: str) -> dict[str, str]:
    """source -> class of every image under root/split/<CLASS>/."""
    return {p.relative_to(root).as_posix(): p.parent.name for p in sorted((root / split).glob("*/*.jpeg"))}


def counts(rows: list[dict[str, str]]) -> Counter[tuple[str, str]]:
    return Counter((r["split"], r["label"]) for r in rows)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = ZhangLab.synthesize(tmp_path_factory.mktemp("raw"), n=N, seed=0, size=SIZE)
    (raw / "test" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored
    (raw / "train" / "NORMAL" / "Thumbs.db").write_bytes(b"\0junk")  # not an image: listed in skipped.csv
    return raw


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    summary = ZhangLab(raw, workers=2).prepare(out, progress=False)
    assert summary.folder == out / FOLDER and not summary.kept
    return out / FOLDER


def copy_raw(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "raw"))


# -- the protocol, on a full-size listing of empty files -------------------------------------
def kermany_listing(root: Path, seed: int = 0, kaggle_val: bool = False) -> Path:
    """Empty files named and counted like Kermany's chest X-rays: train 1,349 NORMAL + 3,883
    PNEUMONIA, test 234 + 390; patients of 1..3 images; 20 test NORMAL patients also have
    training images. ``kaggle_val``: the Kaggle mirror's layout, 8 + 8 of train/ moved to val/."""
    rng = np.random.default_rng(seed)
    pid = iter(range(1, 100_000))
    shared: list[int] = []

    def put(split: str, cls: str, total: int) -> None:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        left, k = total, 0
        while left:
            m = min(int(rng.integers(1, 4)), left)
            p = shared.pop() if split == "train" and cls == "NORMAL" and shared else next(pid)
            if split == "test" and cls == "NORMAL" and len(shared) < 20:
                shared.append(p)
            for j in range(1, m + 1):
                k += 1
                name = f"IM-{p:04d}-{j:04d}" if cls == "NORMAL" else f"person{p}_{('bacteria', 'virus')[p % 2]}_{k}"
                (root / split / cls / f"{name}.jpeg").touch()
            left -= m

    for split, table in (("test", KERMANY_TEST), ("train", KERMANY_TRAIN)):
        for cls, total in table.items():
            put(split, cls, total)
    if kaggle_val:
        for cls in KERMANY_TRAIN:
            (root / "val" / cls).mkdir(parents=True)
            for p in sorted((root / "train" / cls).iterdir())[:8]:
                p.rename(root / "val" / cls / p.name)
    return root


def by_split(chosen: list) -> Counter[tuple[str, str]]:
    return Counter((split, it.cls) for split, _, it in chosen)


def test_full_size_listing_gives_the_protocols_sizes(tmp_path: Path) -> None:
    root = kermany_listing(tmp_path / "mendeley")
    _, chosen, ignored = ZhangLab(root).plan()
    assert not ignored
    assert by_split(chosen) == {("train", "NORMAL"): 1341, ("valid", "NORMAL"): 8, ("valid", "PNEUMONIA"): 8,
                                ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}
    assert {it.source for s, _, it in chosen if s == "test"} == set(raw_images(root, "test"))
    patients = {s: {it.patient for split, _, it in chosen if split == s} for s in ("train", "valid", "test")}
    assert not patients["valid"] & (patients["train"] | patients["test"])
    assert len(patients["train"] & patients["test"]) == 20  # Kermany's train/test overlap is kept, as is
    labels = {(s, it.cls): lab for s, lab, it in chosen}
    assert labels[("test", "NORMAL")] == labels[("valid", "NORMAL")] == labels[("train", "NORMAL")] == "good"
    assert labels[("test", "PNEUMONIA")] == labels[("valid", "PNEUMONIA")] == "Ungood"


def test_kaggle_mirror_listing_pools_val_or_keeps_it(tmp_path: Path) -> None:
    root = kermany_listing(tmp_path / "kaggle", kaggle_val=True)
    assert len(list((root / "train" / "NORMAL").iterdir())) == 1341
    _, pooled, _ = ZhangLab(root).plan()
    assert by_split(pooled)[("train", "NORMAL")] == 1341 and by_split(pooled)[("valid", "PNEUMONIA")] == 8
    _, kept, _ = ZhangLab(root, split="kaggle").plan()
    assert by_split(kept) == {("train", "NORMAL"): 1341, ("valid", "NORMAL"): 8, ("valid", "PNEUMONIA"): 8,
                              ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}
    assert {it.source for s, _, it in kept if s == "valid"} == set(raw_images(root, "val"))


def test_valid_sizes_are_8_per_class_and_proportional_below() -> None:
    assert valid_sizes({"NORMAL": 1349, "PNEUMONIA": 3883}) == {"NORMAL": 8, "PNEUMONIA": 8}
    assert valid_sizes({"NORMAL": 2000, "PNEUMONIA": 5000}) == {"NORMAL": 8, "PNEUMONIA": 8}
    assert valid_sizes({"NORMAL": 523, "PNEUMONIA": 389}) == {"NORMAL": 3, "PNEUMONIA": 1}
    assert valid_sizes({"NORMAL": 2, "PNEUMONIA": 1}) == {"NORMAL": 1, "PNEUMONIA": 0}


def test_plan_valid_is_patient_level_seeded_and_order_free(tmp_path: Path) -> None:
    root = kermany_listing(tmp_path / "raw")
    pool = [it for c in KERMANY_TRAIN for it in scan_split(root, "train")[c]]
    test = {it.patient for c in KERMANY_TEST for it in scan_split(root, "test")[c]}
    plan = plan_valid(pool, seed=0, avoid=test)
    assert not plan.shortfalls and Counter(it.cls for it in plan.valid) == {"NORMAL": 8, "PNEUMONIA": 8}
    chosen = {it.patient for it in plan.valid}
    assert not chosen & test
    assert {it.source for it in pool if it.patient in chosen} == {it.source for it in plan.valid}  # whole patients
    assert [it.source for it in plan_valid(pool[::-1], seed=0, avoid=test).valid] == [it.source for it in plan.valid]
    assert {it.source for it in plan_valid(pool, seed=1, avoid=test).valid} != {it.source for it in plan.valid}


def test_plan_valid_never_takes_a_test_patient(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for cls, fmt in (("NORMAL", "IM-{p:04d}-0001"), ("PNEUMONIA", "person{p}_virus_{p}")):
        (root / "train" / cls).mkdir(parents=True)
        for p in range(10):
            (root / "train" / cls / f"{fmt.format(p=p)}.jpeg").touch()
    pool = [it for items in scan_split(root, "train").values() for it in items]
    avoid = {it.patient for it in pool} - {"IM-0007", "person3"}
    for seed in range(5):
        assert [it.patient for it in plan_valid(pool, seed, avoid).valid] == ["IM-0007", "person3"]


def test_plan_valid_reports_a_quota_it_cannot_fill(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for p in range(6):  # 6 NORMAL patients of 2 images each: quota 1 cannot be met with whole patients
        for j in (1, 2):
            (root / "train" / "NORMAL").mkdir(parents=True, exist_ok=True)
            (root / "train" / "NORMAL" / f"IM-{p:04d}-{j:04d}.jpeg").touch()
    plan = plan_valid(scan_split(root, "train")["NORMAL"], seed=0)
    assert plan.valid == [] and plan.shortfalls == [
        "valid has 0 of 1 NORMAL images: no other patient of the training pool fits without being a test patient "
        "or overshooting a quota"]


def test_parse_name_covers_both_releases() -> None:
    assert parse_name("IM-0115-0001") == ("IM-0115", "0001")
    assert parse_name("NORMAL2-IM-1427-0001") == ("NORMAL2-IM-1427", "0001")
    assert parse_name("person1946_bacteria_4874") == ("person1946", "4874")
    assert parse_name("person1_virus_6") == ("person1", "6")
    assert parse_name("BACTERIA-7422-0001") == ("7422", "0001")
    assert parse_name("NORMAL-28501-0002") == ("28501", "0002")
    assert parse_name("scan 7") == ("scan 7", "")


# -- a generated raw set with images ----------------------------------------------------------
def test_layout_manifest_labels_and_pixels(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    train_src, test_src = raw_images(raw, "train"), raw_images(raw, "test")
    assert {r["source"] for r in rows if r["split"] == "test"} == set(test_src)
    assert {r["source"] for r in rows if r["split"] != "test"} <= set(train_src)
    normals = {s for s, c in train_src.items() if c == "NORMAL"}
    assert {r["source"] for r in rows if r["split"] == "train"} | {
        r["source"] for r in rows if r["split"] == "valid" and r["label"] == "good"} == normals
    pool = Counter(train_src.values())
    want = valid_sizes(pool)
    raw_test = Counter(test_src.values())
    assert counts(rows) == {("train", "good"): pool["NORMAL"] - want["NORMAL"], ("valid", "good"): want["NORMAL"],
                            ("valid", "Ungood"): want["PNEUMONIA"], ("test", "good"): raw_test["NORMAL"],
                            ("test", "Ungood"): raw_test["PNEUMONIA"]}
    assert want == {"NORMAL": 1, "PNEUMONIA": 1} and raw_test == {"NORMAL": 5, "PNEUMONIA": 8}
    for r in rows:
        path = bench / r["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        assert r["path"] == f"{r['split']}/{r['label']}/img/{Path(r['source']).stem}.png" and r["mask"] == ""
        assert r["label"] == ("good" if r["source"].split("/")[1] == "NORMAL" else "Ungood")
        assert (r["patient"], r["slice"]) == parse_name(Path(r["source"]).stem)
        np.testing.assert_array_equal(png(path), decoded(raw / r["source"]))
    assert {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")} == {r["path"] for r in rows}
    assert not any((bench / s / "Ungood" / "anomaly_mask").exists() for s in ("valid", "test"))


def test_valid_patients_are_in_no_other_split(raw: Path, bench: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = read_manifest(bench)
    patients = {s: {r["patient"] for r in rows if r["split"] == s} for s in ("train", "valid", "test")}
    assert patients["valid"] and not patients["valid"] & (patients["train"] | patients["test"])
    shared = [r for r in rows if r["split"] == "train" and r["patient"] in patients["test"]]
    assert shared  # the generator, like Kermany's split, gives a test patient training images
    with caplog.at_level(logging.INFO, logger="datasets_prep.zhanglab"):
        ZhangLab(raw).plan()
    assert f"{len(shared)} training image(s) of 1 patient(s) who are also in the test set are kept" in caplog.text
    assert "test/ has 5 NORMAL and 8 PNEUMONIA images; the protocol's test set is Kermany's 234 + 390" in caplog.text


def test_non_image_file_is_listed_in_skipped_csv(bench: Path) -> None:
    with open(bench / "skipped.csv", newline="") as fh:
        assert [(s["source"], "not a .jpeg" in s["reason"]) for s in csv.DictReader(fh)] == [
            ("train/NORMAL/Thumbs.db", True)]


def test_deterministic_idempotent_and_seeded(raw: Path, bench: Path, tmp_path: Path) -> None:
    ZhangLab(raw, workers=1).prepare(tmp_path / "a", progress=False)
    assert tree_bytes(tmp_path / "a" / FOLDER) == tree_bytes(bench)
    again = ZhangLab(raw, workers=2).prepare(tmp_path / "a", progress=False)
    assert again.kept and sum(again.counts.values()) == len(read_manifest(bench)) == 42
    valid = {r["source"] for r in read_manifest(bench) if r["split"] == "valid"}
    others = set()
    for seed in (1, 2, 3):
        _, chosen, _ = ZhangLab(raw, split_seed=seed).plan()
        others.add(frozenset(it.source for s, _, it in chosen if s == "valid"))
    assert any(o != valid for o in others) and all(len(o) == 2 for o in others)


def test_mendeley_v3_names_and_size_option(tmp_path: Path) -> None:
    raw = ZhangLab.synthesize(tmp_path / "raw", n=40, seed=1, size=SIZE, naming="mendeley")
    assert {p.name.split("-")[0] for p in raw.rglob("*.jpeg")} == {"NORMAL", "BACTERIA", "VIRUS"}
    ZhangLab(raw, size=(16, 20)).prepare(tmp_path / "out", progress=False)
    rows = read_manifest(tmp_path / "out" / FOLDER)
    assert all(r["patient"].isdigit() and r["slice"].isdigit() for r in rows)
    for r in rows[:6]:
        want = np.asarray(Image.fromarray(decoded(raw / r["source"])).resize((20, 16), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(png(tmp_path / "out" / FOLDER / r["path"]), want)
    assert {Image.open(tmp_path / "out" / FOLDER / r["path"]).size for r in rows} == {(20, 16)}


def test_synthesize_default_sizes_are_radiograph_like(tmp_path: Path) -> None:
    raw = ZhangLab.synthesize(tmp_path / "raw", n=8, seed=2)
    sizes = [Image.open(p).size for p in raw.rglob("*.jpeg")]
    assert len(sizes) == 8 and all(400 <= h < 2000 and 1.1 * h <= w + 1 for w, h in sizes)
    img = decoded(next(raw.glob("train/NORMAL/*.jpeg")))
    assert img.std() > 10  # a phantom with structure, not a blank


# -- the Kaggle mirror ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = ZhangLab.synthesize(tmp_path_factory.mktemp("kaggle"), n=N, seed=3, size=SIZE, kaggle_val=True)
    assert sorted(p.name for p in (top / "chest_xray").iterdir()) == ["test", "train", "val"]
    return top


def test_kaggle_folder_one_level_too_high_names_the_right_one(kaggle: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        ZhangLab(kaggle).prepare(tmp_path, progress=False)
    assert "has no train/ and no test/ folder" in str(exc.value) and repr(str(kaggle / "chest_xray")) in str(exc.value)
    assert not (tmp_path / FOLDER).exists()


def test_kaggle_split_keeps_val_and_default_pools_it(kaggle: Path, tmp_path: Path) -> None:
    root = kaggle / "chest_xray"
    ZhangLab(root, split="kaggle").prepare(tmp_path / "k", progress=False)
    rows = read_manifest(tmp_path / "k" / FOLDER)
    assert {r["source"] for r in rows if r["split"] == "valid"} == set(raw_images(root, "val"))
    assert {r["source"] for r in rows if r["split"] == "train"} == {
        s for s, c in raw_images(root, "train").items() if c == "NORMAL"}
    ZhangLab(root).prepare(tmp_path / "p", progress=False)
    pooled = read_manifest(tmp_path / "p" / FOLDER)
    assert counts(pooled) == counts(rows)
    assert {r["source"] for r in pooled if r["split"] != "test"} <= set(raw_images(root, "train")) | set(
        raw_images(root, "val"))


def test_kaggle_split_without_val_folder_is_refused(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs the Kaggle mirror's val/"):
        ZhangLab(raw, split="kaggle").prepare(tmp_path, progress=False)


# -- bad inputs ------------------------------------------------------------------------------------
def test_missing_folders_are_named(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ZhangLab(tmp_path / "nowhere").prepare(tmp_path / "out", progress=False)
    bad = copy_raw(raw, tmp_path)
    shutil.rmtree(bad / "test")
    with pytest.raises(DataError, match=f"{bad} has no test/ folder"):
        ZhangLab(bad).prepare(tmp_path / "out", progress=False)
    shutil.copytree(raw / "test", bad / "test")
    shutil.rmtree(bad / "test" / "PNEUMONIA")
    with pytest.raises(DataError, match="needs NORMAL and PNEUMONIA images"):
        ZhangLab(bad).prepare(tmp_path / "out", progress=False)
    shutil.copytree(raw / "test" / "PNEUMONIA", bad / "test" / "PNEUMONIA")
    shutil.rmtree(bad / "train" / "NORMAL")
    with pytest.raises(DataError, match=r"no NORMAL training images in .*train/NORMAL"):
        ZhangLab(bad).prepare(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_oct_folder_passed_by_mistake_points_at_oct2017(tmp_path: Path) -> None:
    from datasets_prep.oct2017 import OCT2017

    oct_raw = OCT2017.synthesize(tmp_path / "oct", n=12, seed=0, test_per_class=1, size=(16, 16))
    with pytest.raises(DataError) as exc:
        ZhangLab(oct_raw).prepare(tmp_path / "out", progress=False)
    assert "unexpected class folder" in str(exc.value) and "bmad prepare oct2017" in str(exc.value)


@pytest.fixture
def corrupt_raw(raw: Path, tmp_path: Path) -> Path:
    bad = copy_raw(raw, tmp_path)
    pneumonia = sorted((bad / "test" / "PNEUMONIA").iterdir())
    data = pneumonia[0].read_bytes()
    pneumonia[0].write_bytes(data[: len(data) // 3])  # truncated JPEG
    pneumonia[1].write_bytes(b"not a JPEG")
    return bad


def test_corrupt_jpeg_fails_or_is_skipped_and_listed(corrupt_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot decode"):
        ZhangLab(corrupt_raw, on_error="fail").prepare(tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / FOLDER).exists()
    summary = ZhangLab(corrupt_raw, workers=2).prepare(tmp_path / "skip", progress=False)
    bad = {p.relative_to(corrupt_raw).as_posix() for p in sorted((corrupt_raw / "test" / "PNEUMONIA").iterdir())[:2]}
    with open(tmp_path / "skip" / FOLDER / "skipped.csv", newline="") as fh:
        listed = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert bad <= set(listed) and all("cannot decode" in listed[s] for s in bad)
    rows = read_manifest(tmp_path / "skip" / FOLDER)
    assert not bad & {r["source"] for r in rows} and counts(rows)[("test", "Ungood")] == 8 - 2
    assert "skipped 3 input(s)" in summary.text()


# -- real pixels: PneumoniaMNIST, a 28x28 copy of the same Kermany chest X-rays --------------------
def test_pneumoniamnist_as_a_kermany_folder_gives_the_protocols_test_set(tmp_path: Path) -> None:
    """MedMNIST's test split is Kermany's test set (234 + 390): the plan keeps it whole, and a
    subset goes through prepare with its real pixels."""
    data = np.load(real_fixture("medmnist", "pneumoniamnist_varun19424.npz"))
    raw = tmp_path / "chest_xray"
    sources = (("test", data["test_images"], data["test_labels"].ravel()),
               ("train", data["val_images"], data["val_labels"].ravel()),  # MedMNIST's val: 135 + 389 of train
               ("train", data["train_images"][data["train_labels"].ravel() == 0], np.zeros(388, int)))
    for k, (split, images, labels) in enumerate(sources):
        for i, (img, lab) in enumerate(zip(images, labels)):
            cls = ("NORMAL", "PNEUMONIA")[int(lab)]
            name = f"IM-{k}{i:03d}-0001" if cls == "NORMAL" else f"person{k}{i:03d}_bacteria_{i}"
            (raw / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(raw / split / cls / f"{name}.jpeg", quality=95)
    _, chosen, _ = ZhangLab(raw).plan()
    want = valid_sizes({"NORMAL": 135 + 388, "PNEUMONIA": 389})
    assert want == {"NORMAL": 3, "PNEUMONIA": 1}
    assert Counter((s, lab) for s, lab, _ in chosen) == {
        ("test", "good"): 234, ("test", "Ungood"): 390, ("valid", "good"): 3, ("valid", "Ungood"): 1,
        ("train", "good"): 135 + 388 - 3}

    small = tmp_path / "small"  # every 25th image of each folder: enough to check the pixels, quick to write
    for folder in sorted(raw.glob("*/*")):
        (small / folder.relative_to(raw)).mkdir(parents=True)
        for p in sorted(folder.iterdir())[::25]:
            shutil.copy(p, small / p.relative_to(raw))
    ZhangLab(small, workers=2).prepare(tmp_path / "out", progress=False)
    rows = read_manifest(tmp_path / "out" / FOLDER)
    assert counts(rows)[("test", "good")] == 10 and counts(rows)[("test", "Ungood")] == 16
    for r in rows:
        out = png(tmp_path / "out" / FOLDER / r["path"])
        assert out.shape == (28, 28) and out.std() > 5  # a real radiograph, not a blank
        np.testing.assert_array_equal(out, decoded(small / r["source"]))


# -- the command line and the runner ---------------------------------------------------------------
def test_cli_prepare_list_and_errors(raw: Path, bench: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from bmad.cli import main

    assert main(["prepare", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "zhanglab  ->  bench zhanglab (folder ZhangLab/)" in listed and "test/{NORMAL,PNEUMONIA}" in listed
    out = tmp_path / "data"
    assert main(["prepare", "zhanglab", "--raw", str(raw), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    assert (out / FOLDER / "manifest.csv").read_bytes() == (bench / "manifest.csv").read_bytes()
    assert main(["prepare", "zhanglab", "--raw", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_options_reach_the_constructor(raw: Path) -> None:
    from bmad.cli import build_parser

    args = build_parser().parse_args(["prepare", "zhanglab", "--raw", str(raw), "--out", "x", "--split", "kaggle",
                                      "--split-seed", "5", "--size", "256", "256", "--on-error", "fail",
                                      "--workers", "3"])
    r = ZhangLab.from_args(args)
    assert (r.raw, r.split, r.split_seed, r.size, r.on_error, r.workers) == (raw, "kaggle", 5, (256, 256), "fail", 3)


def test_shots_draw_k_training_images_of_the_bench(bench: Path, toy_plugin: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = run_bmad("run", "--algo", "toy", "--bench", "zhanglab", "--data-root", str(bench.parent), "--shots", "4",
                   "--seeds", "2", "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    records = [json.loads(p.read_text()) for p in sorted(res.rglob("seed*.json"))]
    assert [r["seed"] for r in records] == [0, 1] and all(r["status"] == "ok" for r in records)
    rows = read_manifest(bench)
    train = {r["path"] for r in rows if r["split"] == "train"}
    assert len(train) > 4
    for r in records:
        assert r["bench"] == "zhanglab" and r["shots"] == 4 and r["data"]["n_train"] == 4
        assert len(set(r["data"]["train_files"])) == 4 and set(r["data"]["train_files"]) <= train
        assert (r["data"]["n_valid"], r["data"]["n_test"]) == (counts(rows)[("valid", "good")] + 1, 13)
    assert records[0]["data"]["train_files"] != records[1]["data"]["train_files"]
