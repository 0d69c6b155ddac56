"""The RESC reorganizer: raw AI Challenger layout -> Retina_RESC bench."""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError, UsageError
from bmad.reorganizer import reorganizers
from datasets_prep.common import proportional
from datasets_prep.resc import (
    BMAD_EVAL_SLICES,
    BMAD_TEST,
    BMAD_VALID,
    RESC,
    choose_valid_subjects,
    plan_split,
    spread,
    valid_quota,
)
from tests.conftest import real_fixture
from tests.prep_helpers import read_manifest, tree_bytes

FOLDER = "Retina_RESC"
TRAIN = Path("ai_challenger_fl2018_trainingset/Edema_trainingset")
VALID = Path("ai_challenger_fl2018_validationset/Edema_validationset")
SHAPE = (48, 24)  # rows x columns: reduced from RESC's 1024 x 512 for speed
SLICES = 8


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def label_of(raw: Path, image_rel: str) -> Path:
    """The raw label file of a raw B-scan (AI Challenger naming: <case>.img -> <case>_labelMark)."""
    img = raw / image_rel
    case_dir = img.parent
    labels = case_dir.parent.parent / "label_images"
    for name in (case_dir.name.removesuffix(".img") + "_labelMark", case_dir.name):
        for cand in (labels / name / img.name, *(labels / name).glob(img.stem + ".*")):
            if cand.is_file():
                return cand
    raise AssertionError(f"no label for {img}")


