"""`bmad leaderboard --compare`: the reference file (checked against the papers' text), the
matching of our rows to published ones, the arithmetic, every format, the CLI; and
`--efficiency`."""

from __future__ import annotations

import csv
import inspect
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bmad.benches import BENCHES
from bmad.compare import (
    add_comparison,
    default_reference_file,
    load_references,
    parse_sources,
    same_value,
)
from bmad.errors import DataError, UsageError
from bmad.leaderboard import add_efficiency, build_tables, render
from bmad.records import load_records, record_path, write_record
from tests.conftest import SHARED, run_bmad

PAPERS = SHARED / "papers"
REFS = load_references()


def _rec(algo: str, seed: int, bench: str = "brats2021", config: dict | None = None, shots: int | None = None,
         chash: str | None = None, **metrics: float) -> dict[str, Any]:
    m = {"image_auroc": None, "image_ap": None, "pixel_auroc": None, "aupro": None, "dice": None, "best_dice": None}
    m.update(metrics)
    return {"bench": bench, "algo": algo, "seed": seed, "shots": shots, "config": config or {},
            "config_hash": chash or f"h{algo}", "status": "ok", "metrics": m, "sweep": {"seeds": 2},
            "timing": {"fit_s": 5.0, "predict_s": 1.0, "ms_per_image": 10.0 + seed},
            "memory": {"peak_rss_mb": 1000.0 + 100 * seed, "peak_gpu_mb": None},
            "params": {"total": 2_500_000, "trainable": 500_000}}


def _write(results: Path, recs: list[dict[str, Any]]) -> Path:
    for r in recs:
        write_record(record_path(results, r["bench"], r["algo"], r["config_hash"], r["seed"]), r)
    return results


def _tables(recs: list[dict[str, Any]], tmp_path: Path, metrics: list[str] | None = None):
    return build_tables(load_records(_write(tmp_path / "res", recs)).records, metrics=metrics)


def _rows(t) -> dict[str, int]:
    return {r.label: i for i, r in enumerate(t.rows)}


def _col(t, title: str, metric: str | None, nth: int = 0):
    cols = [c for c in t.columns if c.title == title and c.after == metric]
    return cols[nth]


# -- the reference file ---------------------------------------------------------------------------


def test_reference_file_integrity() -> None:
    from bmad import registry

    algos = set(registry.algorithms.names())
    assert REFS.entries and set(REFS.sources) == {"bmad-paper", "lerec-thesis", "clap"}
    seen = set()
    for e in REFS.entries:
        assert e.bench in BENCHES, e
        assert 0 < e.value <= 100 and (e.std is None or 0 <= e.std < 50), e
        if e.algo is None:  # a paper-only method, named as such in its source's notes
            assert any(e.method in note and "paper-only" in note for note in REFS.sources[e.source]["notes"]), e
        else:
            assert e.algo in algos, e
            params = inspect.signature(registry.algorithms.get(e.algo).cls.__init__).parameters
            assert set(e.config or {}) <= set(params), e  # a variant's config names real parameters
        key = (e.source, e.table, e.bench, e.method, e.metric)
        assert key not in seen, f"duplicate entry {key}"
        seen.add(key)
    # the fifteen baselines of BMAD on the six benches
    fifteen = {e.algo for e in REFS.entries if e.source == "bmad-paper"}
    assert len(fifteen) == 15 and {e.bench for e in REFS.entries if e.source == "bmad-paper"} == \
        {"brats2021", "liver", "resc", "oct2017", "rsna", "camelyon16"}


def test_identical_numbers_are_flagged() -> None:
    """Where a printed (mean, std) pair repeats, at most one occurrence is left unflagged:
    the others are the copy errors of the tables (e.g. Table 3.9's MKD and RD4AD rows)."""
    groups = defaultdict(list)
    for e in REFS.entries:
        if e.std is not None:
            groups[(e.value, e.std)].append(e)
    repeated = {k: v for k, v in groups.items() if len(v) > 1}
    assert (87.77, 0.87) in repeated
    for entries in repeated.values():
        assert sum(e.flag is None for e in entries) <= 1, entries
    mkd = [e for e in REFS.entries if e.table == "3.9" and e.method in ("MKD", "RD4AD")]
    assert len(mkd) == 6 and all(e.flag == "copy_error" and "identical" in e.note for e in mkd)


