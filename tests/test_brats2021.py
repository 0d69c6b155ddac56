"""The BraTS2021 reorganizer and its synthetic raw generator."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError, UsageError
from bmad.reorganizer import reorganizers
from datasets_prep import synthetic
from datasets_prep.brats2021 import BraTS2021, plan_split, split_sizes, split_totals
from tests.prep_helpers import read_manifest, tree_bytes

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "fixtures" / "real" / "brats2015_deepmedic"
N_CASES = 20
SHAPE = (64, 64, 64)
SLICES = synthetic.slice_range(SHAPE[2])


def view(plane: np.ndarray) -> np.ndarray:
    """Radiological axial view of a RAS+ plane: anterior up, patient's right on the left."""
    return np.flipud(np.fliplr(plane.T))


def canonical(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = BraTS2021.synthesize(tmp_path_factory.mktemp("raw"), n=N_CASES, seed=0, shape=SHAPE)
    (raw / "README.txt").write_text("junk at the top level is ignored\n")
    (raw / "Synth_00000" / "notes.json").write_text("{}\n")
    (raw / "empty_folder").mkdir()
    return raw


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert BraTS2021.synthetic_options(raw) == {"raw": raw, "slices": SLICES}
    out = tmp_path_factory.mktemp("out1")
    return BraTS2021(workers=2, **BraTS2021.synthetic_options(raw)).prepare(out, progress=False).folder


# -- the size rule ------------------------------------------------------------------
def test_sizes_reproduce_bmad_for_1251_cases() -> None:
    sizes = split_sizes(1251)
    assert [(s.split, s.label, s.patients, s.slices) for s in sizes] == [
        ("train", "good", 424, 7500),
        ("valid", "good", 39, 39),
        ("valid", "Ungood", 11, 44),
        ("test", "good", 162, 640),
        ("test", "Ungood", 615, 3075),
    ]
    assert split_totals(sizes) == {"train": 7500, "valid": 83, "test": 3715}


def test_sizes_are_proportional_for_fewer_cases() -> None:
    sizes = split_sizes(60)
    assert [(s.patients, s.slices) for s in sizes] == [(20, 354), (2, 2), (1, 4), (8, 32), (29, 145)]
    for n in range(5, 400):
        sizes = split_sizes(n)
        assert sum(s.patients for s in sizes) == n
        assert min(s.patients for s in sizes) >= 1
    with pytest.raises(ValueError):
        split_sizes(4)


def test_plan_moves_missing_tumour_slices_to_the_nearest_one() -> None:
    flags = [np.zeros(40, bool) for _ in range(5)]
    for f in flags[:2]:
        f[10:16] = True  # slices 70..75 carry tumour
    plan = plan_split(flags, start=60, seed=0)
    ungood = {c.case: [] for c in plan.choices if c.label == "Ungood"}
    for c in plan.choices:
        if c.label == "Ungood":
            ungood[c.case].append(c.slice)
    # valid: targets 60,70,80,90 -> 70,71,75,74; test: 60,68,76,84,92 -> 70,71,75,74,73
    assert sorted(map(sorted, ungood.values())) == [[70, 71, 73, 74, 75], [70, 71, 74, 75]]
    assert all(60 <= c.slice < 100 and flags[c.case][c.slice - 60] == (c.label == "Ungood") for c in plan.choices)
    assert plan.moved == 9 and plan.shortfalls == []

    few_normal = [np.ones(40, bool) for _ in range(5)]
    for f in few_normal:
        f[:2] = False  # two normal slices each: the train (18) and test good (4) quotas cannot be met
    plan = plan_split(few_normal, start=60, seed=0)
    assert plan.shortfalls == [
        "train/good: 2 of 18 slices (its 1 patient(s) hold too few normal slices in range)",
        "test/good: 2 of 4 slices (its 1 patient(s) hold too few normal slices in range)",
    ]


# -- synthetic set -> prepare ---------------------------------------------------------
def test_layout_and_sizes(bench: Path) -> None:
    assert bench.name == "Brain"
    rows = read_manifest(bench)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "valid", "test")}
    assert counts == split_totals(split_sizes(N_CASES))
    for size in split_sizes(N_CASES):
        group = [r for r in rows if (r["split"], r["label"]) == (size.split, size.label)]
        assert len(group) == size.slices
        assert len({r["patient"] for r in group}) == size.patients
    for split, labels in {"train": {"good"}, "valid": {"good", "Ungood"}, "test": {"good", "Ungood"}}.items():
        assert {r["label"] for r in rows if r["split"] == split} == labels
    written = {p.relative_to(bench).as_posix() for p in bench.rglob("*.png")}
    listed = {r["path"] for r in rows} | {r["mask"] for r in rows if r["mask"]}
    assert written == listed
    for r in rows:
        folder = f"{r['split']}/{r['label']}/img/"
        assert r["path"] == f"{folder}{r['patient']}_{int(r['slice']):03d}.png"
        assert r["mask"] == ("" if r["label"] == "good" else r["path"].replace("/img/", "/anomaly_mask/"))
        assert r["source"] == f"{r['patient']}/{r['patient']}_flair.nii.gz"
    assert not list(bench.parent.glob(".Brain*")), "temp folder left behind"


