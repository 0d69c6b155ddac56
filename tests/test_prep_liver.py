"""The liver reorganizer (BTCV train + LiTS valid/test) and its synthetic raw generator."""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image

from bmad.errors import DataError
from bmad.reorganizer import reorganizers
from datasets_prep.liver import Liver, phantom, plan_lits, plan_train, slice_pixels, split_sizes
from tests.conftest import real_fixture
from tests.prep_helpers import read_manifest, tree_bytes

BTCV_SHAPE = (48, 40, 24)  # not 512x512 in-plane: every slice is resized
LITS_SHAPE = (40, 48, 36)
N_BTCV, N_LITS = 3, 6
LO, HI = -200.0, 250.0


# -- helpers: an independent reading of the raw volumes --------------------------------
def canonical(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def view(plane: np.ndarray) -> np.ndarray:
    """Radiological axial view of a RAS+ plane: anterior up, patient's right on the image's left."""
    return np.flipud(np.fliplr(plane.T))


def to512(plane: np.ndarray, nearest: bool) -> np.ndarray:
    if plane.shape == (512, 512):
        return plane
    if nearest:
        return np.asarray(Image.fromarray(plane.astype(np.uint8) * 255).resize((512, 512), Image.NEAREST)) > 0
    return np.asarray(Image.fromarray(plane.astype(np.float32)).resize((512, 512), Image.BILINEAR), np.float64)


def expected_image(hu_plane: np.ndarray, roi: np.ndarray, equalize: bool) -> np.ndarray:
    """The documented pixels: window [-200, 250] -> 0..255, view, resize, round, equalise in the ROI."""
    w = (np.clip(view(hu_plane).astype(np.float64), LO, HI) - LO) * (255.0 / (HI - LO))
    q = np.floor(np.clip(to512(w, nearest=False), 0, 255) + 0.5).astype(np.int64)
    out = np.zeros((512, 512), np.int64)
    if equalize:
        inside = np.sort(q[roi])
        at_most = np.searchsorted(inside, q[roi], side="right")  # ROI pixels <= v
        out[roi] = (255 * at_most + inside.size - 1) // inside.size  # ceil(255 * cdf)
    else:
        out[roi] = q[roi]
    return out


def image(path: Path) -> np.ndarray:
    img = Image.open(path)
    assert img.mode == "L" and img.size == (512, 512)
    return np.asarray(img)


def stored_as(img: nib.Nifti1Image, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same anatomy stored in another orientation (data and affine both changed)."""
    now = nib.io_orientation(img.affine)
    return img.as_reoriented(ornt_transform(now, axcodes2ornt(codes)))


def save(img: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = Liver.synthesize(tmp_path_factory.mktemp("raw"), n_btcv=N_BTCV, n_lits=N_LITS, seed=0,
                           btcv_shape=BTCV_SHAPE, lits_shape=LITS_SHAPE)
    # an unlabelled BTCV test image (ignored, as in RawData.zip) and junk files
    testing = raw / "BTCV" / "RawData" / "Testing" / "img" / "img0061.nii.gz"
    testing.parent.mkdir(parents=True)
    shutil.copy(raw / "BTCV" / "RawData" / "Training" / "img" / "img0001.nii.gz", testing)
    (raw / "LiTS" / "README.txt").write_text("junk is ignored\n")
    return raw


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    summary = Liver(raw=raw, workers=2).prepare(tmp_path_factory.mktemp("out"), progress=False)
    assert not summary.skipped
    return summary.folder


def flags(raw: Path) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """BTCV liver slices, LiTS good and tumour slices, from the raw labels (as_closest_canonical)."""
    btcv, good, tumour = [], [], []
    for i in range(N_BTCV):
        lab = canonical(raw / "BTCV" / "RawData" / "Training" / "label" / f"label{i + 1:04d}.nii.gz")
        btcv.append([k for k in range(lab.shape[2]) if to512(view(lab[:, :, k] == 6), True).any()])
    for i in range(N_LITS):
        lab = canonical(next((raw / "LiTS").rglob(f"segmentation-{i}.nii")))
        liver = [to512(view(np.isin(lab[:, :, k], [1, 2])), True) for k in range(lab.shape[2])]
        tum = [to512(view(lab[:, :, k] == 2), True) & liver[k] for k in range(lab.shape[2])]
        good.append([k for k in range(lab.shape[2]) if liver[k].any() and not tum[k].any()])
        tumour.append([k for k in range(lab.shape[2]) if tum[k].any()])
    return btcv, good, tumour


# -- the size rule (pure functions) ------------------------------------------------------
def test_sizes_reproduce_bmad_for_the_full_sets() -> None:
    for n_btcv in (30, 50):  # the 30 labelled RawData/Training volumes (or more)
        s = split_sizes(n_btcv, 131)
        assert (s.train, s.valid_patients, s.test_patients) == (1542, 13, 118)
        assert (s.valid_good, s.valid_ungood, s.test_good, s.test_ungood) == (93, 73, 833, 660)
        assert s.totals() == {"train": 1542, "valid": 166, "test": 1493}


def test_sizes_are_proportional_for_subsets() -> None:
    s = split_sizes(3, 6)
    assert (s.train, s.valid_patients, s.test_patients) == (154, 1, 5)
    assert (s.valid_good, s.valid_ungood, s.test_good, s.test_ungood) == (7, 6, 35, 28)
    s = split_sizes(15, 66)
    assert (s.train, s.valid_patients, s.test_patients) == (771, 7, 59)
    # 833 * 59 / 118 = 416.5, rounded half up
    assert (s.valid_good, s.valid_ungood, s.test_good, s.test_ungood) == (50, 39, 417, 330)
    for n in range(2, 200):
        s = split_sizes(1 + n % 40, n)
        assert s.valid_patients + s.test_patients == n and min(s.valid_patients, s.test_patients) >= 1
        assert s.train == round(1542 * min(1 + n % 40, 30) / 30)
    with pytest.raises(ValueError):
        split_sizes(0, 131)
    with pytest.raises(ValueError):
        split_sizes(30, 1)


def test_plan_train_shares_the_quota_and_spreads_slices() -> None:
    plan = plan_train([list(range(10, 30)), [5, 6, 7]], 12)
    picks = {v: [c.slice for c in plan.choices if c.volume == v] for v in (0, 1)}
    assert picks == {0: [11, 13, 15, 17, 20, 22, 24, 26, 28], 1: [5, 6, 7]}  # 9 + 3: volume 1 gives all it has
    assert {(c.split, c.label) for c in plan.choices} == {("train", "good")} and plan.shortfalls == []
    short = plan_train([[1, 2], [3]], 10)
    assert len(short.choices) == 3 and short.shortfalls == [
        "train/good: 3 of 10 slices (its 2 volume(s) hold too few liver slices)"]


def test_plan_lits_is_patient_level_and_seeded() -> None:
    n = 12
    good = [list(range(40)) for _ in range(n)]
    tumour = [[] if i % 3 == 0 else list(range(40, 40 + 5 + i)) for i in range(n)]  # 0, 3, 6, 9: no tumour
    sizes = split_sizes(30, n)
    assert (sizes.valid_patients, sizes.test_patients) == (1, 11)

    def groups(seed: int) -> dict[tuple[str, str], dict[int, list[int]]]:
        plan = plan_lits(good, tumour, sizes, seed)
        out: dict[tuple[str, str], dict[int, list[int]]] = {}
        for c in plan.choices:
            out.setdefault((c.split, c.label), {}).setdefault(c.volume, []).append(c.slice)
            assert c.slice in (good if c.label == "good" else tumour)[c.volume]
        return out

    g = groups(0)
    assert groups(0) == g
    valid = set(g[("valid", "good")]) | set(g[("valid", "Ungood")])
    test = set(g[("test", "good")]) | set(g[("test", "Ungood")])
    assert len(valid) == 1 and not valid & test and valid | test == set(range(n))
    assert all(v % 3 for v in valid), "a valid patient must have tumour slices"
    counts = {k: sum(map(len, v.values())) for k, v in g.items()}
    assert counts == {("valid", "good"): sizes.valid_good, ("valid", "Ungood"): sizes.valid_ungood,
                      ("test", "good"): sizes.test_good, ("test", "Ungood"): sizes.test_ungood}
    valids = {frozenset(set(groups(s)[("valid", "good")])) for s in range(6)}
    assert len(valids) > 1, "the split seed must change the split"


# -- a generated BTCV + LiTS set -> prepare ---------------------------------------------------
def test_layout_manifest_and_sizes(raw: Path, bench: Path) -> None:
    assert bench.name == "Liver"
    rows = read_manifest(bench)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    written = {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")}
    assert written == {r["path"] for r in rows} | {r["mask"] for r in rows if r["mask"]}
    for r in rows:
        assert hashlib.sha256((bench / r["path"]).read_bytes()).hexdigest() == r["sha256"]
        assert r["path"] == f"{r['split']}/{r['label']}/img/{r['patient']}_{int(r['slice']):03d}.png"
        assert r["mask"] == ("" if r["label"] == "good" else r["path"].replace("/img/", "/anomaly_mask/"))
        if r["split"] == "train":
            assert r["label"] == "good" and r["patient"].startswith("btcv_")
            assert r["source"] == f"RawData/Training/img/img{r['patient'][5:]}.nii.gz"
        else:
            assert r["patient"].startswith("lits_")
            n = int(r["patient"][5:])
            assert r["source"] == f"Training Batch 1/volume-{n}.nii"
    assert "btcv_0061" not in {r["patient"] for r in rows}, "unlabelled Testing images are not used"
    splits: dict[str, set[str]] = {}
    for r in rows:
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == N_BTCV + N_LITS

    # the counts are the plan on the raw labels: min(quota, what the volumes hold)
    btcv, good, tumour = flags(raw)
    sizes = split_sizes(N_BTCV, N_LITS)
    expected = {("train", "good"): len(plan_train(btcv, sizes.train).choices)}
    for c in plan_lits(good, tumour, sizes, 0).choices:
        expected[(c.split, c.label)] = expected.get((c.split, c.label), 0) + 1
    got: dict[tuple[str, str], int] = {}
    for r in rows:
        got[(r["split"], r["label"])] = got.get((r["split"], r["label"]), 0) + 1
    assert got == expected
    assert set(got) == {("train", "good"), ("valid", "good"), ("valid", "Ungood"), ("test", "good"),
                        ("test", "Ungood")}
    assert expected[("test", "good")] == sizes.test_good  # the quota binds here (the volumes hold more)


def test_liver_roi_masks_and_pixels_match_the_raw_volumes(raw: Path, bench: Path) -> None:
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    checked_pixels = set()
    for r in read_manifest(bench):
        src = (raw / ("BTCV" if r["split"] == "train" else "LiTS")) / r["source"]
        if r["source"] not in cache:
            lab_path = (src.parent.parent / "label" / src.name.replace("img", "label") if r["split"] == "train"
                        else src.with_name(src.name.replace("volume", "segmentation")))
            cache[r["source"]] = canonical(src), canonical(lab_path)
        hu, lab = cache[r["source"]]
        k = int(r["slice"])
        liver_labels = [6] if r["split"] == "train" else [1, 2]
        roi = to512(view(np.isin(lab[:, :, k], liver_labels)), nearest=True)
        pixels = image(bench / r["path"])
        assert roi.any()
        # equalised ROI pixels are 1..255 and everything outside the liver is 0
        np.testing.assert_array_equal(pixels > 0, roi)
        tumour = to512(view(lab[:, :, k] == 2), nearest=True) & roi if r["split"] != "train" else None
        if r["label"] == "Ungood":
            mask = np.asarray(Image.open(bench / r["mask"]))
            assert set(np.unique(mask)) == {0, 255}
            np.testing.assert_array_equal(mask > 0, tumour)
        elif tumour is not None:
            assert not tumour.any() and not (lab[:, :, k] == 2).any()
        if r["split"] not in checked_pixels:  # one full recomputation per split
            np.testing.assert_array_equal(pixels, expected_image(hu[:, :, k], roi, equalize=True))
            checked_pixels.add(r["split"])
    assert checked_pixels == {"train", "valid", "test"}


def test_prepare_is_deterministic_and_keeps_an_identical_bench(raw: Path, bench: Path, tmp_path: Path) -> None:
    again = Liver(raw=raw, workers=1).prepare(tmp_path, progress=False)
    assert tree_bytes(again.folder) == tree_bytes(bench)
    before = (again.folder / "manifest.csv").stat().st_mtime_ns
    kept = Liver(raw=raw).prepare(tmp_path, progress=False)
    assert kept.kept and kept.counts == again.counts
    assert (again.folder / "manifest.csv").stat().st_mtime_ns == before


def test_same_anatomy_in_any_stored_orientation_gives_identical_pngs(tmp_path: Path) -> None:
    hu, lab = phantom((40, 36, 10), np.random.default_rng(7), kind="btcv")
    affine = np.diag([10.0, 11.0, 3.0, 1.0])
    btcv = tmp_path / "btcv"
    codes = {1: ("R", "A", "S"), 2: ("L", "P", "S"), 3: ("S", "L", "P"), 4: ("A", "I", "R")}
    for i, c in codes.items():  # RAS, LPS (BTCV-like), and two with permuted, flipped axes
        save(stored_as(nib.Nifti1Image(hu, affine), c), btcv / f"img{i:04d}.nii.gz")
        save(stored_as(nib.Nifti1Image(lab, affine), c), btcv / f"label{i:04d}.nii.gz")
    lits = tmp_path / "lits"
    Liver.synthesize(tmp_path / "l", n_btcv=0, n_lits=2, lits_shape=(32, 32, 24))
    shutil.copytree(tmp_path / "l" / "LiTS", lits)
    bench = Liver(btcv, lits).prepare(tmp_path / "out", progress=False).folder
    rows = [r for r in read_manifest(bench) if r["split"] == "train"]
    by_patient: dict[str, dict[str, bytes]] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], {})[r["slice"]] = (bench / r["path"]).read_bytes()
    assert sorted(by_patient) == [f"btcv_{i:04d}" for i in codes]
    reference = by_patient["btcv_0001"]
    assert len(reference) == sum(1 for k in range(10) if (lab[:, :, k] == 6).any())
    for patient, images in by_patient.items():
        assert images == reference, f"{patient} differs from the RAS-stored volume"
    # radiological view: the liver (patient's right, anterior) is on the image's left, upper half
    rows_, cols = np.nonzero(image(bench / rows[len(rows) // 2]["path"]))
    assert cols.mean() < 256 and rows_.mean() < 256


def test_512_in_plane_volumes_are_not_resized(raw: Path, tmp_path: Path) -> None:
    hu, lab = phantom((512, 512, 6), np.random.default_rng(3), kind="btcv")
    hu[hu > 0] += 300  # push part of the liver above the window: those pixels clip to 255 before equalising
    btcv = tmp_path / "btcv"
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    save(stored_as(nib.Nifti1Image(hu, affine), ("L", "P", "I")), btcv / "img0007.nii.gz")
    save(stored_as(nib.Nifti1Image(lab, affine), ("L", "P", "I")), btcv / "label0007.nii.gz")
    bench = Liver(btcv, raw / "LiTS", equalize=False).prepare(tmp_path / "out", progress=False).folder
    rows = [r for r in read_manifest(bench) if r["split"] == "train"]
    assert [int(r["slice"]) for r in rows] == [k for k in range(6) if (lab[:, :, k] == 6).any()]
    for r in rows:
        k = int(r["slice"])
        roi = view(lab[:, :, k] == 6)
        pixels = image(bench / r["path"])
        np.testing.assert_array_equal(pixels, expected_image(hu[:, :, k], roi, equalize=False))
        inside = view(hu[:, :, k])[roi]
        assert (pixels[roi][inside >= 250] == 255).all() and (inside >= 250).any()


def test_no_equalize_from_the_cli_applies_the_hu_window(raw: Path, bench: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from bmad.cli import main

    assert reorganizers.get("liver").cls is Liver
    assert main(["prepare", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "liver  ->  bench liver (folder Liver/)" in listing and "RawData/Training/img/img0001.nii.gz" in listing

    btcv, lits = tmp_path / "btcv", tmp_path / "lits"
    shutil.copytree(raw / "BTCV" / "RawData" / "Training", btcv)  # the Training folder itself
    for i in (0, 1, 2):
        for name in (f"volume-{i}.nii", f"segmentation-{i}.nii"):
            (lits / "flat").mkdir(parents=True, exist_ok=True)
            shutil.copy(raw / "LiTS" / "Training Batch 1" / name, lits / "flat" / name)
    rc = main(["prepare", "liver", "--btcv", str(btcv), "--lits", str(lits), "--out", str(tmp_path / "data"),
               "--no-equalize", "--split-seed", "3", "--workers", "2", "--no-progress"])
    assert rc == 0
    assert "Liver: prepared" in capsys.readouterr().out
    out = tmp_path / "data" / "Liver"
    rows = read_manifest(out)
    sizes = split_sizes(N_BTCV, 3)
    assert sum(r["split"] == "train" for r in rows) == sum(r["split"] == "train" for r in read_manifest(bench))
    assert sum(r["split"] == "valid" for r in rows) <= sizes.valid_good + sizes.valid_ungood
    for r in rows[:: max(1, len(rows) // 12)]:
        src = (btcv / r["source"]) if r["split"] == "train" else lits / r["source"]
        lab_path = (src.parent.parent / "label" / src.name.replace("img", "label") if r["split"] == "train"
                    else src.with_name(src.name.replace("volume", "segmentation")))
        k = int(r["slice"])
        hu, lab = canonical(src)[:, :, k], canonical(lab_path)[:, :, k]
        roi = to512(view(np.isin(lab, [6] if r["split"] == "train" else [1, 2])), nearest=True)
        pixels = image(out / r["path"])
        np.testing.assert_array_equal(pixels, expected_image(hu, roi, equalize=False))
        assert not pixels[~roi].any()
    # liver ~100 HU lands mid-range (no equalisation); calcifications (600 HU) clip to 255
    eq = {r["path"]: r for r in read_manifest(bench)}
    row = next(r for r in rows if r["split"] == "train")
    plain = image(out / row["path"])
    assert 140 < np.median(plain[plain > 0]) < 200
    assert not np.array_equal(plain, image(bench / eq[row["path"]]["path"]))


@pytest.fixture()
def small(raw: Path, tmp_path: Path) -> tuple[Path, Path]:
    """2 BTCV + 3 LiTS volumes copied from the generated set (BTCV RawData layout, LiTS batch folders)."""
    btcv, lits = tmp_path / "btcv", tmp_path / "lits"
    for i in (1, 2):
        for kind in ("img", "label"):
            dst = btcv / "RawData" / "Training" / kind / f"{kind}{i:04d}.nii.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw / "BTCV" / "RawData" / "Training" / kind / f"{kind}{i:04d}.nii.gz", dst)
    for i in (0, 1, 2):
        for name in (f"volume-{i}.nii", f"segmentation-{i}.nii"):
            dst = lits / f"Training Batch {1 + i // 2}" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw / "LiTS" / "Training Batch 1" / name, dst)
    return btcv, lits


def test_synthesize_is_reproducible_in_the_true_layout(raw: Path, tmp_path: Path) -> None:
    again = Liver.synthesize(tmp_path, n_btcv=1, n_lits=2, seed=0, btcv_shape=BTCV_SHAPE, lits_shape=LITS_SHAPE)
    for name in ("BTCV/RawData/Training/img/img0001.nii.gz", "BTCV/RawData/Training/label/label0001.nii.gz",
                 "LiTS/Training Batch 1/volume-1.nii", "LiTS/Training Batch 1/segmentation-1.nii"):
        assert (again / name).read_bytes() == (raw / name).read_bytes()
    img = nib.load(raw / "BTCV/RawData/Training/img/img0001.nii.gz")
    assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert set(np.unique(canonical(raw / "BTCV/RawData/Training/label/label0001.nii.gz"))) <= {0, 1, 6}
    codes = {nib.aff2axcodes(nib.load(raw / f"LiTS/Training Batch 1/volume-{i}.nii").affine) for i in range(3)}
    assert codes == {("L", "P", "S"), ("R", "A", "S"), ("L", "P", "I")}
    labels = set()
    for i in range(N_LITS):
        labels |= set(np.unique(canonical(raw / f"LiTS/Training Batch 1/segmentation-{i}.nii")).tolist())
    assert labels == {0, 1, 2}
    assert not (canonical(raw / "LiTS/Training Batch 1/segmentation-4.nii") == 2).any()  # N % 5 == 4: no tumour


# -- the real TotalSegmentator CT as BTCV (and, with a drawn tumour, LiTS) input ------------------
def test_real_ct(tmp_path: Path) -> None:
    ct_path = real_fixture("ct_totalseg", "example_ct_sm.nii.gz")
    seg_path = real_fixture("ct_totalseg", "example_seg.nii.gz")
    liver_path = real_fixture("ct_totalseg", "example_seg_fast_liver.nii.gz")
    ct, seg = nib.load(ct_path), nib.load(seg_path)
    btcv = tmp_path / "btcv" / "RawData"
    for folder, name, target in (("img", "img0001.nii.gz", ct_path), ("label", "label0001.nii.gz", seg_path)):
        (btcv / "Training" / folder).mkdir(parents=True, exist_ok=True)
        (btcv / "Training" / folder / name).symlink_to(target)
    save(stored_as(ct, ("L", "P", "S")), btcv / "Training" / "img" / "img0002.nii.gz")
    save(stored_as(seg, ("L", "P", "S")), btcv / "Training" / "label" / "label0002.nii.gz")
    (btcv / "Testing" / "img").mkdir(parents=True)
    (btcv / "Testing" / "img" / "img0061.nii.gz").symlink_to(ct_path)
    # LiTS-like: the real CT with its binary liver (1) and a drawn tumour (2) inside it
    liver = np.asanyarray(nib.load(liver_path).dataobj) > 0
    xx, yy, zz = np.meshgrid(*(np.arange(s) for s in liver.shape), indexing="ij")
    lits = tmp_path / "lits"
    inside = np.argwhere(liver)
    for n, (centre, codes) in enumerate(((inside[len(inside) // 2], ("R", "A", "S")),
                                         (inside[len(inside) // 3], ("L", "P", "I")))):
        ball = ((xx - centre[0]) / 6.0) ** 2 + ((yy - centre[1]) / 6.0) ** 2 + ((zz - centre[2]) / 4.0) ** 2 < 1
        lab = (liver.astype(np.uint8) + (ball & liver)).astype(np.uint8)
        assert (lab == 2).any()
        batch = lits / f"Training Batch {n + 1}"
        save(stored_as(ct, codes), batch / f"volume-{n}.nii")
        save(stored_as(nib.Nifti1Image(lab, ct.affine), codes), batch / f"segmentation-{n}.nii")

    summary = Liver(tmp_path / "btcv", lits, btcv_liver_label=5, workers=2).prepare(tmp_path / "out", progress=False)
    bench = summary.folder
    rows = read_manifest(bench)
    train = [r for r in rows if r["split"] == "train"]
    assert {r["patient"] for r in train} == {"btcv_0001", "btcv_0002"}
    assert len(train) == 2 * 30  # every one of the 30 slices holds liver; quota 103 > 60
    hu = canonical(ct_path).astype(np.float64)
    labels = canonical(seg_path)
    for r in train:
        k = int(r["slice"])
        pixels = image(bench / r["path"])
        roi = to512(view(labels[:, :, k] == 5), nearest=True)
        assert not pixels[~roi].any(), "a pixel outside the liver is not 0"
        assert roi[pixels > 0].all(), "a nonzero pixel lies outside the liver"
        np.testing.assert_array_equal(pixels > 0, roi)
        twin = "btcv_0002" if r["patient"] == "btcv_0001" else "btcv_0001"
        other = bench / r["path"].replace(r["patient"], twin)
        assert other.read_bytes() == (bench / r["path"]).read_bytes(), "LPS-stored copy differs"
    k = 15
    pixels = image(bench / f"train/good/img/btcv_0001_{k:03d}.png")
    roi = to512(view(labels[:, :, k] == 5), nearest=True)
    np.testing.assert_array_equal(pixels, expected_image(hu[:, :, k], roi, equalize=True))
    assert pixels[roi].max() == 255 and pixels[roi].min() >= 1
    # un-equalised, the same slice is the HU window itself: liver ~0-80 HU -> ~113-159
    plain = slice_pixels(hu[:, :, k], roi, equalize=False)
    np.testing.assert_array_equal(plain, expected_image(hu[:, :, k], roi, equalize=False))
    assert 110 < np.median(plain[roi]) < 165

    lits_rows = [r for r in rows if r["split"] != "train"]
    assert {r["split"] for r in lits_rows} == {"valid", "test"}
    assert {r["label"] for r in lits_rows} == {"good", "Ungood"}
    for r in lits_rows:
        n = int(r["patient"][5:])
        lab = canonical(lits / f"Training Batch {n + 1}" / f"segmentation-{n}.nii")[:, :, int(r["slice"])]
        roi = to512(view(lab >= 1), nearest=True)
        np.testing.assert_array_equal(image(bench / r["path"]) > 0, roi)
        if r["label"] == "Ungood":
            mask = np.asarray(Image.open(bench / r["mask"])) > 0
            np.testing.assert_array_equal(mask, to512(view(lab == 2), nearest=True))
            assert roi[mask].all()
        else:
            assert not (lab == 2).any()


# -- bad input ----------------------------------------------------------------------------
def _fails(btcv: Path, lits: Path, out: Path, match: str) -> None:
    with pytest.raises(DataError, match=match):
        Liver(btcv, lits, on_error="fail").prepare(out, progress=False)
    assert not (out / "Liver").exists()


def _skips(btcv: Path, lits: Path, out: Path, source: str, reason: str) -> None:
    summary = Liver(btcv, lits, on_error="skip").prepare(out, progress=False)
    with open(out / "Liver" / "skipped.csv", newline="") as fh:
        skipped = list(csv.DictReader(fh))
    assert [r["source"] for r in skipped] == [source]
    assert reason in skipped[0]["reason"]
    assert summary.skipped and summary.skipped[0][0] == source
    assert source not in {r["source"] for r in read_manifest(out / "Liver")}
    assert read_manifest(out / "Liver")


def test_missing_folders_and_no_images(small: tuple[Path, Path], tmp_path: Path) -> None:
    btcv, lits = small
    _fails(tmp_path / "nope", lits, tmp_path / "o1", r"--btcv folder .*nope does not exist")
    (tmp_path / "empty").mkdir()
    _fails(btcv, tmp_path / "empty", tmp_path / "o2", r"no LITS images \(like volume-0\.nii\) under .*empty")
    with pytest.raises(DataError, match=r"no usable BTCV volume with liver \(label 9\)"):
        Liver(btcv, lits, btcv_liver_label=9).prepare(tmp_path / "o3", progress=False)


def test_missing_label(small: tuple[Path, Path], tmp_path: Path) -> None:
    btcv, lits = small
    (btcv / "RawData" / "Training" / "label" / "label0002.nii.gz").unlink()
    _fails(btcv, lits, tmp_path / "fail", r"img0002\.nii\.gz has no label file \(label0002\.nii\.gz\)")
    _skips(btcv, lits, tmp_path / "skip", "RawData/Training/img/img0002.nii.gz", "has no label file")


def test_shape_mismatch(small: tuple[Path, Path], tmp_path: Path) -> None:
    btcv, lits = small
    seg = lits / "Training Batch 2" / "segmentation-2.nii"
    nib.save(nib.Nifti1Image(np.zeros((40, 44, 36), np.uint8), np.eye(4)), seg)
    _fails(btcv, lits, tmp_path / "fail", r"volume-2\.nii has shape \(40, 48, 36\) but segmentation-2\.nii has")
    _skips(btcv, lits, tmp_path / "skip", "Training Batch 2/volume-2.nii", "has shape")


def test_empty_label(small: tuple[Path, Path], tmp_path: Path) -> None:
    btcv, lits = small
    (btcv / "RawData" / "Training" / "label" / "label0002.nii.gz").write_bytes(b"")
    _fails(btcv, lits, tmp_path / "fail", r"cannot read .*label0002\.nii\.gz")
    _skips(btcv, lits, tmp_path / "skip", "RawData/Training/img/img0002.nii.gz", "cannot read")


@pytest.mark.parametrize("which", ["lits", "btcv"])
def test_corrupt_image(small: tuple[Path, Path], tmp_path: Path, which: str) -> None:
    btcv, lits = small
    if which == "lits":  # uncompressed: the header reads, the data is cut short
        path, source = lits / "Training Batch 1" / "volume-1.nii", "Training Batch 1/volume-1.nii"
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a gzip stream cut in the middle
        path, source = btcv / "RawData" / "Training" / "img" / "img0002.nii.gz", "RawData/Training/img/img0002.nii.gz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails(btcv, lits, tmp_path / "fail", "cannot read .*" + re.escape(path.name))
    _skips(btcv, lits, tmp_path / "skip", source, "cannot read")


def test_duplicate_volume(small: tuple[Path, Path], tmp_path: Path) -> None:
    btcv, lits = small
    shutil.copy(lits / "Training Batch 1" / "volume-0.nii", lits / "Training Batch 2" / "volume-0.nii")
    _fails(btcv, lits, tmp_path / "fail", r"two LITS images numbered 0 under")


def test_gzipped_lits_is_read_too(small: tuple[Path, Path], tmp_path: Path) -> None:
    btcv, lits = small
    base = Liver(btcv, lits).prepare(tmp_path / "a", progress=False).folder
    for p in sorted(lits.rglob("*.nii")):
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes(), mtime=0))
        p.unlink()
    gz = Liver(btcv, lits).prepare(tmp_path / "b", progress=False).folder
    def strip(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "source"} for r in rows]

    assert strip(read_manifest(gz)) == strip(read_manifest(base))
    assert all(r["source"].endswith(".nii.gz") for r in read_manifest(gz) if r["split"] != "train")