def raw_scans(raw: Path, origin: Path) -> list[Path]:
    return sorted(p for p in (raw / origin / "original_images").rglob("*") if p.suffix in (".bmp", ".png"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 training + 4 validation cubes of 8 B-scans; two validation cubes are one patient's two eyes."""
    raw = RESC.synthesize(tmp_path_factory.mktemp("raw"), n=9, n_valid=4, slices=SLICES, shape=SHAPE)
    for sub in ("original_images", "label_images"):
        for d in sorted((raw / VALID / sub).iterdir()):
            if d.name.startswith("P1008_"):
                d.rename(d.with_name(d.name.replace("P1008_", "P1007_").replace("_OD_", "_OD2_")))
    # what else a real download holds, all ignored
    (raw / "README.txt").write_text("junk\n")
    (raw / VALID / "groundtruth").mkdir()
    (raw / VALID / "groundtruth" / "x_labelMark_volumes.npy").write_bytes(b"\x93NUMPY")
    (raw / "ai_challenger_fl2018_testset" / "Edema_testset" / "original_images" / "Q.img").mkdir(parents=True)
    next((raw / TRAIN / "original_images").iterdir()).joinpath("Thumbs.db").write_bytes(b"\0")
    return raw


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    summary = RESC(raw, workers=2).prepare(out, progress=False)
    assert not summary.skipped and not summary.kept
    return out / FOLDER


# -- the size rule and the split, without data -----------------------------------------
def test_valid_quota_is_bmads_for_the_full_set_and_proportional_below() -> None:
    assert valid_quota(BMAD_EVAL_SLICES) == BMAD_VALID == (45, 70)
    assert valid_quota(2 * BMAD_EVAL_SLICES) == (45, 70)
    assert BMAD_EVAL_SLICES == 15 * 128 == sum(BMAD_VALID) + sum(BMAD_TEST)
    for n in range(3, BMAD_EVAL_SLICES + 1):
        g, u = valid_quota(n)
        assert g >= 1 and u >= 1 and g + u < n  # both labels, and test keeps the rest
        assert abs(g - 45 * n / 1920) < 1 + (g == 1) and abs(u - 70 * n / 1920) < 1 + (u == 1)
    assert valid_quota(960) == (23, 35) == tuple(proportional((45, 70, 1805), 1920, 960)[:2])
    assert valid_quota(32) == (1, 1)
    with pytest.raises(DataError):
        valid_quota(2)


def _full_validation_set(seed: int = 0) -> list[list[bool]]:
    """15 subjects x 128 B-scans with BMAD's 1,086 normal / 834 lesion B-scans in all."""
    lesions = [40, 75, 20, 90, 60, 10, 80, 55, 72, 30, 66, 50, 100, 36, 50]
    assert sum(lesions) == 834
    rng = np.random.default_rng(seed)
    return [list(rng.permutation([True] * k + [False] * (128 - k))) for k in lesions]


def test_full_size_split_reproduces_bmads_valid_and_is_subject_level() -> None:
    subjects = _full_validation_set()
    plan = plan_split(subjects, seed=0)
    valid = [p for p in plan.picks if p.split == "valid"]
    test = [p for p in plan.picks if p.split == "test"]
    assert Counter(p.label for p in valid) == {"good": 45, "Ungood": 70}
    assert len(plan.valid_subjects) == 1 and plan.unused == 128 - 115
    (v,) = plan.valid_subjects
    assert sum(not f for f in subjects[v]) >= 45 and sum(subjects[v]) >= 70  # it can fill valid/ alone
    assert {p.subject for p in valid} == {v} and v not in {p.subject for p in test}
    # test/: every B-scan of the 14 other subjects, labelled by its flag
    assert len(test) == 14 * 128 == 1792
    assert Counter(p.label for p in test) == {"good": 1086 - sum(not f for f in subjects[v]),
                                              "Ungood": 834 - sum(subjects[v])}
    assert all((p.label == "Ungood") == subjects[p.subject][p.pos] for p in plan.picks)
    assert len({(p.subject, p.pos) for p in plan.picks}) == len(plan.picks)
    assert plan_split(subjects, seed=0) == plan  # deterministic


def test_seed_picks_among_the_subjects_that_fill_valid_alone() -> None:
    subjects = _full_validation_set()
    able = {i for i, f in enumerate(subjects) if sum(not x for x in f) >= 45 and sum(f) >= 70}
    chosen = {plan_split(subjects, seed=s).valid_subjects[0] for s in range(12)}
    assert chosen <= able and len(chosen) > 1


def test_two_valid_subjects_when_none_fills_the_quota_alone() -> None:
    counts = [(100, 28), (60, 68), (90, 38), (70, 58)]
    chosen = choose_valid_subjects(counts, (45, 70), seed=0)
    assert len(chosen) == 2 and chosen[0] == 1  # the one leaving the least missing first
    flags = [[False] * g + [True] * u for g, u in counts]
    plan = plan_split(flags, seed=0)  # 512 B-scans -> quota 12 / 19
    assert Counter(p.label for p in plan.picks if p.split == "valid") == dict(zip(("good", "Ungood"),
                                                                                 valid_quota(512), strict=True))
    # never all subjects in valid/: test keeps at least one
    assert len(choose_valid_subjects([(1, 1), (0, 1)], (45, 70), seed=0)) == 1


def test_spread_is_even_and_centred() -> None:
    assert spread(list(range(10)), 2) == [2, 7]
    assert spread(list(range(5)), 5) == [0, 1, 2, 3, 4]
    assert spread(list(range(3)), 7) == [0, 1, 2]


# -- a prepared bench ------------------------------------------------------------------
def test_layout_manifest_and_sha256(bench: Path) -> None:
    rows = read_manifest(bench)
    assert rows == sorted(rows, key=lambda r: r["path"])
    for r in rows:
        assert r["path"].startswith(f"{r['split']}/{r['label']}/img/") and r["path"].endswith(".png")
        assert hashlib.sha256((bench / r["path"]).read_bytes()).hexdigest() == r["sha256"]
        if r["label"] == "Ungood":
            assert r["mask"] == r["path"].replace("/img/", "/anomaly_mask/") and (bench / r["mask"]).is_file()
        else:
            assert r["mask"] == ""
    assert {(r["split"], r["label"]) for r in rows} == {("train", "good"), ("valid", "good"), ("valid", "Ungood"),
                                                         ("test", "good"), ("test", "Ungood")}
    files = {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")}
    assert files == {r["path"] for r in rows} | {r["mask"] for r in rows if r["mask"]}


def test_train_is_every_normal_training_bscan(raw: Path, bench: Path) -> None:
    rows = [r for r in read_manifest(bench) if r["split"] == "train"]
    normal = {p.relative_to(raw).as_posix() for p in raw_scans(raw, TRAIN)
              if not pixels(label_of(raw, p.relative_to(raw).as_posix())).any()}
    lesion = {p.relative_to(raw).as_posix() for p in raw_scans(raw, TRAIN)} - normal
    assert normal and lesion  # the generated set has both
    assert {r["source"] for r in rows} == normal and all(r["label"] == "good" for r in rows)


def test_valid_test_from_the_validation_set_subject_level(raw: Path, bench: Path) -> None:
    rows = [r for r in read_manifest(bench) if r["split"] != "train"]
    assert all(r["source"].startswith(VALID.as_posix() + "/") for r in rows)
    by_split = {s: {r["patient"] for r in rows if r["split"] == s} for s in ("valid", "test")}
    assert by_split["valid"] and by_split["test"] and not by_split["valid"] & by_split["test"]
    train_subjects = {r["patient"] for r in read_manifest(bench) if r["split"] == "train"}
    assert not train_subjects & (by_split["valid"] | by_split["test"])
    # both eyes of patient P1007 are one subject: all its rows in one split
    cubes = {d.name for d in (raw / VALID / "original_images").iterdir() if d.name.startswith("P1007_")}
    assert len(cubes) == 2
    p1007 = {r["split"] for r in rows if r["patient"] == "P1007"}
    assert len(p1007) == 1
    if p1007 == {"test"}:
        assert {r["source"].split("/")[3] for r in rows if r["patient"] == "P1007"} == cubes
    # test/ holds every B-scan of its subjects
    all_valid = [p.relative_to(raw).as_posix() for p in raw_scans(raw, VALID)]
    test_sources = {r["source"] for r in rows if r["split"] == "test"}
    subject_of = {r["source"]: r["patient"] for r in rows}
    for src in all_valid:
        subject = src.split("/")[3].split("_")[0]
        if subject in by_split["test"]:
            assert src in test_sources
        assert subject_of.get(src, subject) == subject
    # valid/: the quota for this many validation B-scans
    valid = Counter(r["label"] for r in rows if r["split"] == "valid")
    assert (valid["good"], valid["Ungood"]) == valid_quota(len(all_valid))


def test_content_images_copied_and_masks_are_the_lesion_pixels(raw: Path, bench: Path) -> None:
    for r in read_manifest(bench):
        src = raw / r["source"]
        out = pixels(bench / r["path"])
        assert out.dtype == np.uint8 and out.shape == SHAPE
        assert np.array_equal(out, pixels(src))  # 8-bit gray source: pixel-exact copy
        label = pixels(label_of(raw, r["source"]))
        assert r["slice"] == src.stem and r["patient"] == src.parent.name.split("_")[0]
        if r["label"] == "Ungood":
            mask = pixels(bench / r["mask"])
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
            assert np.array_equal(mask > 0, np.isin(label, (128, 191, 255)))
        else:
            assert not label.any()


def test_all_lesion_classes_are_anomalous(raw: Path, bench: Path) -> None:
    seen = set()
    for r in read_manifest(bench):
        if r["label"] == "Ungood":
            label = pixels(label_of(raw, r["source"]))
            mask = pixels(bench / r["mask"]) > 0
            for value in (128, 191, 255):
                if (label == value).any():
                    seen.add(value)
                    assert mask[label == value].all()
    assert seen == {128, 191, 255}


def test_deterministic_and_idempotent(raw: Path, bench: Path, tmp_path: Path) -> None:
    again = RESC(raw, workers=1).prepare(tmp_path, progress=False)
    assert tree_bytes(tmp_path / FOLDER) == tree_bytes(bench)
    kept = RESC(raw, workers=2).prepare(tmp_path, progress=False)
    assert kept.kept and kept.counts == again.counts
    other = RESC(raw, split_seed=3).prepare(tmp_path / "seed3", progress=False)
    assert sum(other.counts.values()) > 0
    with pytest.raises(UsageError, match="--overwrite"):
        RESC(raw, split_seed=3).prepare(tmp_path, progress=False)


# -- variants of the layout ------------------------------------------------------------
def test_png_variant_layout_and_options(tmp_path: Path) -> None:
    """train/ + valid/, PNG, label folders named like the image folders, an RGB B-scan, --images-dir."""
    src = RESC.synthesize(tmp_path / "gen", n=5, n_valid=2, slices=4, shape=SHAPE, ext="png")
    raw = tmp_path / "raw"
    for origin, name in ((TRAIN, "train"), (VALID, "valid")):
        (raw / name).mkdir(parents=True)
        shutil.move(src / origin / "original_images", raw / name / "scans")
        shutil.move(src / origin / "label_images", raw / name / "label_images")
        for d in (raw / name / "label_images").iterdir():
            d.rename(d.with_name(d.name.replace("_labelMark", ".img")))
    rgb_file = next(p for p in sorted((raw / "train" / "scans").rglob("*.png"))
                    if not pixels(raw / "train" / "label_images" / p.parent.name / p.name).any())
    gray = pixels(rgb_file)
    Image.fromarray(np.stack([gray] * 3, -1)).save(rgb_file)
    assert Image.open(rgb_file).mode == "RGB"
    summary = RESC(raw, images_dir="scans").prepare(tmp_path / "out", progress=False)
    assert not summary.skipped
    bench = tmp_path / "out" / FOLDER
    rows = read_manifest(bench)
    assert {r["source"].split("/")[0] for r in rows} == {"train", "valid"}
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    rgb_row = next(r for r in rows if r["source"] == rgb_file.relative_to(raw).as_posix())
    out = pixels(bench / rgb_row["path"])
    assert out.ndim == 2 and np.array_equal(out, gray)  # equal channels: the channel, not a luma mix
    for r in rows:
        assert np.array_equal(pixels(bench / r["path"]), np.asarray(Image.open(raw / r["source"]).convert("L")))
    with pytest.raises(DataError, match="--images-dir"):
        RESC(raw).prepare(tmp_path / "out2", progress=False)  # default original_images is absent


def test_real_size_bscans_keep_1024_rows_by_512_columns(tmp_path: Path) -> None:
    raw = RESC.synthesize(tmp_path / "raw", n=3, slices=2)  # real size, 1 training + 2 validation cubes
    img = raw_scans(raw, VALID)[0]
    assert pixels(img).shape == (1024, 512) and Image.open(img).format == "BMP"
    RESC(raw, workers=2).prepare(tmp_path / "out", progress=False)
    rows = read_manifest(tmp_path / "out" / FOLDER)
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    for r in rows:
        out = pixels(tmp_path / "out" / FOLDER / r["path"])
        assert out.shape == (1024, 512) and np.array_equal(out, pixels(raw / r["source"]))
        if r["mask"]:
            mask = pixels(tmp_path / "out" / FOLDER / r["mask"])
            assert np.array_equal(mask > 0, pixels(label_of(raw, r["source"])) > 0)


def test_real_oct_bscan_is_copied_exactly(tmp_path: Path) -> None:
    """A real OCT B-scan (Kermany JPEG, 496 x 512) as a RESC B-scan: decoded once, then copied value for value."""
    real = pixels(real_fixture("oct_kermany", "CNV-53018-2.jpeg"))
    assert real.ndim == 2
    raw = RESC.synthesize(tmp_path / "raw", n=3, slices=2, shape=real.shape)
    targets = [raw_scans(raw, TRAIN)[0], raw_scans(raw, VALID)[0]]
    for t in targets:
        Image.fromarray(real).save(t)
    RESC(raw).prepare(tmp_path / "out", progress=False)
    rows = {r["source"]: r for r in read_manifest(tmp_path / "out" / FOLDER)}
    written = [rows[t.relative_to(raw).as_posix()] for t in targets if t.relative_to(raw).as_posix() in rows]
    assert written  # the training one is normal, so it is in train/
    for r in written:
        assert np.array_equal(pixels(tmp_path / "out" / FOLDER / r["path"]), real)


# -- bad input ---------------------------------------------------------------------------
@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    return RESC.synthesize(tmp_path / "raw", n=5, n_valid=3, slices=4, shape=(32, 16), ext="png")


def _valid_scan(raw: Path, k: int = 0) -> Path:
    return raw_scans(raw, VALID)[k]


def _break(raw: Path, kind: str) -> tuple[Path, str]:
    """Damage the raw set; return the file the error must name and a word of the reason."""
    img = _valid_scan(raw)
    lab = label_of(raw, img.relative_to(raw).as_posix())
    if kind == "image without label":
        lab.unlink()
        return img, "no label"
    if kind == "label without image":
        img.unlink()
        return lab, "no B-scan"
    if kind == "label size differs":
        Image.fromarray(np.zeros((20, 16), np.uint8)).save(lab)
        return lab, "16x20"
    if kind == "corrupt label":
        lab.write_bytes(lab.read_bytes()[:40])
        return lab, "cannot read"
    if kind == "corrupt image":  # a normal training B-scan: always read (unused ones never are)
        img = next(p for p in raw_scans(raw, TRAIN) if not pixels(label_of(raw, p.relative_to(raw).as_posix())).any())
        img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
        return img, "cannot read"
    if kind == "unexpected label value":
        Image.fromarray(np.full((32, 16), 7, np.uint8)).save(lab)
        return lab, "value(s) 7"
    if kind == "two files for one slice":
        twin = img.with_suffix(".bmp")
        Image.open(img).save(twin)
        return twin, "2 files for slice"
    if kind == "same case twice":
        twin = img.parent.with_name(img.parent.name.removesuffix(".img"))
        shutil.copytree(img.parent, twin)
        return max(twin, img.parent), "same case"  # the later in sorted order is the one set aside
    if kind == "case without label folder":
        shutil.rmtree(lab.parent)
        return img.parent, "no label folder"
    raise AssertionError(kind)


KINDS = ["image without label", "label without image", "label size differs", "corrupt label", "corrupt image",
         "unexpected label value", "case without label folder", "two files for one slice", "same case twice"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_fails_naming_the_file(small_raw: Path, tmp_path: Path, kind: str) -> None:
    culprit, why = _break(small_raw, kind)
    with pytest.raises(DataError, match=re.escape(culprit.name)) as err:
        RESC(small_raw, on_error="fail").prepare(tmp_path / "out", progress=False)
    assert why in str(err.value)
    assert not (tmp_path / "out" / FOLDER).exists()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_skipped_and_listed(small_raw: Path, tmp_path: Path, kind: str) -> None:
    culprit, why = _break(small_raw, kind)
    summary = RESC(small_raw, on_error="skip").prepare(tmp_path / "out", progress=False)
    bench = tmp_path / "out" / FOLDER
    with open(bench / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    rel = culprit.relative_to(small_raw).as_posix()
    assert [s["source"] for s in skipped] == [rel] and why in skipped[0]["reason"]
    assert summary.skipped == [(rel, skipped[0]["reason"])]
    rows = read_manifest(bench)
    assert rows and not any(r["source"] == rel for r in rows)
    assert "skipped 1 input" in summary.text()


def test_missing_folders_stop_even_with_skip(small_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        RESC(tmp_path / "nope").prepare(tmp_path / "out", progress=False)
    shutil.rmtree(small_raw / VALID / "label_images")
    with pytest.raises(DataError, match=r"no label \(validation-set\) folder.*Edema_validationset"):
        RESC(small_raw).prepare(tmp_path / "out", progress=False)
    shutil.rmtree(small_raw / VALID)
    with pytest.raises(DataError, match="no validation-set folder"):
        RESC(small_raw).prepare(tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / FOLDER).exists()


def test_flat_folder_without_cases_is_refused(small_raw: Path, tmp_path: Path) -> None:
    img = _valid_scan(small_raw)
    shutil.copy(img, img.parent.parent / "loose.png")
    with pytest.raises(DataError, match="one folder\\s+per OCT cube"):
        RESC(small_raw).prepare(tmp_path / "out", progress=False)


def test_bad_options() -> None:
    with pytest.raises(UsageError, match="--lesion-values"):
        RESC("x", lesion_values="a,b")
    with pytest.raises(UsageError, match="0 is background"):
        RESC("x", lesion_values="0,255")
    with pytest.raises(UsageError, match="--subject-pattern"):
        RESC("x", subject_pattern="(")


# -- the command line ------------------------------------------------------------------------
def test_cli_prepare_and_list(small_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bmad.cli import main

    assert "resc" in reorganizers.names()
    rc = main(["prepare", "resc", "--raw", str(small_raw), "--out", str(tmp_path / "out"), "--workers", "2",
               "--split-seed", "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"{FOLDER}: prepared" in text and "train: good" in text
    assert read_manifest(tmp_path / "out" / FOLDER)
    assert main(["prepare", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "resc  ->  bench resc (folder Retina_RESC/)" in listing and "label_images/<case>_labelMark" in listing
    rc = main(["prepare", "resc", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
