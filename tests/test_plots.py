"""Figures and the HTML report from real (toy) runs: efficiency bubbles, map grids, errors."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmad.data import list_split, read_image, read_mask
from bmad.leaderboard import build_tables
from bmad.plots import efficiency_figure, plot_maps
from bmad.records import load_records
from tests.conftest import TOY_PLUGIN, make_bench, run_bmad

EXTRA_ALGOS = '''
class Ident(Algorithm):
    """The image itself is its anomaly map: a grid shows the image again."""

    family = "toy"
    pixel_level = True
    channels = 1

    def fit(self, train, val=None):
        self.history.append({"epoch": 0})

    def predict_map(self, images):
        maps = images.mean(1)
        return Prediction(maps.flatten(1).max(1).values, maps)


class ImageOnly(Algorithm):
    """Image scores only, no maps."""

    family = "toy"
    pixel_level = False
    channels = 1

    def fit(self, train, val=None):
        self.history.append({"epoch": 0})

    def predict_map(self, images):
        return Prediction(images.flatten(1).mean(1), None)
'''

TOY, PLAIN = "folder-Toy", "folder-Plain"


def _plugin(root: Path) -> Path:
    (root / "bmad_plottest").mkdir(parents=True)
    (root / "bmad_plottest" / "__init__.py").write_text(textwrap.dedent(TOY_PLUGIN) + EXTRA_ALGOS)
    dist = root / "bmad_plottest-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bmad-plottest\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[bmad.algorithms]\ntoy = bmad_plottest:MeanDiff\nident = bmad_plottest:Ident\n"
        "imgonly = bmad_plottest:ImageOnly\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two benches (Toy: pixel masks; Plain: image labels only), runs of toy (two configs,
    the noisy one last), ident and imgonly over 2 seeds."""
    base = tmp_path_factory.mktemp("plots")
    plugin = _plugin(base / "plugin")
    toy = make_bench(base / "data" / "Toy", n_test=(4, 6))
    plain = make_bench(base / "data" / "Plain", n_test=(4, 6), seed=1)
    for d in plain.glob("*/Ungood/anomaly_mask"):
        shutil.rmtree(d)
    results = base / "results"
    common = ("--seeds", "2", "--results", str(results), "--no-progress")
    p = run_bmad("run", "--algo", "toy,ident,imgonly", "--bench", f"folder:{toy},folder:{plain}", *common,
                 plugin=plugin)
    assert p.returncode == 0, p.stderr
    p = run_bmad("run", "--algo", "toy", "--bench", f"folder:{toy}", "--param", "noise=0.05", *common, plugin=plugin)
    assert p.returncode == 0, p.stderr
    return {"results": results, "toy": toy, "plain": plain, "base": base}


def _points(fig):
    ax = fig.axes[0]
    return ax, next(c for c in ax.collections if c.get_gid() == "points")


@pytest.mark.parametrize("bench,metric,n_rows", [
    (TOY, "image_auroc", 4),  # toy (2 configs), ident, imgonly
    (TOY, "pixel_auroc", 3),  # imgonly has no pixel metric
    (PLAIN, "image_auroc", 3),
])
def test_efficiency_has_one_point_per_leaderboard_row(runs, bench, metric, n_rows):
    records = load_records(runs["results"]).records
    fig = efficiency_figure(records, bench, metric)
    ax, points = _points(fig)
    rows = [r for r in build_tables(records, [bench], [metric])[0].rows if r.cells[metric].n]
    assert len(rows) == n_rows
    xy = points.get_offsets()
    assert len(xy) == len(rows)  # rows and points both in (algo, config) order
    np.testing.assert_allclose(xy[:, 1], [100 * r.cells[metric].mean for r in rows])
    bars = ax.containers[0].lines[2][0].get_segments()  # error bars: the std over seeds
    np.testing.assert_allclose([s[1][1] - s[0][1] for s in bars], [200 * r.cells[metric].std for r in rows])
    labels = {tuple(np.round(t.xy, 9)): t.get_text() for t in ax.texts}
    assert [labels[tuple(np.round(p, 9))] for p in xy] == [r.label for r in rows]
    # x: mean inference ms/image; bubble area proportional to mean peak RSS (no GPU here)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r["bench"] == bench and r["status"] == "ok" and r["metrics"].get(metric) is not None:
            groups.setdefault((r["algo"], r["config_hash"]), []).append(r)
    recs = [groups[k] for k in sorted(groups)]
    np.testing.assert_allclose(xy[:, 0], [np.mean([r["timing"]["ms_per_image"] for r in g]) for g in recs])
    rss = np.array([np.mean([r["memory"]["peak_rss_mb"] for r in g]) for g in recs])
    ratio = points.get_sizes() / rss
    np.testing.assert_allclose(ratio, ratio[0])
    assert "RSS" in ax.get_title()