def test_patient_level_split(bench: Path) -> None:
    splits: dict[str, set[str]] = {}
    for r in read_manifest(bench):
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert len(splits) == N_CASES


def test_labels_match_the_raw_segmentation(raw: Path, bench: Path) -> None:
    start, stop = (int(v) for v in SLICES.split(":"))
    segs: dict[str, np.ndarray] = {}
    for r in read_manifest(bench):
        seg = segs.setdefault(r["patient"], canonical(raw / r["patient"] / f"{r['patient']}_seg.nii.gz") > 0)
        k = int(r["slice"])
        assert start <= k < stop
        image = Image.open(bench / r["path"])
        assert image.mode == "L" and image.size == SHAPE[:2]
        assert hashlib.sha256((bench / r["path"]).read_bytes()).hexdigest() == r["sha256"]
        if r["label"] == "good":
            assert not seg[:, :, k].any()
        else:
            mask = np.asarray(Image.open(bench / r["mask"]))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
            np.testing.assert_array_equal(mask > 0, view(seg[:, :, k]))


def test_images_are_robustly_normalised_inside_the_brain(raw: Path, bench: Path) -> None:
    rows = read_manifest(bench)
    for row in (rows[0], rows[-1]):
        volume = canonical(raw / row["source"]).astype(np.float64)
        lo, hi = np.percentile(volume[volume != 0], [0.5, 99.5])
        plane = volume[:, :, int(row["slice"])]
        expected = np.where(plane != 0, np.clip((plane - lo) / (hi - lo), 0, 1) * 255, 0)
        image = np.asarray(Image.open(bench / row["path"])).astype(np.float64)
        assert np.abs(image - view(expected)).max() <= 0.5 + 1e-6


def test_prepare_is_deterministic_and_keeps_an_identical_bench(raw: Path, bench: Path, tmp_path: Path) -> None:
    again = BraTS2021(raw, slices=SLICES, workers=1).prepare(tmp_path, progress=False).folder
    assert tree_bytes(again) == tree_bytes(bench)  # 1 worker and 2 workers: byte-identical
    before = (again / "manifest.csv").stat().st_mtime_ns
    kept = BraTS2021(raw, slices=SLICES).prepare(tmp_path, progress=False)
    assert kept.kept and kept.folder == again and sum(kept.counts.values()) == len(read_manifest(bench))
    assert (again / "manifest.csv").stat().st_mtime_ns == before