def _shared_or_skip() -> None:
    if not PAPERS.is_dir():
        pytest.skip(f"{PAPERS} is absent (the papers ship beside the repo in CI, not in a user's clone): "
                    "the reference numbers cannot be re-checked against their source")


BENCH_NAMES = {"BTCV + LiTs": "liver", "BraTS2021": "brats2021", "RESC": "resc", "OCT207": "oct2017",
               "OCT2017": "oct2017", "RSNA": "rsna", "Camelyon16": "camelyon16"}
METRIC_NAMES = {"Image AUROC": "image_auroc", "Pixel AUROC": "pixel_auroc", "Pixel Pro": "aupro"}


def _thesis_tables(text: str) -> dict[str, dict[tuple[str, str, str], tuple[float, float]]]:
    """Every results table of the thesis: number -> (method, bench, metric) -> (mean, std)."""
    lines = text.splitlines()
    tables, i = {}, 0
    while i < len(lines):
        if not lines[i].startswith(("Methods\t", "Benchmarks\t")):
            i += 1
            continue
        head = [c.strip() for c in lines[i].split("\t")[1:]]
        metrics = None
        i += 1
        if lines[i].startswith("\t"):
            metrics = [c.strip() for c in lines[i].split("\t")[1:]]
            i += 1
        cells = {}
        while lines[i].strip():
            name, *values = lines[i].split("\t")
            name = re.sub(r"\s*\[\d+\]$", "", name).strip()
            for j, v in enumerate(values):
                v = re.sub(r"</?u>", "", v).strip()
                if v in ("", "NA"):
                    continue
                mean, std = (float(x) for x in v.split(" ± "))
                if metrics is None:
                    bench, metric = BENCH_NAMES[head[j]], "dice"
                elif len([h for h in head if h]) == 1:
                    bench, metric = BENCH_NAMES[head[0]], METRIC_NAMES[metrics[j]]
                else:
                    bench, metric = BENCH_NAMES[head[j]], METRIC_NAMES[metrics[j]]
                cells[(name, bench, metric)] = (mean, std)
            i += 1
        caption = next(line for line in lines[i:i + 4] if line.startswith("Table "))
        tables[caption.split()[1].rstrip(":")] = cells
    return tables


def test_every_thesis_number_matches_the_source_text() -> None:
    _shared_or_skip()
    parsed = _thesis_tables((PAPERS / "bmad_thesis_2024.md").read_text(encoding="utf-8"))
    for source, numbers in (("bmad-paper", ("3.7", "3.8", "3.9", "3.10", "3.11")),
                            ("lerec-thesis", ("4.1", "4.2", "4.3", "4.4"))):
        for table in numbers:
            ours = {(e.method, e.bench, e.metric): (e.value, e.std) for e in REFS.entries
                    if e.source == source and e.table == table}
            assert ours == parsed[table], f"{source} Table {table} differs from the thesis text"
    assert len(parsed["3.8"]) == 15 + 10 * 2  # 15 image AUROCs, 10 pixel-level methods x 2


def test_clap_numbers_match_the_source_text() -> None:
    _shared_or_skip()
    lines = (PAPERS / "clap_2024.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Dataset\tBraTS2021"))
    columns = ["brats2021", "liver", "resc", "oct2017", "rsna", "camelyon16"]
    rows = {}
    for line in lines[start + 1:start + 4]:
        name, *values = line.split("\t")
        rows[name.replace(" [2]", "")] = [float(v) for v in values if v.strip()]
    ours = {(e.method, e.bench): e.value for e in REFS.entries if e.source == "clap"}
    assert ours == {(m, b): v[k] for m, v in rows.items() for k, b in enumerate(columns)}
    # the flagged inconsistency is real: EAR's printed Average is not the mean of its six values
    assert rows["EAR"][6] == 78.21 and abs(np.mean(rows["EAR"][:6]) - 78.14) < 0.005
    for method in ("PLP", "CLAP (ours)"):  # the other two rows' Averages agree (to the printed rounding)
        assert abs(np.mean(rows[method][:6]) - rows[method][6]) <= 0.006


