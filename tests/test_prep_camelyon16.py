"""The Camelyon16 reorganizer (datasets_prep/camelyon16.py) and its WSI helpers (datasets_prep/wsi.py).

Raw data is written in the true format by the tests: pyramidal tiled TIFFs (tifffile +
imagecodecs) that OpenSlide opens as ``generic-tiff``, ASAP XML annotations with tumour
and exclusion polygons, and CAMELYON16's header-less ``testing/reference.csv``. The real
fixtures (the Aperio slide CMU-1-Small-Region and its generic-TIFF pyramid) are used
from ../shared/fixtures/real/wsi.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.errors import DataError, UsageError
from datasets_prep import wsi
from datasets_prep.camelyon16 import (
    BMAD_EVAL_SLIDES,
    PATCH,
    Camelyon16,
    Sizes,
    SyntheticSlide,
    assign_eval_slides,
    read_reference,
    split_sizes,
)
from datasets_prep.common import share_quota
from tests.conftest import real_fixture

openslide = pytest.importorskip("openslide")
pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

SIZE = (4096, 3072)
SMALL = {"train_patches": 8, "valid_patches": 2, "test_patches": 3}
FOLDER = "Histopathology"


# ---------------------------------------------------------------------------
# independent checks (not the code under test)
# ---------------------------------------------------------------------------
def winding_inside(x: float, y: float, poly: list[tuple[float, float]]) -> bool:
    """Point in polygon by the winding number (a different algorithm from wsi.points_in_polygon)."""
    wn = 0
    for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1], strict=True):
        cross = (x2 - x1) * (y - y1) - (x - x1) * (y2 - y1)
        if y1 <= y < y2 and cross > 0:
            wn += 1
        elif y2 <= y < y1 and cross < 0:
            wn -= 1
    return wn != 0


def xml_polygons(path: Path) -> tuple[list, list]:
    """(tumour, exclusion) vertex lists read straight from the XML."""
    tumour, exclusion = [], []
    for ann in ET.parse(path).getroot().iter("Annotation"):
        coords = sorted(ann.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        pts = [(float(c.get("X")), float(c.get("Y"))) for c in coords]
        group = ann.get("PartOfGroup")
        (exclusion if group in ("_2", "Exclusion") else tumour).append(pts)
    return tumour, exclusion


def sat_fraction(rgb: np.ndarray, thr: int = 20) -> float:
    """Fraction of pixels with HSV saturation >= thr (0..255)."""
    a = rgb.astype(np.float64)
    mx, mn = a.max(-1), a.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1) * 255, 0)
    return float((sat >= thr).mean())


def manifest(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "manifest.csv").read_text())))


def coords(row: dict[str, str]) -> tuple[int, int]:
    x, y = row["slice"].split("_")
    return int(x[1:]), int(y[1:])


def clone(raw: Path, dst: Path) -> Path:
    """A copy of ``raw`` whose slides are symlinks (cheap) and whose CSV/XML are real copies."""
    for p in sorted(raw.rglob("*")):
        if p.is_file():
            q = dst / p.relative_to(raw)
            q.parent.mkdir(parents=True, exist_ok=True)
            if p.suffix == ".tif":
                q.symlink_to(p)
            else:
                shutil.copy(p, q)
    return dst


# ---------------------------------------------------------------------------
# fixtures: one generated raw set and one prepared bench for the module
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Camelyon16.synthesize(tmp_path_factory.mktemp("c16") / "CAMELYON16", n=8, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def bench(raw: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("c16out")
    summary = Camelyon16(raw, workers=2).prepare(out, progress=False)
    return summary, out / FOLDER


# ---------------------------------------------------------------------------
# the size rule and the split (pure functions)
# ---------------------------------------------------------------------------
def test_split_sizes_are_bmads_for_the_full_set():
    # the release: 159 normal training slides (normal_086 became tumor_111), 129 test slides less test_114
    assert split_sizes(159, 128) == Sizes(5088, (100, 100), (1000, 1000), 13)
    # an old copy with normal_086 / test_049, or test_114 kept: still BMAD's quotas
    assert split_sizes(160, 130) == Sizes(5088, (100, 100), (1000, 1000), 13)
    assert share_quota(5088, [500] * 159) == [32] * 159
    assert BMAD_EVAL_SLIDES == 13 + 115


def test_split_sizes_are_proportional_on_subsets():
    assert split_sizes(80, 64) == Sizes(2560, (50, 50), (500, 500), 7)  # 13 * 64 / 128 = 6.5 -> 7
    s = split_sizes(4, 4)
    assert s.train == round(5088 * 4 / 159) == 128
    assert s.valid == (3, 3) and sorted(s.test) == [31, 32] and s.valid_slides == 2
    assert split_sizes(1, 4).train == 32
    with pytest.raises(ValueError):
        split_sizes(4, 3)


def test_eval_slide_assignment_is_slide_level_stratified_and_seeded():
    normal = [f"test_{i:03d}" for i in range(1, 81)]
    tumour = [f"test_{i:03d}" for i in range(81, 129)]
    where = assign_eval_slides(normal, tumour, 13, seed=0)
    valid = {s for s, v in where.items() if v == "valid"}
    assert len(valid) == 13 and set(where) == set(normal) | set(tumour)
    assert len(valid & set(normal)) == 8 and len(valid & set(tumour)) == 5
    assert assign_eval_slides(list(reversed(normal)), tumour, 13, seed=0) == where  # input order irrelevant
    assert assign_eval_slides(normal, tumour, 13, seed=1) != where
    small = assign_eval_slides(["test_001", "test_002"], ["test_003", "test_004"], 2, seed=0)
    assert sorted(small.values()) == ["test", "test", "valid", "valid"]
    assert {small["test_001"], small["test_002"]} == {"valid", "test"}



# ---------------------------------------------------------------------------
# wsi helpers
# ---------------------------------------------------------------------------
U_SHAPE = [(0, 0), (300, 0), (300, 300), (200, 300), (200, 100), (100, 100), (100, 300), (0, 300)]


def test_points_in_polygon_matches_winding_number():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-20, 320, size=(2000, 2))
    got = wsi.points_in_polygon(pts, np.array(U_SHAPE, float))
    want = np.array([winding_inside(x, y, U_SHAPE) for x, y in pts])
    assert got.sum() > 500
    assert np.array_equal(got, want)
    p = wsi.interior_point(np.array(U_SHAPE, float))
    assert p is not None and winding_inside(*p, U_SHAPE)


def test_asap_xml_groups_and_exclusions(tmp_path: Path):
    square = [(0, 0), (1000, 0), (1000, 1000), (0, 1000)]
    hole = [(400, 400), (600, 400), (600, 600), (400, 600)]
    other = [(2000, 0), (2100, 0), (2100, 100), (2000, 100)]
    path = tmp_path / "a.xml"
    path.write_text(wsi.asap_xml([("_0", square), ("_2", hole), ("Tumor", other), ("None", [(5000, 5000)] * 3)]))
    ann = wsi.parse_asap_xml(path)
    assert len(ann.tumour) == 2 and len(ann.exclusion) == 1 and len(ann.ignored) == 1
    got = ann.contains(np.array([[100, 100], [500, 500], [2050, 50], [1500, 500], [5000, 5000]]))
    assert got.tolist() == [True, False, True, False, False]

    path.write_text(wsi.asap_xml([("Lymphocytes", square)]))
    with pytest.raises(DataError, match="Lymphocytes"):
        wsi.parse_asap_xml(path)
    path.write_text(wsi.asap_xml([("Tumor", square)]).replace('X="1000.0000"', 'X="abc"', 1))
    with pytest.raises(DataError, match="not a number"):
        wsi.parse_asap_xml(path)
    path.write_text("<Annotations><Annotation>")
    with pytest.raises(DataError, match="a.xml"):
        wsi.parse_asap_xml(path)
    path.write_text("<Other/>")
    with pytest.raises(DataError, match="ASAP"):
        wsi.parse_asap_xml(path)


def test_otsu_separates_background_from_tissue():
    values = np.concatenate([np.full(500, 4), np.full(300, 90), np.arange(0, 10)]).astype(np.uint8)
    t = wsi.otsu_threshold(values)
    assert (values[values >= t] == 90).all() and (values[values < t] < 10).all()
    noisy = np.clip(np.concatenate([np.random.default_rng(0).normal(5, 2, 5000),
                                    np.random.default_rng(1).normal(80, 15, 3000)]), 0, 255).astype(np.uint8)
    assert 15 < wsi.otsu_threshold(noisy) < 60
    assert wsi.tissue_threshold(np.full(100, 3, np.uint8)) == 20  # blank slide: the floor
    assert wsi.tissue_threshold(values, "55") == 55


def test_pyramid_tiff_opens_as_generic_tiff_with_exact_pixels(tmp_path: Path):
    spec = SyntheticSlide.make(1536, 1024, tumour=True, seed=3)
    path = wsi.write_pyramid_tiff(tmp_path / "s.tif", 1536, 1024, spec.render, tile=256, compression="zlib")
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 4 and s.dimensions == (1536, 1024)
        assert [round(d) for d in s.level_downsamples] == [1, 2, 4, 8]
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.243, abs=1e-3)
        region = np.asarray(s.read_region((300, 200), 0, (256, 256)))[..., :3]
        level1 = np.asarray(s.read_region((512, 256), 1, (64, 64)))[..., :3]
    assert np.array_equal(region, spec.render(300, 200, 256, 256, 1))  # lossless: exact
    assert np.array_equal(level1, spec.render(256, 128, 64, 64, 2))


# ---------------------------------------------------------------------------
# the prepared bench
# ---------------------------------------------------------------------------
def test_layout_counts_and_manifest(raw: Path, bench):
    summary, folder = bench
    sizes = split_sizes(4, 4)
    want = {("train", "good"): sizes.train, ("valid", "good"): sizes.valid[0], ("valid", "Ungood"): sizes.valid[1],
            ("test", "good"): sizes.test[0], ("test", "Ungood"): sizes.test[1]}
    assert summary.counts == want and not summary.skipped
    rows = manifest(folder)
    assert len(rows) == sum(want.values())
    assert not list(folder.rglob("anomaly_mask"))
    for r in rows:
        p = folder / r["path"]
        assert r["path"] == f"{r['split']}/{r['label']}/img/{p.name}" and r["mask"] == ""
        assert hashlib.sha256(p.read_bytes()).hexdigest() == r["sha256"]
        x, y = coords(r)
        assert p.name == f"{r['patient']}_x{x:06d}_y{y:06d}.png"
        assert (raw / r["source"]).is_file() and Path(r["source"]).stem == r["patient"]
    with Image.open(folder / rows[0]["path"]) as im:
        assert im.mode == "RGB" and im.size == (PATCH, PATCH)
    assert len({r["path"] for r in rows}) == len(rows)


def test_slide_level_split(raw: Path, bench):
    _, folder = bench
    rows = manifest(folder)
    labels = read_reference(raw / "testing" / "reference.csv")
    by_split = {s: {r["patient"] for r in rows if r["split"] == s} for s in ("train", "valid", "test")}
    assert not (by_split["train"] & by_split["valid"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["valid"] & by_split["test"])
    assert all(p.startswith("normal_") for p in by_split["train"])
    assert by_split["valid"] | by_split["test"] == set(labels)
    for r in rows:
        if r["split"] != "train":
            assert labels[r["patient"]] == r["label"], r  # Normal slides give good, Tumor slides Ungood
            assert r["source"] == f"testing/images/{r['patient']}.tif"


def test_tumour_patch_centres_inside_tumour_outside_exclusion(raw: Path, bench):
    _, folder = bench
    rows = [r for r in manifest(folder) if r["label"] == "Ungood"]
    assert rows
    seen_hole_neighbours = 0
    for r in rows:
        tumour, exclusion = xml_polygons(raw / "testing" / "lesion_annotations" / f"{r['patient']}.xml")
        assert exclusion, "the synthetic tumour slides carry an exclusion polygon"
        x, y = coords(r)
        cx, cy = x + PATCH / 2, y + PATCH / 2
        assert any(winding_inside(cx, cy, t) for t in tumour), r
        assert not any(winding_inside(cx, cy, e) for e in exclusion), r
        # the patch overlaps the exclusion polygon's bounding box: its centre was still checked
        ex = np.array(exclusion[0])
        if x < ex[:, 0].max() and x + PATCH > ex[:, 0].min() and y < ex[:, 1].max() and y + PATCH > ex[:, 1].min():
            seen_hole_neighbours += 1
        with Image.open(folder / r["path"]) as im:
            centre = np.asarray(im)[PATCH // 2 - 8: PATCH // 2 + 8, PATCH // 2 - 8: PATCH // 2 + 8]
        assert centre.mean(axis=(0, 1))[1] < 120, "the rendered tumour is purple (low green) at the patch centre"


def test_good_patches_are_tissue_not_background(bench):
    _, folder = bench
    rows = [r for r in manifest(folder) if r["label"] == "good"]
    for r in rows:
        with Image.open(folder / r["path"]) as im:
            rgb = np.asarray(im)
        assert sat_fraction(rgb) >= 0.5, r["path"]
    # the background is white: a patch of it would fail the check above
    blank = SyntheticSlide.make(*SIZE, tumour=False, seed=0).render(0, 0, PATCH, PATCH, 1)
    assert sat_fraction(blank) < 0.01


def test_patch_pixels_equal_openslide_read_region(raw: Path, bench):
    _, folder = bench
    rows = manifest(folder)
    rows = [r for i, r in enumerate(rows) if r["split"] != "train" or i % 4 == 0]
    handles: dict[str, openslide.OpenSlide] = {}
    try:
        for r in rows:
            s = handles.setdefault(r["source"], openslide.OpenSlide(str(raw / r["source"])))
            region = np.asarray(s.read_region(coords(r), 0, (PATCH, PATCH)))
            assert (region[..., 3] == 255).all()
            with Image.open(folder / r["path"]) as im:
                assert np.array_equal(np.asarray(im), region[..., :3]), r["path"]
    finally:
        for s in handles.values():
            s.close()


def test_rerun_keeps_the_verified_bench(raw: Path, bench):
    summary, folder = bench
    again = Camelyon16(raw, workers=1).prepare(folder.parent, progress=False)
    assert again.kept and again.counts == summary.counts


def test_deterministic_and_seeded(raw: Path, tmp_path: Path):
    a = Camelyon16(raw, workers=2, **SMALL).prepare(tmp_path / "a", progress=False)
    b = Camelyon16(raw, workers=1, **SMALL).prepare(tmp_path / "b", progress=False)
    c = Camelyon16(raw, workers=1, split_seed=1, **SMALL).prepare(tmp_path / "c", progress=False)
    ma, mb, mc = ((p / FOLDER / "manifest.csv").read_bytes() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert ma == mb
    assert ma != mc
    assert a.counts == b.counts == {("train", "good"): 8, ("valid", "good"): 2, ("valid", "Ungood"): 2,
                                    ("test", "good"): 3, ("test", "Ungood"): 3}
    assert c.counts == a.counts


def test_cli_prepare(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from bmad.cli import main

    rc = main(["prepare", "camelyon16", "--raw", str(raw), "--out", str(tmp_path), "--no-progress", "--workers", "2",
               "--train-patches", "5", "--valid-patches", "1", "--test-patches", "2", "--min-tissue", "0.6"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Histopathology" in out and "train: good 5" in out
    rows = manifest(tmp_path / FOLDER)
    assert len(rows) == 5 + 2 + 4
    rc = main(["prepare", "camelyon16", "--raw", str(raw), "--out", str(tmp_path / "x"), "--no-progress",
               "--saturation-threshold", "high"])
    assert rc == 2


def test_prepare_list_shows_the_raw_layout(capsys: pytest.CaptureFixture):
    from bmad.cli import main

    assert main(["prepare", "--list"]) == 0
    out = capsys.readouterr().out
    assert "camelyon16" in out and "testing/reference.csv" in out and "Histopathology" in out


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------
def test_unreadable_slides(raw: Path, tmp_path: Path):
    src = clone(raw, tmp_path / "raw")
    (src / "training" / "normal" / "normal_099.tif").write_bytes(b"this is not a TIFF file\n" * 10)
    data = (raw / "testing" / "images" / "test_001.tif").read_bytes()
    (src / "testing" / "images" / "test_009.tif").write_bytes(data[: int(len(data) * 0.99)])  # truncated
    with (src / "testing" / "reference.csv").open("a") as fh:
        fh.write("test_009,Normal,\n")

    # opens and scans (its low-resolution levels are intact) but its level-0 tiles are zeroed
    data = bytearray((raw / "training" / "normal" / "normal_001.tif").read_bytes())
    data[len(data) // 10: len(data) * 6 // 10] = bytes(len(data) * 6 // 10 - len(data) // 10)
    (src / "training" / "normal" / "normal_098.tif").write_bytes(bytes(data))

    with pytest.raises(DataError, match="normal_099.tif"):
        Camelyon16(src, on_error="fail", **SMALL).prepare(tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / FOLDER).exists()
    only_098 = clone(raw, tmp_path / "raw098")
    (only_098 / "training" / "normal" / "normal_098.tif").symlink_to(src / "training" / "normal" / "normal_098.tif")
    with pytest.raises(DataError, match="normal_098.tif"):  # found while writing its patches
        Camelyon16(only_098, on_error="fail", train_patches=40, valid_patches=2, test_patches=3).prepare(
            tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / FOLDER).exists()
    assert not [p for p in (tmp_path / "fail").rglob("*.png") if "normal_098" in p.name]

    summary = Camelyon16(src, workers=2, **SMALL).prepare(tmp_path / "skip", progress=False)
    skipped = dict(summary.skipped)
    assert set(skipped) == {"training/normal/normal_099.tif", "training/normal/normal_098.tif",
                            "testing/images/test_009.tif"}
    assert "OpenSlide cannot open" in skipped["training/normal/normal_099.tif"]
    assert "OpenSlide cannot read" in skipped["training/normal/normal_098.tif"]
    text = (tmp_path / "skip" / FOLDER / "skipped.csv").read_text()
    assert "training/normal/normal_099.tif" in text and "testing/images/test_009.tif" in text
    rows = manifest(tmp_path / "skip" / FOLDER)
    assert {"normal_098", "normal_099", "test_009"}.isdisjoint(r["patient"] for r in rows)
    assert len(rows) == len({r["path"] for r in rows}) and summary.counts[("valid", "good")] == 2


def test_malformed_or_missing_annotation(raw: Path, tmp_path: Path):
    src = clone(raw, tmp_path / "raw")
    labels = read_reference(src / "testing" / "reference.csv")
    tumour = sorted(s for s, v in labels.items() if v == "Ungood")
    for sid in ("test_009", "test_010"):  # two more tumour slides: one bad XML, one without
        (src / "testing" / "images" / f"{sid}.tif").symlink_to(raw / "testing" / "images" / f"{tumour[0]}.tif")
    with (src / "testing" / "reference.csv").open("a") as fh:
        fh.write("test_009,Tumor,Macro\ntest_010,Tumor,Micro\n")
    (src / "testing" / "lesion_annotations" / "test_009.xml").write_text("<ASAP_Annotations><Annotations><Annot")

    with pytest.raises(DataError, match="test_009.xml"):
        Camelyon16(src, on_error="fail", **SMALL).prepare(tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / FOLDER).exists()

    summary = Camelyon16(src, **SMALL).prepare(tmp_path / "skip", progress=False)
    skipped = dict(summary.skipped)
    assert "well-formed" in skipped["testing/lesion_annotations/test_009.xml"]
    assert "no annotation XML" in skipped["testing/images/test_010.tif"]
    assert "test_009.xml" in (tmp_path / "skip" / FOLDER / "skipped.csv").read_text()


def test_missing_or_bad_reference_csv(raw: Path, tmp_path: Path):
    src = clone(raw, tmp_path / "raw")
    ref = src / "testing" / "reference.csv"
    good = ref.read_text()
    ref.unlink()
    for mode in ("skip", "fail"):
        with pytest.raises(DataError, match=r"testing/reference\.csv"):
            Camelyon16(src, on_error=mode, **SMALL).prepare(tmp_path / "o", progress=False)
    ref.write_text("slide,score\n" + good)
    with pytest.raises(DataError, match="unexpected columns"):
        Camelyon16(src, **SMALL).prepare(tmp_path / "o", progress=False)
    ref.write_text(good.replace("Normal", "Maybe", 1))
    with pytest.raises(DataError, match="neither Normal nor Tumor"):
        Camelyon16(src, **SMALL).prepare(tmp_path / "o", progress=False)
    ref.write_text("Image,Label,Type\n" + good.replace("test_", "Test_"))  # a header and capitals are accepted
    summary = Camelyon16(src, **SMALL).prepare(tmp_path / "o", progress=False)
    assert summary.counts[("test", "Ungood")] == 3
    assert not (tmp_path / "o" / FOLDER / "skipped.csv").exists()


def test_missing_folders_and_too_few_slides(raw: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        Camelyon16(tmp_path / "nowhere").prepare(tmp_path / "o", progress=False)
    src = clone(raw, tmp_path / "raw")
    shutil.rmtree(src / "training" / "normal")
    with pytest.raises(DataError, match="normal_NNN"):
        Camelyon16(src, **SMALL).prepare(tmp_path / "o", progress=False)
    src2 = clone(raw, tmp_path / "raw2")
    with pytest.raises(DataError, match="at least two of each"):
        Camelyon16(src2, exclude="test_001,test_002,test_003", **SMALL).prepare(tmp_path / "o", progress=False)
    with pytest.raises(UsageError):
        Camelyon16(src2, min_tissue=1.5)
    assert not (tmp_path / "o" / FOLDER).exists()


# ---------------------------------------------------------------------------
# the real slides (../shared/fixtures/real/wsi)
# ---------------------------------------------------------------------------
BACKGROUND_BOX = (0, 1200, 600, 1300)  # x, y, w, h at level 0: white glass left of the section
TISSUE_BOX = (1100, 1600, 400, 800)  # inside the tissue strip


def test_real_slides_open_and_tissue_is_found():
    svs = real_fixture("wsi", "pathml_small_HE.svs")
    gen = real_fixture("wsi", "cmu1_small_region_pyramid_generic.tif")
    masks = []
    for path, vendor, levels in ((svs, "aperio", 1), (gen, "generic-tiff", 4)):
        with wsi.open_slide(path) as s:
            assert wsi.slide_info(s) == {"vendor": vendor, "levels": levels, "dimensions": (2220, 2967)}
            thumb = wsi.saturation_thumbnail(s, 32, path=path)
            thr = wsi.tissue_threshold(thumb.sat)
            mask = thumb.sat >= thr
            for (x, y, w, h), lo, hi in ((BACKGROUND_BOX, 0.0, 0.02), (TISSUE_BOX, 0.75, 1.0)):
                rows = slice(int(y / thumb.px_y), int((y + h) / thumb.px_y))
                box = mask[rows, int(x / thumb.px_x): int((x + w) / thumb.px_x)]
                assert lo <= box.mean() <= hi, (path.name, (x, y, w, h), box.mean())
                assert lo <= wsi.tissue_fraction(wsi.read_rgb(s, x, y, w, h), thr) <= hi
            masks.append(mask)
    assert 0.15 < masks[0].mean() < 0.6
    assert (masks[0] == masks[1]).mean() > 0.95  # the same tissue in both formats


def test_real_slides_through_the_reorganizer(tmp_path: Path):
    svs = real_fixture("wsi", "pathml_small_HE.svs")
    gen = real_fixture("wsi", "cmu1_small_region_pyramid_generic.tif")
    raw = tmp_path / "CAMELYON16"
    links = {"training/normal/normal_001.tif": gen, "training/normal/normal_002.tif": svs,
             "testing/images/test_001.tif": gen, "testing/images/test_002.tif": svs,
             "testing/images/test_003.tif": svs, "testing/images/test_004.tif": gen}
    for rel, target in links.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).symlink_to(target)
    x, y, w, h = TISSUE_BOX
    tumour = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    hole = [(x + 150, y + 300), (x + 250, y + 300), (x + 250, y + 400), (x + 150, y + 400)]
    (raw / "testing" / "lesion_annotations").mkdir(parents=True)
    for sid in ("test_001", "test_002"):
        (raw / "testing" / "lesion_annotations" / f"{sid}.xml").write_text(
            wsi.asap_xml([("Tumor", tumour), ("Exclusion", hole)]))
    (raw / "testing" / "reference.csv").write_text(
        "test_001,Tumor,Macro\ntest_002,Tumor,Macro\ntest_003,Normal,\ntest_004,Normal,\n")

    summary = Camelyon16(raw, workers=2, train_patches=6, valid_patches=2, test_patches=2).prepare(
        tmp_path / "out", progress=False)
    assert summary.counts == {("train", "good"): 6, ("valid", "good"): 2, ("valid", "Ungood"): 2,
                              ("test", "good"): 2, ("test", "Ungood"): 2}
    folder = tmp_path / "out" / FOLDER
    rows = manifest(folder)
    assert {r["patient"] for r in rows if r["split"] == "train"} == {"normal_001", "normal_002"}
    for r in rows:
        px, py = coords(r)
        with Image.open(folder / r["path"]) as im:
            rgb = np.asarray(im)
        assert sat_fraction(rgb) >= 0.5, r["path"]  # real tissue, not glass
        if r["label"] == "Ungood":
            cx, cy = px + PATCH / 2, py + PATCH / 2
            assert winding_inside(cx, cy, tumour) and not winding_inside(cx, cy, hole)
        with openslide.OpenSlide(str(raw / r["source"])) as s:
            assert np.array_equal(rgb, np.asarray(s.read_region((px, py), 0, (PATCH, PATCH)))[..., :3])