def test_split_seed_changes_the_split_and_overwrite_is_needed(raw: Path, bench: Path, tmp_path: Path) -> None:
    shutil.copytree(bench, tmp_path / "Brain")
    other = BraTS2021(raw, slices=SLICES, split_seed=1)
    with pytest.raises(UsageError, match="--overwrite"):
        other.prepare(tmp_path, progress=False)
    assert (tmp_path / "Brain" / "manifest.csv").read_bytes() == (bench / "manifest.csv").read_bytes()
    BraTS2021(raw, slices=SLICES, split_seed=1, overwrite=True).prepare(tmp_path, progress=False)

    def patients(b: Path) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for r in read_manifest(b):
            out.setdefault(r["split"], set()).add(r["patient"])
        return out

    assert patients(tmp_path / "Brain") != patients(bench)
    assert len(read_manifest(tmp_path / "Brain")) == len(read_manifest(bench))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Brain"]


def test_synthetic_cases_are_reproducible(raw: Path, tmp_path: Path) -> None:
    again = BraTS2021.synthesize(tmp_path, n=2, seed=0, shape=SHAPE)
    for case in ("Synth_00000", "Synth_00001"):
        for kind in ("flair", "seg"):
            name = f"{case}/{case}_{kind}.nii.gz"
            assert (again / name).read_bytes() == (raw / name).read_bytes()
    labels = set()
    for case in sorted(p for p in raw.iterdir() if p.name.startswith("Synth_")):
        labels |= set(np.unique(canonical(case / f"{case.name}_seg.nii.gz")).tolist())
    assert labels == {0, 1, 2, 4}
    other = synthetic.make_case(seed=1, index=0, shape=SHAPE)[0]
    assert not np.array_equal(other, synthetic.make_case(seed=0, index=0, shape=SHAPE)[0])


def test_registered_and_runs_from_the_cli(raw: Path, tmp_path: Path) -> None:
    from bmad.cli import main

    assert reorganizers.get("brats2021").cls is BraTS2021
    subset = tmp_path / "raw"
    for i in range(6):
        shutil.copytree(raw / f"Synth_{i:05d}", subset / f"Synth_{i:05d}")
    rc = main(["prepare", "brats2021", "--raw", str(subset), "--out", str(tmp_path / "data"),
               "--slices", SLICES, "--split-seed", "3", "--no-progress"])
    assert rc == 0
    rows = read_manifest(tmp_path / "data" / "Brain")
    assert len(rows) == sum(split_totals(split_sizes(6)).values())


# -- real BraTS 2013/2015 cases -------------------------------------------------------
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real fixtures need {SHARED} (a checkout beside the repo)")
def test_real_cases(tmp_path: Path) -> None:
    options = dict(flair_pattern="Flair_*.nii.gz", seg_pattern="OTMultiClass.nii.gz",
                   brainmask_pattern="brainmask.nii.gz", slices="20:110")
    with pytest.raises(DataError, match="--test-only"):
        BraTS2021(REAL, **options).prepare(tmp_path, progress=False)
    assert not (tmp_path / "Brain").exists()

    bench = BraTS2021(REAL, test_only=True, **options).prepare(tmp_path, progress=False).folder
    rows = read_manifest(bench)
    assert len(rows) == 2 * 90 and {r["split"] for r in rows} == {"test"}
    assert {r["label"] for r in rows} == {"good", "Ungood"}
    for case in ("brats_2013_pat0001_1", "brats_2013_pat0005_1"):
        seg = canonical(REAL / case / "OTMultiClass.nii.gz")
        brain = canonical(REAL / case / "brainmask.nii.gz") > 0
        for r in (r for r in rows if r["patient"] == case):
            k = int(r["slice"])
            image = np.asarray(Image.open(bench / r["path"]))
            assert image.shape == (240, 240) and image.dtype == np.uint8
            assert not image[~view(brain[:, :, k])].any()
            assert r["source"] == f"{case}/Flair_subtrMeanDivStd.nii.gz"
            if r["label"] == "good":
                assert not seg[:, :, k].any()
            else:
                mask = np.asarray(Image.open(bench / r["mask"]))
                np.testing.assert_array_equal(mask, view(seg[:, :, k] > 0).astype(np.uint8) * 255)