def test_bad_reference_files_are_rejected_with_the_entry(tmp_path: Path) -> None:
    doc = json.loads(default_reference_file().read_text(encoding="utf-8"))
    doc["entries"][5]["value"] = 120
    bad = tmp_path / "refs.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"entry 5 .*value 120 is not a percentage"):
        load_references(bad)
    doc["entries"][5].update(value=50, metric="auc")
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="metric 'auc'"):
        load_references(bad)
    bad.write_text("{")
    with pytest.raises(DataError, match="cannot read the reference file"):
        load_references(bad)
    with pytest.raises(UsageError, match="unknown source nope"):
        parse_sources("bmad-paper,nope", REFS)
    assert parse_sources("all", REFS) == list(REFS.sources)


def test_schema_takes_any_bench_key(tmp_path: Path) -> None:
    """Issue 9 adds papers on benches bmad does not have yet: the loader takes any bench key."""
    doc = {"schema": 1, "sources": {"ppad": {"title": "PPAD", "shots": 64}},
           "entries": [{"source": "ppad", "table": "1", "bench": "zhanglab", "method": "PPAD", "algo": "ppad",
                        "metric": "image_auroc", "value": 96.7, "std": 0.4}]}
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(doc))
    (e,) = load_references(path).entries
    assert (e.bench, e.shots, e.value) == ("zhanglab", 64, 96.7)


# -- matching and arithmetic -------------------------------------------------------------------------


def test_same_value_rules() -> None:
    assert same_value([224, 224], 224) and same_value(("layer2", "layer3"), ["layer2", "layer3"])
    assert not same_value([224, 256], 224) and not same_value(False, True)
    assert same_value("brats2021", {"one_of": ["brain", "brats2021"]})
    assert not same_value("generic", {"one_of": ["brain", "brats2021"]})


def test_difference_and_published_columns(tmp_path: Path) -> None:
    recs = [_rec("patchcore", s, image_auroc=v, pixel_auroc=0.95) for s, v in enumerate((0.90, 0.92))]
    recs += [_rec("rd4ad", s, bench="resc", image_auroc=0.88) for s in range(2)]
    tables = _tables(recs, tmp_path)
    legend = add_comparison(tables, REFS, ["bmad-paper"])
    brats, resc = tables
    pub, delta = _col(brats, "published", "image_auroc"), _col(brats, "Δ", "image_auroc")
    assert pub.text == {0: "91.65 ± 0.36"} and delta.text == {0: f"{91.0 - 91.65:+.2f}"}
    assert delta.csv["bmad-paper:diff_pts"][0] == pytest.approx(91.0 - 91.65)
    assert _col(brats, "Δ", "pixel_auroc").text == {0: f"{95.0 - 96.97:+.2f}"}
    assert not brats.label_marks  # the paper's own configuration: nothing to flag
    # RESC's RD4AD row is one of the copy errors: its number is kept, with a mark and a note
    assert _col(resc, "published", "image_auroc").text == {0: "87.77 ± 0.87*"}
    assert any(n.startswith("* bmad-paper Table 3.9, RD4AD (I-AUROC)") and "identical" in n for n in resc.notes)
    assert "published on resc but not run here" in " ".join(resc.notes)
    assert any(line.startswith("bmad-paper: BMAD") for line in legend) and any("Δ = ours − published" in x
                                                                               for x in legend)


def test_named_configs_and_overrides_are_flagged(tmp_path: Path) -> None:
    base = {"backbone": "wide_resnet50_2", "input_size": [224, 224], "layers": ["layer2", "layer3"],
            "pretrained": True, "weights": "/w/wrn50.safetensors"}
    recs = [_rec("patchcore_r18", s, config={**base, "backbone": "resnet18"}, image_auroc=0.8) for s in range(2)]
    recs += [_rec("patchcore", s, config=base, chash="hpaper", image_auroc=0.9) for s in range(2)]
    recs += [_rec("patchcore", s, config={**base, "pretrained": False}, chash="hrand", image_auroc=0.7)
             for s in range(2)]
    recs += [_rec("padim", s, config={"input_size": 224}, shots=16, image_auroc=0.7) for s in range(2)]
    (t,) = _tables(recs, tmp_path)
    add_comparison([t], REFS, ["bmad-paper"])
    rows = _rows(t)
    r18, paper, rand = rows["patchcore_r18"], rows["patchcore [hpaper]"], rows["patchcore [hrand]"]
    assert _col(t, "published", "image_auroc").text[r18] == "91.65 ± 0.36"  # compared with the base algorithm
    assert t.label_marks == {r18: " ‡", rand: " ‡", rows["padim (16-shot)"]: " ‡"} and paper not in t.label_marks
    notes = "\n".join(t.notes)
    assert "‡ patchcore_r18: compared with bmad-paper's PatchCore (patchcore); different configuration: " \
           "backbone resnet18 (paper: wide_resnet50_2)" in notes
    assert "pretrained false (paper: true)" in notes
    assert "trained on 16-shot (paper: the full training set)" in notes
    assert "weights" not in notes  # the same weights from a file are not a different configuration