def test_plot_efficiency_writes_png_and_svg(runs, tmp_path):
    out = tmp_path / "figs"
    p = run_bmad("plot", "efficiency", "--results", str(runs["results"]), "--out", str(out))
    assert p.returncode == 0, p.stderr
    for bench in (TOY, PLAIN):
        png, svg = out / f"efficiency_{bench}.png", out / f"efficiency_{bench}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.width > 500 and im.height > 300
        assert ET.parse(svg).getroot().tag.endswith("svg")
    assert not list(out.glob(".*.tmp"))


def _grid(fig):
    """Axes as rows x columns, from their positions in the figure's grid."""
    specs = [(ax.get_subplotspec(), ax) for ax in fig.axes if ax.get_subplotspec() is not None]
    nrows, ncols = specs[0][0].get_gridspec().get_geometry()
    grid = [[None] * ncols for _ in range(nrows)]
    for spec, ax in specs:
        grid[spec.rowspan.start][spec.colspan.start] = ax
    return grid


def _artist(ax, gid):
    return next((im for im in ax.get_images() if im.get_gid() == gid), None)


def test_map_grid_rows_columns_and_alignment(runs):
    records = load_records(runs["results"]).records
    fig, notes = plot_maps(runs["results"], records, TOY, ["toy", "ident"], n=5, seed=0)
    grid = _grid(fig)
    assert len(grid) == 4 and len(grid[0]) == 5  # image, ground truth, toy, ident; 5 images
    noisy = next(r["config_hash"] for r in records if r["algo"] == "toy" and r["config"]["noise"])
    labels = [grid[r][0].get_ylabel().split("\n")[0] for r in range(4)]
    assert labels == ["image", "ground truth", f"toy [{noisy[:6]}]", "ident"]  # toy: the config run last
    assert any(f"toy has 2 configs on {TOY}: using the latest run, {noisy}" in n for n in notes)

    test = list_split(runs["toy"], "test")
    images = []
    for j in range(5):
        index = int(re.match(r"#(\d+) (anomalous|normal)", grid[0][j].get_title()).group(1))
        sample = test[index]
        assert grid[0][j].get_title().endswith("anomalous" if sample.label else "normal")
        img = read_image(sample.path)[0]
        np.testing.assert_allclose(_artist(grid[0][j], "image").get_array(), img)
        mask_im = _artist(grid[1][j], "mask")
        if sample.label:
            shown = ~np.ma.getmaskarray(mask_im.get_array())
            np.testing.assert_array_equal(shown, read_mask(sample.mask))
            assert img[shown].mean() > img[~shown].mean() + 0.2  # the mask sits on the bright disc
        else:
            assert mask_im is None
        images.append(img)
    # ident's map is the image: each column's map matches its own image best
    maps = [np.asarray(_artist(grid[3][j], "map").get_array()) for j in range(5)]
    for j, m in enumerate(maps):
        corr = [np.corrcoef(m.ravel(), im.ravel())[0, 1] for im in images]
        assert int(np.argmax(corr)) == j and corr[j] > 0.999
    stacked = np.stack(maps)
    assert stacked.min() == pytest.approx(0) and stacked.max() == pytest.approx(1)  # normalised over the row
    # the toy map is bright where the anomaly is
    for j in range(5):
        mask_im = _artist(grid[1][j], "mask")
        if mask_im is not None:
            m = np.asarray(_artist(grid[2][j], "map").get_array())
            shown = ~np.ma.getmaskarray(mask_im.get_array())
            assert m[shown].mean() > m[~shown].mean()


def test_map_grid_of_an_image_level_bench_has_no_mask_row(runs):
    records = load_records(runs["results"]).records
    fig, _ = plot_maps(runs["results"], records, PLAIN, ["ident"], n=20, seed=1)
    grid = _grid(fig)
    assert len(grid) == 2  # image, ident
    n_kept = len(np.load(next((runs["results"] / "runs" / PLAIN / "ident").rglob("seed1.maps.npz")))["index"])
    assert len(grid[0]) == n_kept == 8  # --n larger than the sample: every kept image
    titles = [ax.get_title() for ax in grid[0]]
    assert sum("anomalous" in t for t in titles) == 6 and sum(t.endswith("normal") for t in titles) == 2