# -- bad input ------------------------------------------------------------------------
@pytest.fixture()
def small_raw(raw: Path, tmp_path: Path) -> Path:
    small = tmp_path / "raw"
    for i in range(5):
        shutil.copytree(raw / f"Synth_{i:05d}", small / f"Synth_{i:05d}")
    return small


def _fails(raw: Path, out: Path, match: str, **options: object) -> None:
    with pytest.raises(DataError, match=match):
        BraTS2021(raw, slices=SLICES, on_error="fail", **options).prepare(out, progress=False)
    assert not (out / "Brain").exists()
    # what finished before the stop stays staged (complete files only) so a re-run resumes
    assert not list(out.rglob("*.tmp"))


def test_missing_seg(small_raw: Path, tmp_path: Path) -> None:
    (small_raw / "Synth_00003" / "Synth_00003_seg.nii.gz").unlink()
    _fails(small_raw, tmp_path / "out", r"no file matching '\*_seg\.nii\.gz' in case folder .*Synth_00003")


def test_on_error_skip_sets_a_bad_case_aside(raw: Path, tmp_path: Path) -> None:
    subset = tmp_path / "raw"
    for i in range(7):
        shutil.copytree(raw / f"Synth_{i:05d}", subset / f"Synth_{i:05d}")
    (subset / "Synth_00003" / "Synth_00003_seg.nii.gz").unlink()
    seg = subset / "Synth_00005" / "Synth_00005_seg.nii.gz"
    seg.write_bytes(seg.read_bytes()[:100])
    summary = BraTS2021(subset, slices=SLICES).prepare(tmp_path / "out", progress=False)
    assert [s for s, _ in summary.skipped] == ["Synth_00003", "Synth_00005"]
    assert "no file matching '*_seg.nii.gz'" in summary.skipped[0][1]
    assert "cannot read" in summary.skipped[1][1]
    rows = read_manifest(summary.folder)
    assert {r["patient"] for r in rows}.isdisjoint({"Synth_00003", "Synth_00005"})
    assert len({r["patient"] for r in rows}) == 5  # the five usable cases, one per group
    listed = (summary.folder / "skipped.csv").read_text()
    assert "Synth_00003" in listed and "Synth_00005" in listed


def test_ambiguous_pattern(small_raw: Path, tmp_path: Path) -> None:
    shutil.copy(small_raw / "Synth_00001" / "Synth_00001_flair.nii.gz", small_raw / "Synth_00001" / "x_flair.nii.gz")
    _fails(small_raw, tmp_path / "out", r"2 files match '\*_flair\.nii\.gz' in case folder .*Synth_00001")


@pytest.mark.parametrize("kind", ["seg", "flair"])
def test_truncated_nifti(small_raw: Path, tmp_path: Path, kind: str) -> None:
    path = small_raw / "Synth_00002" / f"Synth_00002_{kind}.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _fails(small_raw, tmp_path / "out", rf"cannot read .*Synth_00002_{kind}\.nii\.gz")


def test_shape_mismatch(small_raw: Path, tmp_path: Path) -> None:
    path = small_raw / "Synth_00004" / "Synth_00004_seg.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(np.zeros((64, 60, 64), np.uint8), np.eye(4)).to_bytes()))
    _fails(small_raw, tmp_path / "out", r"Synth_00004_flair\.nii\.gz has shape \(64, 64, 64\) but Synth_00004_seg")


def test_slice_range_outside_the_volume(small_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--slices 60:100 needs 100"):
        BraTS2021(small_raw).prepare(tmp_path, progress=False)
    with pytest.raises(UsageError, match="START:STOP"):
        BraTS2021(small_raw, slices="60-100")
