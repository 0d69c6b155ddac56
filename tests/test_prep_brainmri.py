"""The BrainMRI (Kaggle yes/no) reorganizer: MediCLIP's split, duplicates, pixels, bad inputs, CLI,
and the real fixture end to end (prepare, `bmad run`, `bmad leaderboard`)."""

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
from bmad.reorganizer import reorganizers
from datasets_prep.brainmri import (
    DUPLICATE_COLUMNS,
    BrainMRI,
    Item,
    choose_train,
    output_names,
    split_sizes,
)
from tests.conftest import real_fixture, run_bmad
from tests.prep_helpers import decoded, png, read_manifest, read_table, tree_bytes

FOLDER = "BrainMRI"
TINY = ((20, 24), (27, 19), (16, 16))  # (H, W) of the generated slices: odd sizes, small and fast
N, DUPS = 40, 3  # 40 images: 15 normal + 25 tumour (Kaggle's 98 : 155), then 3 extra copies of normals
N_NORMAL, N_TUMOUR = 15 + DUPS, 25


def read_duplicates(bench: Path) -> list[dict[str, str]]:
    return read_table(bench / "duplicates.csv", DUPLICATE_COLUMNS)


def sources(raw: Path) -> dict[str, str]:
    """source -> class folder of every image under raw/{no,yes}/."""
    return {p.relative_to(raw).as_posix(): p.parent.name for c in ("no", "yes") for p in sorted((raw / c).iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not p.name.startswith(".")}


def pixel_groups(raw: Path) -> list[set[str]]:
    """Groups (2 or more) of sources with identical gray pixels, found by comparing the arrays."""
    seen: list[tuple[np.ndarray, set[str]]] = []
    for s in sources(raw):
        a = decoded(raw / s)
        for b, group in seen:
            if a.shape == b.shape and np.array_equal(a, b):
                group.add(s)
                break
        else:
            seen.append((a, {s}))
    return [g for _, g in seen if len(g) > 1]


def copy_raw(raw: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / "raw"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = BrainMRI.synthesize(tmp_path_factory.mktemp("raw"), n=N, seed=0, sizes=TINY, duplicates=DUPS)
    (raw / "no" / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored
    (raw / "yes" / "Thumbs.db").write_bytes(b"\0junk")  # not an image: listed in skipped.csv
    return raw


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out")
    summary = BrainMRI(raw, workers=2).prepare(out, progress=False)
    assert summary.folder == out / FOLDER and not summary.kept
    return summary


@pytest.fixture(scope="module")
def bench(prepared) -> Path:
    return prepared.folder


# -- the split rule and names, without data ------------------------------------------------
def test_split_sizes_are_mediclips_for_the_kaggle_set_and_proportional_below() -> None:
    assert split_sizes(98) == (33, 65)
    assert split_sizes(100) == (35, 65)  # test stays MediCLIP's 65, train takes the rest
    assert split_sizes(97) == (33, 64)  # 65/98 of 97 = 64.3
    assert split_sizes(18) == (6, 12)
    assert split_sizes(2) == (1, 1)
    with pytest.raises(DataError, match="at least 2"):
        split_sizes(1)


def _units(sizes: list[int]) -> list[list[Item]]:
    units, k = [], 0
    for n in sizes:
        units.append([Item(Path(f"/r/no/{k + j:03d}.jpg"), f"no/{k + j:03d}.jpg", "no") for j in range(n)])
        k += n
    return units


def test_choose_train_fills_exactly_keeps_copies_together_and_is_seeded() -> None:
    units = _units([1] * 76 + [2] * 8 + [3] * 2 + [2])  # 98 images, as the Kaggle no/ folder
    train, notes = choose_train(units, 33, seed=0)
    assert len(train) == 33 and not notes
    chosen = {it.source for it in train}
    for u in units:
        assert {it.source for it in u} <= chosen or not {it.source for it in u} & chosen
    assert [it.source for it in train] == sorted(chosen)
    again, _ = choose_train(units, 33, seed=0)
    other, _ = choose_train(units, 33, seed=1)
    assert again == train and {it.source for it in other} != chosen


def test_choose_train_visits_the_last_units_only_when_needed() -> None:
    units = _units([1] * 10)
    train, _ = choose_train(units, 8, seed=0, last={0, 1})
    assert {it.source for it in train} == {u[0].source for u in units[2:]}
    train, _ = choose_train(units, 9, seed=0, last={0, 1})
    assert len(train) == 9 and len({it.source for it in train} & {units[0][0].source, units[1][0].source}) == 1


def test_choose_train_splits_one_group_only_when_no_whole_groups_fill_it() -> None:
    units = [[]] * 3 + _units([2] * 5)  # units without normal images (tumour only) are never taken
    train, notes = choose_train(units, 3, seed=0)
    assert len(train) == 3 and len(notes) == 1 and "split between train (1) and test (1)" in notes[0]
    split = [u for u in units if 0 < len({it.source for it in u} & {it.source for it in train}) < len(u)]
    assert len(split) == 1
    for seed in range(8):
        assert len(choose_train(units, 3, seed=seed)[0]) == 3


def test_output_names_are_safe_and_unique_per_folder_ignoring_case() -> None:
    def item(source: str) -> Item:
        return Item(Path("/r") / source, source, source.split("/")[0])

    items = [("test", "Ungood", item(s)) for s in ("yes/Y92.jpg", "yes/Y92.png", "yes/Y92__jpg.jpg", "yes/Y1.JPG")]
    items += [("test", "good", item(s)) for s in ("no/no 1.jpg", "no/No 1.jpeg", "no/no  7.jpg", "no/N1.JPG")]
    items += [("train", "good", item("no/no 2.jpg")), ("test", "good", item("no/no 2.jpeg"))]
    names = output_names(items)
    h = hashlib.sha256(b"yes/Y92.jpg").hexdigest()[:8]
    assert names["yes/Y92.png"] == "Y92__png.png" and names["yes/Y92.jpg"] == f"Y92__jpg_{h}.png"
    assert names["yes/Y92__jpg.jpg"].startswith("Y92__jpg__jpg_") and names["yes/Y1.JPG"] == "Y1.png"
    assert names["no/no 1.jpg"] == "no_1__jpg.png" and names["no/No 1.jpeg"] == "No_1__jpeg.png"
    assert names["no/no  7.jpg"] == "no_7.png" and names["no/N1.JPG"] == "N1.png"
    assert names["no/no 2.jpg"] == names["no/no 2.jpeg"] == "no_2.png"  # other folders: no clash
    per_folder = Counter((s, lab, names[it.source].lower()) for s, lab, it in items)
    assert max(per_folder.values()) == 1


# -- a generated raw set in the Kaggle layout --------------------------------------------------
def test_synthesize_writes_kaggles_layout_and_mess(raw: Path) -> None:
    src = sources(raw)
    assert Counter(src.values()) == {"no": N_NORMAL, "yes": N_TUMOUR}
    suffixes = {Path(s).suffix for s in src}
    assert {".jpg", ".jpeg", ".JPG", ".png"} <= suffixes and any(" " in s for s in src)
    kinds = Counter()
    for s in src:
        with Image.open(raw / s) as im:
            kinds[(im.format, Path(s).suffix.lower() == ".png")] += 1
            kinds[im.mode] += 1
    assert kinds[("PNG", False)] and kinds[("JPEG", False)] and kinds[("PNG", True)]  # PNGs named .jpg too
    assert kinds["RGB"] and kinds["L"] and kinds["RGBA"]
    assert "yes/Y1.jpg" in src and "yes/Y1.png" in src
    copies = [s for s in src if s.startswith("no/no 900")]
    assert len(copies) == DUPS and any(s.endswith(".png") for s in copies)


def test_layout_manifest_labels_and_pixels(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    src = sources(raw)
    assert {r["source"] for r in rows} == set(src) and len(rows) == len(src)
    for r in rows:
        path = bench / r["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        assert r["label"] == {"no": "good", "yes": "Ungood"}[src[r["source"]]]
        assert r["path"].startswith(f"{r['split']}/{r['label']}/img/") and r["path"].endswith(".png")
        assert " " not in r["path"] and r["mask"] == "" and r["slice"] == ""
        np.testing.assert_array_equal(png(path), decoded(raw / r["source"]))
    assert {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")} == {r["path"] for r in rows}
    assert not (bench / "valid").exists() and not list(bench.rglob("anomaly_mask"))


def test_split_counts_follow_the_protocol(prepared, bench: Path) -> None:
    counts = Counter((r["split"], r["label"]) for r in read_manifest(bench))
    n_train, n_test = split_sizes(N_NORMAL)
    assert (n_train, n_test) == (6, 12)
    assert counts == {("train", "good"): n_train, ("test", "good"): n_test, ("test", "Ungood"): N_TUMOUR}
    assert prepared.counts == dict(counts)


def test_pixel_identical_copies_are_listed_kept_and_never_split(raw: Path, prepared, bench: Path) -> None:
    rows = {r["source"]: r for r in read_manifest(bench)}
    want = pixel_groups(raw)
    assert len(want) == DUPS
    byte_equal = [g for g in want if len({(raw / s).read_bytes() for s in g}) == 1]
    assert 0 < len(byte_equal) < len(want)  # a PNG re-encode has other bytes but the same pixels
    dups = read_duplicates(bench)
    got: dict[str, set[str]] = {}
    for d in dups:
        got.setdefault(d["group"], set()).add(d["source"])
        r = rows[d["source"]]
        assert (d["split"], d["label"], d["path"]) == (r["split"], r["label"], r["path"])
    assert sorted(map(sorted, got.values())) == sorted(map(sorted, want))
    for group in want:
        assert len({rows[s]["split"] for s in group}) == 1  # never one copy in train, one in test
        assert len({rows[s]["patient"] for s in group}) == 1 and len({rows[s]["sha256"] for s in group}) == 1
    assert sorted(map(sorted, prepared.duplicates)) == sorted(map(sorted, want))
    assert f"{DUPS} extra copies in {DUPS} groups of pixel-identical images" in prepared.text()


def test_non_image_file_is_listed_in_skipped_csv(bench: Path) -> None:
    with open(bench / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [(s["source"], "not a .jpg/.jpeg/.png" in s["reason"]) for s in skipped] == [("yes/Thumbs.db", True)]


def test_deterministic_over_workers_idempotent_and_seeded(raw: Path, bench: Path, tmp_path: Path) -> None:
    BrainMRI(raw, workers=1).prepare(tmp_path / "a", progress=False)
    assert tree_bytes(tmp_path / "a" / FOLDER) == tree_bytes(bench)
    again = BrainMRI(raw, workers=1).prepare(tmp_path / "a", progress=False)
    assert again.kept and sum(again.counts.values()) == N_NORMAL + N_TUMOUR and len(again.duplicates) == DUPS
    (tmp_path / "a" / FOLDER / "duplicates.csv").unlink()  # a lost report is written again
    assert BrainMRI(raw).prepare(tmp_path / "a", progress=False).kept
    assert tree_bytes(tmp_path / "a" / FOLDER) == tree_bytes(bench)
    BrainMRI(raw, split_seed=1).prepare(tmp_path / "b", progress=False)
    train = {r["source"] for r in read_manifest(bench) if r["split"] == "train"}
    train1 = {r["source"] for r in read_manifest(tmp_path / "b" / FOLDER) if r["split"] == "train"}
    assert len(train1) == len(train) and train1 != train


def test_an_interrupted_run_resumes_and_gives_the_same_bench(raw: Path, bench: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = BrainMRI._write_one
    calls = {"n": 0}

    def dying(self, payload):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("killed")
        return real_write(self, payload)

    monkeypatch.setattr(BrainMRI, "_write_one", dying)
    with pytest.raises(RuntimeError, match="killed"):
        BrainMRI(raw, workers=1).prepare(tmp_path, progress=False)
    assert not (tmp_path / FOLDER).exists() and (tmp_path / f".{FOLDER}.partial").is_dir()
    monkeypatch.setattr(BrainMRI, "_write_one", real_write)
    summary = BrainMRI(raw, workers=2).prepare(tmp_path, progress=False)
    assert summary.reused == 5
    assert tree_bytes(tmp_path / FOLDER) == tree_bytes(bench)


def test_size_option_resizes_bicubic(raw: Path, tmp_path: Path) -> None:
    BrainMRI(raw, size=(12, 10)).prepare(tmp_path, progress=False)
    rows = read_manifest(tmp_path / FOLDER)
    for r in rows:
        out = png(tmp_path / FOLDER / r["path"])
        assert out.shape == (12, 10)
    r = rows[0]
    want = np.asarray(Image.fromarray(decoded(raw / r["source"])).resize((10, 12), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(png(tmp_path / FOLDER / r["path"]), want)


# -- bad inputs ----------------------------------------------------------------------------
@pytest.fixture
def corrupt_raw(raw: Path, tmp_path: Path) -> Path:
    bad = copy_raw(raw, tmp_path)
    data = (bad / "no" / "no 1.jpg").read_bytes()
    (bad / "no" / "no 1.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    (bad / "yes" / "Y3.jpg").write_bytes(b"this is not a JPEG at all")
    return bad


def test_corrupt_image_is_skipped_with_its_reason(corrupt_raw: Path, tmp_path: Path) -> None:
    summary = BrainMRI(corrupt_raw, workers=2).prepare(tmp_path / "out", progress=False)
    bench = tmp_path / "out" / FOLDER
    with open(bench / "skipped.csv", newline="") as fh:
        listed = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(listed) == {"no/no 1.jpg", "yes/Y3.jpg", "yes/Thumbs.db"}
    assert all("cannot decode" in listed[s] and str(corrupt_raw) in listed[s] for s in ("no/no 1.jpg", "yes/Y3.jpg"))
    counts = Counter((r["split"], r["label"]) for r in read_manifest(bench))
    n_train, n_test = split_sizes(N_NORMAL - 1)
    assert counts == {("train", "good"): n_train, ("test", "good"): n_test, ("test", "Ungood"): N_TUMOUR - 1}
    assert "skipped 3 input(s)" in summary.text()


def test_corrupt_image_stops_with_on_error_fail(corrupt_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        BrainMRI(corrupt_raw, on_error="fail").prepare(tmp_path / "out", progress=False)
    assert "cannot decode" in str(exc.value) and str(corrupt_raw / "no" / "no 1.jpg") in str(exc.value)
    assert not (tmp_path / "out" / FOLDER).exists()


def test_wrong_raw_folders_are_named_with_the_fix(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        BrainMRI(tmp_path / "nowhere").prepare(tmp_path / "out", progress=False)
    top = tmp_path / "archive"
    shutil.copytree(raw, top / "brain_tumor_dataset")
    with pytest.raises(DataError) as exc:  # one level too high: names the folder to pass
        BrainMRI(top).prepare(tmp_path / "out", progress=False)
    assert "has no no/ and no yes/ folder" in str(exc.value)
    assert repr(str(top / "brain_tumor_dataset")) in str(exc.value)
    with pytest.raises(DataError) as exc:  # a class folder itself: names its parent
        BrainMRI(top / "brain_tumor_dataset" / "yes").prepare(tmp_path / "out", progress=False)
    assert repr(str(top / "brain_tumor_dataset")) in str(exc.value) and "not one of them" in str(exc.value)
    shutil.rmtree(top / "brain_tumor_dataset" / "yes")
    with pytest.raises(DataError, match="has no yes/ folder"):
        BrainMRI(top / "brain_tumor_dataset").prepare(tmp_path / "out", progress=False)
    (top / "brain_tumor_dataset" / "yes").mkdir()
    with pytest.raises(DataError, match="no readable images in the yes/ folder"):
        BrainMRI(top / "brain_tumor_dataset").prepare(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_single_normal_image_is_refused(raw: Path, tmp_path: Path) -> None:
    bad = copy_raw(raw, tmp_path)
    for s in sorted(s for s, c in sources(bad).items() if c == "no")[1:]:
        (bad / s).unlink()
    with pytest.raises(DataError, match="1 normal image"):
        BrainMRI(bad).prepare(tmp_path / "out", progress=False)


def test_class_folders_in_other_case_are_read(raw: Path, tmp_path: Path) -> None:
    root = copy_raw(raw, tmp_path)
    (root / "no").rename(root / "NO")
    (root / "yes").rename(root / "Yes")
    summary = BrainMRI(root).prepare(tmp_path / "out", progress=False)
    assert sum(summary.counts.values()) == N_NORMAL + N_TUMOUR
    assert {r["source"].split("/")[0] for r in read_manifest(tmp_path / "out" / FOLDER)} == {"NO", "Yes"}


def test_same_pixels_in_no_and_yes_go_to_test_and_are_reported(raw: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    root = copy_raw(raw, tmp_path)
    shutil.copyfile(root / "no" / "No4.jpg", root / "yes" / "Y999.jpg")
    with caplog.at_level(logging.WARNING, logger="datasets_prep.brainmri"):
        BrainMRI(root).prepare(tmp_path / "out", progress=False)
    assert "the same pixels are in no/ and yes/: no/No4.jpg, yes/Y999.jpg" in caplog.text
    rows = {r["source"]: r for r in read_manifest(tmp_path / "out" / FOLDER)}
    assert rows["no/No4.jpg"]["split"] == rows["yes/Y999.jpg"]["split"] == "test"
    assert rows["no/No4.jpg"]["patient"] == rows["yes/Y999.jpg"]["patient"]


# -- the command line and the bench ---------------------------------------------------------
def test_prepare_list_shows_brainmri(capsys: pytest.CaptureFixture) -> None:
    from bmad.cli import main

    assert "brainmri" in reorganizers.names()
    assert main(["prepare", "--list"]) == 0
    out = capsys.readouterr().out
    assert "brainmri  ->  bench brainmri (folder BrainMRI/)" in out and "MediCLIP" in out


def test_cli_prepare_writes_the_same_bench(raw: Path, bench: Path, tmp_path: Path) -> None:
    from bmad.cli import main

    out = tmp_path / "data"
    assert main(["prepare", "brainmri", "--raw", str(raw), "--out", str(out), "--workers", "2",
                 "--split-seed", "0", "--no-progress"]) == 0
    assert tree_bytes(out / FOLDER) == tree_bytes(bench)
    assert main(["prepare", "brainmri", "--raw", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_cli_options_reach_the_constructor(raw: Path) -> None:
    from bmad.cli import build_parser

    args = build_parser().parse_args(["prepare", "brainmri", "--raw", str(raw), "--out", "x", "--split-seed", "5",
                                      "--size", "224", "224", "--on-error", "fail", "--workers", "3"])
    r = BrainMRI.from_args(args)
    assert (r.raw, r.split_seed, r.size, r.on_error, r.workers) == (raw, 5, (224, 224), "fail", 3)


def test_shots_draw_k_training_images_on_the_bench(bench: Path, toy_plugin: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = run_bmad("run", "--algo", "toy", "--bench", "brainmri", "--shots", "4", "--seeds", "2", "--data-root",
                   str(bench.parent), "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    records = [json.loads(p.read_text()) for p in sorted((res / "runs" / "brainmri" / "toy").rglob("seed*.json"))]
    train = {r["path"] for r in read_manifest(bench) if r["split"] == "train"}
    assert len(records) == 2
    for r in records:
        assert r["status"] == "ok" and r["shots"] == 4 and r["data"]["n_train"] == 4 and r["data"]["n_valid"] == 0
        assert len(r["data"]["train_files"]) == 4 and set(r["data"]["train_files"]) <= train
        assert r["data"]["n_test"] == split_sizes(N_NORMAL)[1] + N_TUMOUR
    assert records[0]["data"]["train_files"] != records[1]["data"]["train_files"]  # drawn per seed


# -- the real Kaggle copy -------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_raw() -> Path:
    return real_fixture("brain_mri_yes_no", "brain_tumor_dataset")


@pytest.fixture(scope="module")
def real_bench(real_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real")
    summary = BrainMRI(real_raw, workers=2).prepare(out, progress=False)
    assert "duplicates: 25 extra copies in 22 groups" in summary.text()
    return summary.folder


def test_real_set_gives_mediclips_counts_and_its_duplicates(real_raw: Path, real_bench: Path) -> None:
    rows = read_manifest(real_bench)
    assert Counter((r["split"], r["label"]) for r in rows) == {
        ("train", "good"): 33, ("test", "good"): 65, ("test", "Ungood"): 155}
    src = sources(real_raw)
    assert {r["source"] for r in rows} == set(src) and len(src) == 253
    assert not (real_bench / "valid").exists() and not (real_bench / "skipped.csv").exists()
    # on this set the pixel-identical groups are exactly the byte-identical files
    by_bytes: dict[str, set[str]] = {}
    for s in src:
        by_bytes.setdefault(hashlib.sha256((real_raw / s).read_bytes()).hexdigest(), set()).add(s)
    want = sorted(sorted(g) for g in by_bytes.values() if len(g) > 1)
    got: dict[str, set[str]] = {}
    for d in read_duplicates(real_bench):
        got.setdefault(d["group"], set()).add(d["source"])
    assert sorted(map(sorted, got.values())) == want and len(want) == 22 and sum(len(g) - 1 for g in want) == 25
    split_of = {r["source"]: r["split"] for r in rows}
    assert all(len({split_of[s] for s in g}) == 1 for g in want)
    by_source = {r["source"]: r for r in rows}
    assert by_source["yes/Y92.jpg"]["path"] == "test/Ungood/img/Y92__jpg.png"
    assert by_source["yes/Y92.png"]["path"] == "test/Ungood/img/Y92__png.png"
    for s in ("no/no 96.jpg", "no/no 98.jpg", "no/N1.JPG", "yes/Y259.JPG", "no/1 no.jpeg"):  # RGBA, P, RGB, RGB, JPEG
        out = png(real_bench / by_source[s]["path"])
        np.testing.assert_array_equal(out, decoded(real_raw / s))
        assert out.std() > 10


@pytest.mark.slow
def test_real_set_end_to_end_patchcore_run_and_leaderboard(real_bench: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    common = ("--algo", "patchcore", "--bench", "brainmri", "--random-init", "--data-root", str(real_bench.parent),
              "--results", str(res), "--param", "patchcore:input_size=64", "--param", "patchcore:backbone=resnet18",
              "--no-progress")
    out = run_bmad("run", "--seeds", "2", *common)
    assert out.returncode == 0, out.stderr
    files = sorted((res / "runs" / "brainmri" / "patchcore").rglob("seed*.json"))
    records = [json.loads(p.read_text()) for p in files]
    assert [r["seed"] for r in records] == [0, 1] and all(r["status"] == "ok" for r in records)
    for r in records:
        assert (r["data"]["n_train"], r["data"]["n_valid"], r["data"]["n_test"]) == (33, 0, 220)
        assert 0 <= r["metrics"]["image_auroc"] <= 1 and r["metrics"]["pixel_auroc"] is None
    board = run_bmad("leaderboard", "--results", str(res), "--bench", "brainmri")
    assert board.returncode == 0, board.stderr
    assert "brainmri" in board.stdout and "patchcore" in board.stdout and "2/2" in board.stdout
    shots = run_bmad("run", "--seeds", "1", "--shots", "4", *common)
    assert shots.returncode == 0, shots.stderr
    [rec] = [json.loads(p.read_text()) for p in (res / "runs" / "brainmri" / "patchcore").rglob("seed0.json")
             if json.loads(p.read_text())["shots"] == 4]
    assert rec["status"] == "ok" and rec["data"]["n_train"] == 4 and len(rec["data"]["train_files"]) == 4
