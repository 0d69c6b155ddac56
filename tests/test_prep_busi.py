"""The BUSI reorganizer (``bmad prepare busi``): MediCLIP's split, masks, its synthetic raw set, errors."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError, UsageError
from bmad.reorganizer import reorganizers
from datasets_prep.busi import (
    BUSI,
    BUSI_COUNTS,
    ROOT_NAME,
    Item,
    number_key,
    plan_split,
    scan,
    split_sizes,
)
from tests.conftest import run_bmad
from tests.prep_helpers import read_manifest, tree_bytes

N = 30  # 5 normal, 17 benign, 8 malignant
N_NORMAL, N_LESION = 5, 25
SIZE = 48  # BUSI's images are about 500 x 500; tiny here


def union_of_masks(image: Path) -> np.ndarray:
    """The union of ``<stem>_mask*.png`` beside ``image``, read independently of the module."""
    masks = sorted(image.parent.glob(f"{image.stem}_mask*.png"))
    assert masks
    out = None
    for m in masks:
        arr = np.asarray(Image.open(m).convert("L")) > 0
        out = arr if out is None else out | arr
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUSI.synthesize(tmp_path_factory.mktemp("raw") / ROOT_NAME, n=N, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    summary = BUSI(raw, workers=2).prepare(tmp_path_factory.mktemp("out"), progress=False)
    assert not summary.skipped and not summary.kept
    return summary.folder


# -- the protocol on a full-size listing (no files written) -------------------------------------
def full_listing() -> list[Item]:
    return [Item(Path(f"/nowhere/{c}/{c} ({i}).png"), f"{c}/{c} ({i}).png", c)
            for c, n in BUSI_COUNTS.items() for i in range(n, 0, -1)]


def test_full_busi_gives_mediclips_counts() -> None:
    plan = plan_split(full_listing())
    counts: dict[tuple[str, str], int] = {}
    for split, label, _ in plan:
        counts[(split, label)] = counts.get((split, label), 0) + 1
    assert counts == {("train", "good"): 32, ("test", "good"): 101, ("test", "Ungood"): 437 + 210}
    assert sum(counts.values()) == 780
    train = sorted(number_key(it.path.stem)[1] for s, _, it in plan if s == "train")
    assert train == list(range(1, 33))  # BUSI's first 32 normals by number, not by string order
    assert all(it.cls != "normal" for _, lab, it in plan if lab == "Ungood")
    assert [it.source for _, _, it in plan] == sorted(it.source for it in full_listing())


def test_split_sizes() -> None:
    assert split_sizes(133) == (32, 101)
    assert split_sizes(140) == (39, 101)  # extra normals train
    assert split_sizes(5) == (1, 4) and split_sizes(2) == (1, 1)
    assert sum(split_sizes(60)) == 60 and split_sizes(60)[1] == round(60 * 101 / 133)
    with pytest.raises(DataError, match="at least 2"):
        split_sizes(1)


def test_number_key_orders_busi_names() -> None:
    names = ["normal (10)", "normal (2)", "normal (1)", "odd name", "normal(3)"]
    assert sorted(names, key=number_key) == ["normal (1)", "normal (2)", "normal(3)", "normal (10)", "odd name"]


# -- scanning the raw folder -------------------------------------------------------------------
def test_scan_pairs_masks_and_sets_aside_strays(raw: Path, tmp_path: Path) -> None:
    items, ignored = scan(raw)
    assert len(items) == N and not ignored
    multi = [it for it in items if len(it.masks) > 1]
    assert multi and all(it.cls != "normal" for it in multi)
    for it in multi:
        assert [m.name for m in it.masks] == [f"{it.path.stem}_mask.png"] + [
            f"{it.path.stem}_mask_{k}.png" for k in range(1, len(it.masks))]
    work = tmp_path / ROOT_NAME
    shutil.copytree(raw, work)
    (work / "benign" / "Thumbs.db").write_bytes(b"x")
    (work / "benign" / ".DS_Store").write_bytes(b"x")
    shutil.copy(work / "benign" / "benign (1)_mask.png", work / "benign" / "benign (999)_mask.png")
    items2, ignored2 = scan(work)
    assert len(items2) == N
    assert ignored2 == [("benign/Thumbs.db", "not an image (.png, .jpg, .jpeg, .bmp); ignored"),
                        ("benign/benign (999)_mask.png", "a mask without its image benign (999).png in benign/; "
                                                         "ignored")]
    summary = BUSI(work).prepare(tmp_path / "out", progress=False)
    assert sorted(s for s, _ in summary.skipped) == ["benign/Thumbs.db", "benign/benign (999)_mask.png"]
    assert (summary.folder / "skipped.csv").is_file() and sum(summary.counts.values()) == N


# -- the synthetic raw set end to end -----------------------------------------------------------
def test_layout_masks_and_manifest(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    assert len(rows) == N
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(r["split"], r["label"])] = counts.get((r["split"], r["label"]), 0) + 1
        src = raw / r["source"]
        stem = src.stem
        assert Path(r["path"]).name == stem.replace(" (", "_").replace(")", "") + ".png"  # benign (3) -> benign_3
        img = np.asarray(Image.open(bench / r["path"]))
        assert img.dtype == np.uint8 and img.ndim == 2
        assert np.array_equal(img, np.asarray(Image.open(src))[..., 0])  # RGB-saved gray -> its gray
        if r["label"] == "Ungood":
            assert r["mask"] == r["path"].replace("/img/", "/anomaly_mask/")
            mask = np.asarray(Image.open(bench / r["mask"]))
            assert set(np.unique(mask)) <= {0, 255} and mask.shape == img.shape
            assert np.array_equal(mask > 0, union_of_masks(src))
        else:
            assert r["mask"] == "" and src.parent.name == "normal"
    assert counts == {("train", "good"): 1, ("test", "good"): 4, ("test", "Ungood"): N_LESION}
    assert read_manifest(bench)[0]["source"].startswith("benign/")
    train = [r for r in rows if r["split"] == "train"]
    assert [r["source"] for r in train] == ["normal/normal (1).png"]
    assert not (bench / "valid").exists() and not (bench / "test" / "good" / "anomaly_mask").exists()


def test_a_second_lesion_mask_is_in_the_union(raw: Path, bench: Path) -> None:
    multi = [p for p in sorted((raw / "benign").glob("* (*)_mask_1.png"))]
    assert multi
    stem = multi[0].name.replace("_mask_1.png", "")
    first = np.asarray(Image.open(raw / "benign" / f"{stem}_mask.png").convert("L")) > 0
    second = np.asarray(Image.open(multi[0]).convert("L")) > 0
    assert (second & ~first).any()  # the second file adds pixels
    ours = np.asarray(Image.open(bench / "test" / "Ungood" / "anomaly_mask" /
                                 (stem.replace(" (", "_").replace(")", "") + ".png"))) > 0
    assert np.array_equal(ours, first | second)


def test_prepare_is_deterministic_idempotent_and_resumable(raw: Path, bench: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    one = BUSI(raw, workers=1).prepare(tmp_path / "one", progress=False)
    assert tree_bytes(one.folder) == tree_bytes(bench)
    kept = BUSI(raw, workers=2).prepare(tmp_path / "one", progress=False)
    assert kept.kept and tree_bytes(kept.folder) == tree_bytes(bench)
    with pytest.raises(UsageError, match="--overwrite"):
        BUSI(raw, size=(16, 16)).prepare(tmp_path / "one", progress=False)

    calls = {"n": 0}
    real_write = BUSI._write_one

    def dying(self: BUSI, payload):  # an interruption after 7 images
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real_write(self, payload)

    monkeypatch.setattr(BUSI, "_write_one", dying)
    with pytest.raises(KeyboardInterrupt):
        BUSI(raw, workers=1).prepare(tmp_path / "two", progress=False)
    assert not (tmp_path / "two" / "BUSI").exists()
    monkeypatch.setattr(BUSI, "_write_one", real_write)
    resumed = BUSI(raw, workers=2).prepare(tmp_path / "two", progress=False)
    assert resumed.reused == 7 and tree_bytes(resumed.folder) == tree_bytes(bench)


def test_size_option_resizes_images_and_masks(raw: Path, tmp_path: Path) -> None:
    summary = BUSI(raw, size=(20, 30)).prepare(tmp_path, progress=False)
    for r in read_manifest(summary.folder):
        assert np.asarray(Image.open(summary.folder / r["path"])).shape == (20, 30)
        if r["mask"]:
            mask = np.asarray(Image.open(summary.folder / r["mask"]))
            assert mask.shape == (20, 30) and set(np.unique(mask)) <= {0, 255}
    with pytest.raises(UsageError, match="--size"):
        BUSI(raw, size=(0, 3))


# -- bad inputs --------------------------------------------------------------------------------
def test_bad_pairs_are_skipped_or_fatal_never_a_crash(raw: Path, tmp_path: Path) -> None:
    work = tmp_path / ROOT_NAME
    shutil.copytree(raw, work)
    wrong = work / "malignant" / "malignant (2)_mask.png"
    Image.open(wrong).resize((SIZE + 7, SIZE - 3)).save(wrong)  # a mask of another size
    (work / "benign" / "benign (4)_mask.png").unlink()  # a lesion image without its mask
    for extra in (work / "benign").glob("benign (4)_mask_*.png"):
        extra.unlink()
    (work / "benign" / "benign (5).png").write_bytes(b"\x89PNG truncated")  # an unreadable image
    with pytest.raises(DataError, match=r"benign/benign \(4\)\.png \(benign\) has no mask file"):
        BUSI(work, on_error="fail").prepare(tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / "BUSI").exists()
    summary = BUSI(work, workers=2).prepare(tmp_path / "skip", progress=False)
    reasons = dict(summary.skipped)
    assert set(reasons) == {"malignant/malignant (2).png", "benign/benign (4).png", "benign/benign (5).png"}
    assert f"is {SIZE + 7}x{SIZE - 3} but its image" in reasons["malignant/malignant (2).png"]
    assert "has no mask file benign (4)_mask.png" in reasons["benign/benign (4).png"]
    assert "cannot decode" in reasons["benign/benign (5).png"]
    assert summary.counts[("test", "Ungood")] == N_LESION - 3
    with open(summary.folder / "skipped.csv", newline="") as fh:
        assert {r["source"] for r in csv.DictReader(fh)} == set(reasons)


def test_wrong_raw_folders_say_what_is_expected(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        BUSI(tmp_path / "nope").prepare(tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="has no normal/, benign/, malignant/ folder") as exc:
        BUSI(raw.parent).prepare(tmp_path / "o", progress=False)
    assert f"pass --raw '{raw}'" in exc.value.hint
    with pytest.raises(DataError, match="has no normal/") as exc:
        BUSI(raw / "benign").prepare(tmp_path / "o", progress=False)
    assert f"pass its parent, --raw '{raw}'" in exc.value.hint
    half = tmp_path / "half"
    for c in ("normal", "benign", "malignant"):
        (half / c).mkdir(parents=True)
    shutil.copy(raw / "normal" / "normal (1).png", half / "normal" / "normal (1).png")
    with pytest.raises(DataError, match="needs normal images and benign or malignant ones"):
        BUSI(half).prepare(tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "BUSI").exists()


# -- CLI and runs ------------------------------------------------------------------------------
def test_cli_prepare_list_and_shots_with_pixel_metrics(raw: Path, bench: Path, toy_plugin: Path,
                                                       tmp_path: Path) -> None:
    assert reorganizers.get("busi").cls is BUSI
    listed = run_bmad("prepare", "--list")
    assert listed.returncode == 0 and "busi  ->  bench busi (folder BUSI/)" in listed.stdout
    data = tmp_path / "data"
    out = run_bmad("prepare", "busi", "--raw", str(raw), "--out", str(data), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "test : Ungood 25, good 4" in out.stdout
    assert tree_bytes(data / "BUSI") == tree_bytes(bench)
    bad = run_bmad("prepare", "busi", "--raw", str(raw / "normal"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "pass its parent" in bad.stderr and "Traceback" not in bad.stderr

    # more normal images, so that 4 shots are a draw: 7 normal training images
    more = tmp_path / ROOT_NAME
    shutil.copytree(raw, more)
    for i in range(N_NORMAL + 1, N_NORMAL + 27):
        shutil.copy(raw / "normal" / "normal (2).png", more / "normal" / f"normal ({i}).png")
    assert split_sizes(N_NORMAL + 26) == (7, 24)
    BUSI(more).prepare(tmp_path / "data2", progress=False)
    res = tmp_path / "res"
    run = run_bmad("run", "--algo", "toy", "--bench", "busi", "--shots", "4", "--seeds", "2", "--data-root",
                   str(tmp_path / "data2"), "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert run.returncode == 0, run.stderr
    records = [json.loads(p.read_text()) for p in sorted((res / "runs" / "busi" / "toy").rglob("seed*.json"))]
    assert len(records) == 2
    for r in records:
        assert r["status"] == "ok" and r["shots"] == 4 and r["data"]["n_train"] == 4 and r["data"]["n_valid"] == 0
        assert len(r["data"]["train_files"]) == 4 and all(f.startswith("train/good/") for f in r["data"]["train_files"])
        assert r["data"]["n_test"] == 24 + N_LESION
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= r["metrics"][key] <= 1.0, key
    assert records[0]["data"]["train_files"] != records[1]["data"]["train_files"]
    digest = hashlib.sha256((tmp_path / "data2" / "BUSI" / "manifest.csv").read_bytes()).hexdigest()
    assert records[0]["data"]["manifest_sha256"] == digest