def test_plot_maps_cli(runs, tmp_path):
    toy_dir = runs["results"] / "runs" / TOY / "toy"
    hashes = sorted(p.name for p in toy_dir.iterdir())
    out = tmp_path / "maps.png"
    p = run_bmad("plot", "maps", "--bench", f"folder:{runs['toy']}", "--algo", "toy,ident", "--n", "4",
                 "--results", str(runs["results"]), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "toy has 2 configs" in p.stderr and "--config" in p.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400
    p = run_bmad("plot", "maps", "--bench", TOY, "--algo", "toy", "--config", hashes[0][:6], "--results",
                 str(runs["results"]), "--out", str(tmp_path / "maps.svg"))
    assert p.returncode == 0, p.stderr
    assert "configs" not in p.stderr
    assert ET.parse(tmp_path / "maps.svg").getroot().tag.endswith("svg")


def _edit_records(results: Path, algo: str, fn) -> None:
    """Apply ``fn`` to the records of ``algo`` (a glob) under ``results``."""
    for f in (results / "runs").rglob(f"{algo}/*/seed*.json"):
        rec = json.loads(f.read_text())
        fn(rec)
        f.write_text(json.dumps(rec))


def _old(rec: dict) -> None:
    rec.pop("map_sample", None)
    rec.pop("per_image", None)


def _moved(rec: dict) -> None:
    rec["run"]["bench"] = "folder:/nonexistent/Toy"


@pytest.mark.parametrize("args,edit,expect", [
    (["--bench", "nope", "--algo", "toy"], None, ["no run records for bench 'nope'", TOY]),
    (["--bench", TOY, "--algo", "toy,nope"], None, ["no ok run of algorithm 'nope'", "ident, imgonly, toy"]),
    (["--bench", TOY, "--algo", "imgonly"], None, ["imgonly is an image-level algorithm", "pixel-level"]),
    (["--bench", PLAIN, "--algo", "imgonly"], None, ["kept no anomaly maps", "--save-maps"]),
    (["--bench", TOY, "--algo", "ident"], ("ident", _old), ["predates stored map samples", "rerun", "--results"]),
    (["--bench", TOY, "--algo", "ident"], ("*", _moved), ["no bench folder found", "--data-root", "Toy/"]),
    (["--bench", TOY, "--algo", "ident", "--seed", "7"], None, ["no ok run with seed 7", "0, 1"]),
    (["--bench", TOY, "--algo", "ident", "--config", "zzz"], None, ["--config zzz"]),
    (["--bench", TOY, "--algo", "ident", "--n", "0"], None, ["--n must be at least 1"]),
])
def test_plot_maps_errors(runs, tmp_path, args, edit, expect):
    results = runs["results"]
    if edit:
        results = tmp_path / "results"
        shutil.copytree(runs["results"], results)
        _edit_records(results, *edit)
    p = run_bmad("plot", "maps", *args, "--results", str(results), "--out", str(tmp_path / "m.png"))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    for text in expect:
        assert text in p.stderr
    assert not (tmp_path / "m.png").exists()


def test_moved_bench_is_found_through_data_root(runs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(runs["results"], results)
    _edit_records(results, "*", _moved)
    p = run_bmad("plot", "maps", "--bench", TOY, "--algo", "ident", "--results", str(results),
                 "--data-root", str(runs["toy"].parent), "--out", str(tmp_path / "m.png"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.png").stat().st_size > 0


class _Page(HTMLParser):
    """Counts per bench section: leaderboard tables and their rows, inline SVGs, images."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, int]] = {}
        self.urls: list[str] = []
        self.current: str | None = None
        self.in_table = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "section" and "bench" in (a.get("class") or ""):
            self.current = a["data-bench"]
            self.sections[self.current] = {"tables": 0, "rows": 0, "svg": 0, "img": 0}
        elif self.current and tag == "table" and "leaderboard" in (a.get("class") or ""):
            self.sections[self.current]["tables"] += 1
            self.in_table = True
        elif self.current and tag == "tr" and self.in_table:
            self.sections[self.current]["rows"] += 1
        elif self.current and tag in ("svg", "img"):
            self.sections[self.current][tag] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False


def test_report_is_self_contained_with_a_table_per_bench(runs, tmp_path):
    out = tmp_path / "site" / "report.html"
    p = run_bmad("report", "--results", str(runs["results"]), "--out", str(out))
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "@import" not in text and not re.search(r"url\((?!#)", text)  # only in-page references
    page = _Page()
    page.feed(text)
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls)
    assert set(page.sections) == {TOY, PLAIN}
    records = load_records(runs["results"]).records
    for bench, s in page.sections.items():
        assert s["tables"] == 2  # the leaderboard, and significance + efficiency
        assert s["rows"] == 2 * (1 + len(build_tables(records, [bench])[0].rows))  # per table: header + configs
        assert s["svg"] == 1 and s["img"] == 1  # efficiency plot, map grid (toy and ident kept maps)
    assert not list(out.parent.glob(".*.tmp"))


def test_report_notes_what_it_cannot_draw(runs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(runs["results"], results)
    for algo in ("toy", "ident"):
        _edit_records(results, algo, _old)
    out = tmp_path / "report.html"
    p = run_bmad("report", "--results", str(results), "--bench", TOY, "--out", str(out))
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "no run on this bench kept map samples" in text and "no run on this bench" in p.stderr
    assert text.count('class="bench"') == 1 and "<img" not in text


def test_report_includes_significance_efficiency_and_published_tables(runs):
    from bmad import report

    records = load_records(runs["results"]).records
    page = report.build_report(runs["results"], records, [TOY, PLAIN]).html
    assert page.count("<h3>Significance against the best, and efficiency</h3>") == 2  # one per bench
    assert "ms/image" in page
    assert "<h3>Published numbers</h3>" not in page  # no paper has these generated benches
    brats = [dict(r, bench="brats2021", algo="padim") for r in records if r["bench"] == TOY and r["algo"] == "toy"]
    page = report.build_report(runs["results"], brats, ["brats2021"]).html
    assert "<h3>Published numbers</h3>" in page and "bmad-paper" in page