def test_variants_and_aliases(tmp_path: Path) -> None:
    recs = [_rec("lerec", s, config={"pyramid_levels": 0}, image_auroc=0.9) for s in range(2)]
    recs += [_rec("clap", s, config={"anatomy": "brats2021"}, chash="hok", image_auroc=0.8) for s in range(2)]
    recs += [_rec("clap", s, config={"anatomy": "generic"}, chash="hgen", image_auroc=0.7) for s in range(2)]
    (t,) = _tables(recs, tmp_path)
    add_comparison([t], REFS, ["lerec-thesis", "clap"], missing=True)
    rows = _rows(t)
    assert _col(t, "lerec-thesis", "image_auroc").text[rows["lerec"]] == "91.12 ± 0.84"  # "ViT based without DA"
    assert "lerec: compared with lerec-thesis's Ours(ViT based without DA), the paper's variant " \
           "'ViT based without DA' (pyramid_levels=0)" in t.notes
    clap = _col(t, "clap", "image_auroc")
    assert clap.text[rows["clap [hok]"]] == clap.text[rows["clap [hgen]"]] == "78.55"
    assert t.label_marks == {rows["clap [hgen]"]: " ‡"}
    assert any("anatomy generic (paper: brain)" in n for n in t.notes)
    # the default lerec and the paper-only methods come as rows of their own
    default = rows["Ours(ViT based with DA) (paper only, lerec-thesis)"]
    assert t.rows[default].paper_only and _col(t, "lerec-thesis", "image_auroc").text[default] == "92.74 ± 0.84"
    assert "EAR (paper only, clap)" in rows and "CLIP (paper only, lerec-thesis)" in rows
    assert [c.title for c in t.columns if c.after == "image_auroc"] == ["lerec-thesis", "Δ", "clap", "Δ"]


def test_no_reference_for_the_bench(tmp_path: Path) -> None:
    (t,) = _tables([_rec("patchcore", 0, bench="demo", image_auroc=0.9)], tmp_path)
    assert add_comparison([t], REFS, ["bmad-paper"]) == []
    assert t.notes == ["no published numbers for bench 'demo' in bmad-paper"] and not t.columns


@pytest.fixture
def compared(tmp_path: Path):
    recs = [_rec("patchcore_r18", s, config={"backbone": "resnet18"}, image_auroc=0.8 + 0.02 * s) for s in range(2)]
    tables = _tables(recs, tmp_path)
    legend = add_comparison(tables, REFS, ["bmad-paper"], missing=True)
    return tables, legend


def test_formats_show_the_comparison(compared) -> None:
    tables, legend = compared
    md = render(tables, "md", legend)
    assert "| algorithm | n | I-AUROC | published | Δ |" in md
    assert "| patchcore_r18 ‡ | 2/2 | **81.00 ± 1.41** | 91.65 ± 0.36 | -10.65 |" in md
    assert "| CS-Flow (paper only) | – | – | 90.91 ± 0.83 | – |" in md
    latex = render(tables, "latex", legend)
    assert "patchcore\\_r18 $^\\ddagger$ & 2/2 & \\textbf{81.00 $\\pm$ 1.41} & 91.65 $\\pm$ 0.36 & -10.65 \\\\" in latex
    assert "$\\Delta$" in latex and "\\footnotesize" in latex
    html = render(tables, "html", legend)
    assert "<td>patchcore_r18 ‡</td><td>2/2</td><td><b>81.00 ± 1.41</b></td><td>91.65 ± 0.36</td><td>-10.65</td>" \
        in html and "<th>Δ</th>" in html
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv", legend))))
    ours = next(r for r in rows if r["algorithm"] == "patchcore_r18")
    assert float(ours["bmad-paper:mean_pct"]) == 91.65 and float(ours["bmad-paper:std_pct"]) == 0.36
    assert float(ours["bmad-paper:diff_pts"]) == pytest.approx(-10.65)
    assert ours["bmad-paper:differences"] == "backbone resnet18 (paper: wide_resnet50_2)"
    only = next(r for r in rows if r["algorithm"] == "CS-Flow (paper only)")
    assert only["seeds"] == "0" and only["mean"] == "" and float(only["bmad-paper:mean_pct"]) == 90.91


# -- efficiency -------------------------------------------------------------------------------------


def test_efficiency_columns(tmp_path: Path) -> None:
    recs = [_rec("patchcore", s, image_auroc=0.9) for s in range(2)]
    tables = _tables(recs, tmp_path)
    legend = add_efficiency(tables)
    t = tables[0]
    assert [c.title for c in t.columns] == ["ms/image", "peak RSS MB", "params (M)", "trainable (M)"]
    assert [c.text[0] for c in t.columns] == ["10.5", "1050", "2.50", "0.50"]  # means over the 2 seeds
    assert "RSS" in legend[0]
    md = render(tables, "md", legend)
    assert "| patchcore | 2/2 | **90.00 ± 0.00** | 10.5 | 1050 | 2.50 | 0.50 |" in md
    assert "peak RSS MB" in render(tables, "latex") and "<th>params (M)</th>" in render(tables, "html")
    row = next(csv.DictReader(io.StringIO(render(tables, "csv"))))
    assert float(row["ms_per_image"]) == 10.5 and float(row["peak_rss_mb"]) == 1050
    assert row["peak_gpu_mb"] == "" and float(row["params_total"]) == 2.5e6
    # GPU memory when every run recorded it
    for r in recs:
        r["memory"]["peak_gpu_mb"] = 300.0 + r["seed"]
    gpu = _tables(recs, tmp_path / "gpu")
    add_efficiency(gpu)
    assert [(c.title, c.text[0]) for c in gpu[0].columns][1] == ("peak GPU MB", "300")


def test_efficiency_of_old_records_without_timing(tmp_path: Path) -> None:
    rec = _rec("patchcore", 0, image_auroc=0.9)
    for key in ("timing", "memory", "params"):
        del rec[key]
    tables = _tables([rec], tmp_path)
    add_efficiency(tables)
    assert "| patchcore | 1/2 † | **90.00 ± 0.00** | – | – | – | – |" in render(tables, "md")


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_compare_and_efficiency(tmp_path: Path) -> None:
    res = _write(tmp_path / "res", [_rec("patchcore_r18", s, config={"backbone": "resnet18"}, image_auroc=0.9)
                                    for s in range(2)])
    out = run_bmad("leaderboard", "--results", str(res), "--compare", "all", "--efficiency", "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = {r["algorithm"]: r for r in csv.DictReader(io.StringIO(out.stdout))}
    ours = rows["patchcore_r18"]
    assert float(ours["bmad-paper:diff_pts"]) == pytest.approx(-1.65) and float(ours["ms_per_image"]) == 10.5
    assert ours["bmad-paper:differences"] == "backbone resnet18 (paper: wide_resnet50_2)"
    assert "lerec-thesis:mean_pct" not in ours  # no lerec-thesis entry matched a row here
    # CSV has no room for the notes under the tables: they go to stderr
    assert "bmad: note: brats2021: published on brats2021 but not run here: CFA, CFLOW" in out.stderr
    for args, message in ((("--compare", "thesis"), "unknown source thesis"),
                          (("--compare-missing",), "--compare-missing needs --compare")):
        out = run_bmad("leaderboard", "--results", str(res), *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 1, "sources": {}, "entries": [{"source": "x"}]}')
    out = run_bmad("leaderboard", "--results", str(res), "--compare", "all", "--references", str(bad))
    assert out.returncode == 2 and "entry 0" in out.stderr
