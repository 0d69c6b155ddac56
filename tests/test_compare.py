"""`bmad leaderboard --compare`: the reference file (checked against the papers' text), the
matching of our rows to published ones, the arithmetic, every format, the CLI; and
`--efficiency`."""

from __future__ import annotations

import csv
import inspect
import io
import itertools
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
    shots_gap,
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
    assert REFS.entries and set(REFS.sources) == {"bmad-paper", "lerec-thesis", "clap", "ppad", "mediclip"}
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
        key = (e.source, e.table, e.bench, e.method, e.metric, e.shots)
        assert key not in seen, f"duplicate entry {key}"
        seen.add(key)
    # the fifteen baselines of BMAD on the six benches
    fifteen = {e.algo for e in REFS.entries if e.source == "bmad-paper"}
    assert len(fifteen) == 15 and {e.bench for e in REFS.entries if e.source == "bmad-paper"} == \
        {"brats2021", "liver", "resc", "oct2017", "rsna", "camelyon16"}
    # the CLIP papers' own benches and training sets (issue 9)
    ppad = [e for e in REFS.entries if e.source == "ppad"]
    assert {e.bench for e in ppad} == {"zhanglab", "chexpert", "vindr"} and {e.shots for e in ppad} == {None, 0, 64}
    mediclip = [e for e in REFS.entries if e.source == "mediclip"]
    assert {e.bench for e in mediclip} == {"chexpert", "brainmri", "busi"}
    assert {e.shots for e in mediclip} == {4, 8, 16, 32}


def test_identical_numbers_are_flagged() -> None:
    """Where a (mean, std) pair printed to two decimals repeats, at most one occurrence is left
    unflagged: the others are the copy errors of the thesis' tables (e.g. Table 3.9's MKD and RD4AD
    rows). PPAD and MediCLIP print one decimal, where equal pairs occur by chance: their tables
    are checked for copied lines instead (test_*_numbers_match_the_source_text)."""
    groups = defaultdict(list)
    for e in REFS.entries:
        if e.std is not None and e.source in ("bmad-paper", "lerec-thesis"):
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


def _cell(text: str) -> tuple[float, float | None] | None:
    r"""A printed cell -> (mean, std); None for an empty or '-' cell. The PDF text writes ± as
    ``\pm``, ``{\pm}``, ``\!\pm\!`` or, in a few cells, ``+``."""
    text = re.sub(r"\\!|[${}\s]", "", text)
    if not text or "overline" in text:
        return None
    mean, *std = re.split(r"\\pm|\+|±", text)
    return float(mean), float(std[0]) if std else None


def _copied_lines(lines: dict[Any, dict[Any, Any]]) -> list[tuple[Any, Any]]:
    """Pairs of printed lines (a row, or a column read as a line) that agree in two or more places."""
    return [(a, b) for a, b in itertools.combinations(lines, 2)
            if sum(v is not None and lines[b].get(k) == v for k, v in lines[a].items()) > 1]


PPAD_BENCHES = {"ZhangLab": "zhanglab", "CheX$ pert": "chexpert"}


def _ppad_table1(text: str) -> tuple[dict[tuple[str, str, str], tuple[float, float | None]], dict[str, bool]]:
    """PPAD's Table 1: (method, bench, ACC|AUC|F1) -> (mean, std), and method -> marked * (reproduced
    by PPAD's authors). Names lose their citation and the *; the text's "X plainer" is Xplainer."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("Method\tZhangLab"))
    benches = [PPAD_BENCHES[b] for b in re.findall("|".join(map(re.escape, PPAD_BENCHES)), lines[i])]
    metrics = re.findall(r"ACC|AUC|F1", lines[i + 1])
    assert benches == ["zhanglab", "chexpert"] and metrics == ["ACC", "AUC", "F1"] * 2, lines[i:i + 2]
    cells, reproduced = {}, {}
    for line in lines[i + 2:]:
        if not line.strip():
            break
        raw, *values = line.split("\t")
        name = " ".join(re.sub(r"<sup>\*</sup>|\^\{\*\}|\*|\$|\[\d+\]", "", raw).split()).replace("X plainer",
                                                                                                  "Xplainer")
        reproduced[name] = "*" in raw
        for j, v in enumerate(values):
            if (cell := _cell(v)) is not None:
                cells[(name, benches[j // 3], metrics[j])] = cell
    return cells, reproduced


def test_ppad_numbers_match_the_source_text() -> None:
    _shared_or_skip()
    text = (PAPERS / "ppad_miccai2024.md").read_text(encoding="utf-8")
    cells, reproduced = _ppad_table1(text)
    assert len(reproduced) == 12 and len(cells) == 12 * 6 - 6  # SALAD and IF 2D have no CheXpert numbers
    ppad = [e for e in REFS.entries if e.source == "ppad" and e.table == "1"]
    assert {(e.method, e.bench): (e.value, e.std) for e in ppad} == \
        {(m, b): v for (m, b, metric), v in cells.items() if metric == "AUC"}
    assert {e.metric for e in ppad} == {"image_auroc"}
    # the training sets follow the paper's marks: top group full-set, * with a std 64-shot, * without one zero-shot
    for e in ppad:
        expected = (0 if e.std is None else 64) if reproduced[e.method] or e.method == "PPAD (Ours)" else None
        assert e.shots == expected, e
    # the table is read right: the prose's differences (PPAD minus another method, ACC / AUC / F1) agree
    prose = re.sub(r"\s+([,.])", r"\1", " ".join(re.sub(r"[$\\]", "", text).split()))
    claims = {("zhanglab", "SQUID"): "by 9.1%, 9.1%, 7.1% in ACC, AUC, and F1",
              ("zhanglab", "CheXzero"): "achieves 6.4%, 4.0%, 4.3% and",
              ("zhanglab", "Xplainer"): "and 11.2%, 6.8%, 6.8% in ACC, AUC, and F1 improvement",
              ("zhanglab", "CoOp"): "improvements of 4.8%, 2.1%, 3.2% and",
              ("zhanglab", "MaPLe"): "and of 3.3%, 1.6%, 2.3% in ACC",
              ("chexpert", "SQUID"): "surpass SQUID by 10.8%, 10.4%, and 6.1% in ACC, AUC, F1",
              ("chexpert", "CheXzero"): "outperform CheXzero by 5.3%, 0.8%, and 2.3%"}
    for (bench, other), claim in claims.items():
        assert claim in prose, claim
        said = [float(x) for x in re.findall(r"(\d+\.\d)%", claim)]
        diffs = [cells[("PPAD (Ours)", bench, m)][0] - cells[(other, bench, m)][0] for m in ("ACC", "AUC", "F1")]
        assert diffs == pytest.approx(said, abs=0.051), (bench, other)
    # no printed line is a copy of another (one-decimal numbers repeat by chance, whole lines do not)
    rows: dict[Any, dict[Any, Any]] = defaultdict(dict)
    for (m, b, metric), v in cells.items():
        rows[m][(b, metric)] = v
    assert _copied_lines(rows) == []


def test_ppad_table2_numbers_match_the_notes_and_the_prose() -> None:
    """PPAD's Table 2 (VinDr-CXR) lost its body in the paper text: PPAD's own AUC / AP are the
    ones bmad's method notes give, DDAD's and CheXzero's follow from the differences the prose
    states; every entry says so in its note (shown as ``*`` beside the number)."""
    _shared_or_skip()
    table2 = {(e.method, e.metric): e for e in REFS.entries if e.source == "ppad" and e.table == "2"}
    assert {e.bench for e in table2.values()} == {"vindr"} and all(e.note and e.std is None for e in table2.values())
    notes = " ".join((SHARED / "METHODS_CLIP.md").read_text(encoding="utf-8").split())
    auc, ap = (float(x) for x in re.search(r"VinDr AUC/AP (\d+\.\d)/(\d+\.\d)", notes).groups())
    assert (table2[("PPAD (Ours)", "image_auroc")].value, table2[("PPAD (Ours)", "image_ap")].value) == (auc, ap)
    text = (PAPERS / "ppad_miccai2024.md").read_text(encoding="utf-8")
    assert "Table 2. Benchmark results on VinDr-CXR" in text  # the caption is there, its body is not
    prose = " ".join(re.sub(r"\[\\\[\d+\\\]\]\(#page-[\d-]+\)", "", text).split())
    m = re.search(r"PPAD outperforms DDAD and CheXzero by (\d+\.\d)%, (\d+\.\d)% and (\d+\.\d)%, (\d+\.\d)% "
                  r"in AUC, AP", prose)
    assert m, "the prose's differences are not where they were"
    ddad_auc, ddad_ap, chexzero_auc, chexzero_ap = (float(x) for x in m.groups())
    for method, d_auc, d_ap, shots in (("DDAD", ddad_auc, ddad_ap, None), ("CheXzero", chexzero_auc, chexzero_ap, 0)):
        assert table2[(method, "image_auroc")].value == pytest.approx(auc - d_auc, abs=1e-9)
        assert table2[(method, "image_ap")].value == pytest.approx(ap - d_ap, abs=1e-9)
        assert table2[(method, "image_auroc")].shots == shots and "derived" in table2[(method, "image_ap")].note
    assert table2[("PPAD (Ours)", "image_auroc")].shots == 64


def _md_tables(text: str) -> dict[str, list[list[str]]]:
    """Every pipe table after a "Table N." caption: number -> its lines of cells (header first)."""
    lines, tables, caption = text.splitlines(), {}, None
    for k, line in enumerate(lines):
        if m := re.match(r"\**Table (\d+)\.", line):
            caption = m.group(1)
        elif line.startswith("|") and caption and not lines[k - 1].startswith("|"):
            rows = []
            for row in lines[k:]:
                if not row.startswith("|"):
                    break
                if not set(row) <= set("|-: "):
                    rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            tables[caption], caption = rows, None
    return tables


MEDICLIP_BENCHES = {"CheXpert": "chexpert", "BrainMRI": "brainmri", "BUSI": "busi"}


def test_mediclip_numbers_match_the_source_text() -> None:
    _shared_or_skip()
    tables = _md_tables((PAPERS / "mediclip_miccai2024.md").read_text(encoding="utf-8"))
    parsed: dict[tuple[str, str, str, int], tuple[float, float | None]] = {}
    for number in ("1", "2"):
        head, *rows = tables[number]
        bench = "busi"  # Table 2 is on BUSI only
        lines: dict[Any, dict[Any, Any]] = {}
        for row in rows:
            cells = dict(zip(head, row))
            bench = MEDICLIP_BENCHES[cells["Datasets"]] if cells.get("Datasets") else bench
            k = int(cells["k"])
            lines[(bench, k)] = {m: _cell(v) for m, v in cells.items() if m not in ("Datasets", "k")}
            for m, v in lines[(bench, k)].items():
                parsed[(number, bench, m, k)] = v
        assert _copied_lines(lines) == [], number  # rows ...
        columns: dict[Any, dict[Any, Any]] = defaultdict(dict)
        for line, values in lines.items():
            for m, v in values.items():
                columns[m][line] = v
        assert _copied_lines(columns) == [], number  # ... and columns
    assert len(parsed) == 3 * 4 * 8 + 4 * 7
    mediclip = [e for e in REFS.entries if e.source == "mediclip"]
    assert {(e.table, e.bench, e.method, e.shots): (e.value, e.std) for e in mediclip} == parsed
    assert all(e.metric == ("image_auroc" if e.table == "1" else "pixel_auroc") for e in mediclip)
    # the flagged inconsistency is real: Tables 3-5 give MediCLIP's 16-shot results, which agree with
    # Table 1 on CheXpert and BrainMRI but not on BUSI
    train, diagonal = "", {}
    for trained_on, tested_on, value in tables["3"][1:]:  # zero-shot transfer; train == test is the usual setting
        train = trained_on or train
        if train == tested_on:
            diagonal[MEDICLIP_BENCHES[train]] = _cell(value)
    k16 = {"3": diagonal,
           "4": {MEDICLIP_BENCHES[b]: _cell(v) for b, v in zip(tables["4"][0][3:], tables["4"][-1][3:])},
           "5": {MEDICLIP_BENCHES[b]: _cell(v) for b, v in zip(tables["5"][0][2:], tables["5"][-1][2:])}}
    assert tables["4"][-1][1:3] == ["✓", "✓"] and tables["5"][-1][1] == "All Synthesis Tasks"
    for number, values in k16.items():
        assert values["chexpert"] == parsed[("1", "chexpert", "MediCLIP", 16)], number
        assert values["brainmri"] == parsed[("1", "brainmri", "MediCLIP", 16)], number
        assert values["busi"] == (90.8, 0.4) != parsed[("1", "busi", "MediCLIP", 16)] == (89.9, 0.4), number
    assert parsed[("2", "busi", "MediCLIP", 16)] == (89.9, 0.9)
    assert [(e.table, e.bench, e.method, e.shots) for e in mediclip if e.flag] == [("1", "busi", "MediCLIP", 16)]


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


def test_shots_gap() -> None:
    assert shots_gap(16, 16) == 0 and shots_gap(10, 8) < shots_gap(10, 16) < shots_gap(10, 32)
    assert shots_gap(None, 32) < shots_gap(None, 4) and shots_gap(None, None) == 0


def test_few_shot_entries_are_matched_on_their_shots(tmp_path: Path) -> None:
    """MediCLIP's Table 1 has one entry per k: a row is compared with its own k, else the nearest."""
    recs = [_rec("mediclip", s, bench="brainmri", shots=16, image_auroc=0.90 + 0.01 * s) for s in range(2)]
    recs += [_rec("mediclip", s, bench="brainmri", shots=10, chash="h10", image_auroc=0.9) for s in range(2)]
    recs += [_rec("patchcore", s, bench="brainmri", image_auroc=0.8) for s in range(2)]
    (t,) = _tables(recs, tmp_path)
    add_comparison([t], REFS, ["mediclip"])
    rows = _rows(t)
    k16, k10, full = rows["mediclip (16-shot)"], rows["mediclip (10-shot)"], rows["patchcore"]
    assert _col(t, "published", "image_auroc").text == {k16: "94.80 ± 0.50", k10: "94.90 ± 0.40", full: "81.70 ± 0.20"}
    assert _col(t, "Δ", "image_auroc").text[k16] == f"{90.5 - 94.8:+.2f}"
    assert t.label_marks == {k10: " ‡", full: " ‡"}  # the 16-shot run is the paper's setting
    notes = "\n".join(t.notes)
    assert "different configuration: trained on 10-shot (paper: 8-shot)" in notes
    assert "compared with mediclip's PatchCore (patchcore); different configuration: trained on the full " \
           "training set (paper: 32-shot)" in notes
    assert "not run here: AnoDDPM (4/8/16/32-shot), CutPaste (4/8/16/32-shot), MediCLIP (4/32-shot), " \
           "PatchCore (4/8/16-shot)" in notes
    # with --compare-missing, one paper-only row per method and k
    (t,) = _tables(recs, tmp_path / "missing")
    add_comparison([t], REFS, ["mediclip"], missing=True)
    rows = _rows(t)
    assert _col(t, "published", "image_auroc").text[rows["SQUID (paper only, 4-shot)"]] == "69.50 ± 4.40"
    assert _col(t, "published", "image_auroc").text[rows["MediCLIP (paper only, 32-shot)"]] == "95.40 ± 0.40"
    assert "MediCLIP (paper only, 16-shot)" not in rows and len([r for r in t.rows if r.paper_only]) == 8 * 4 - 3


def test_flagged_few_shot_number_on_a_pixel_bench(tmp_path: Path) -> None:
    recs = [_rec("mediclip", s, bench="busi", shots=16, image_auroc=0.9, pixel_auroc=0.88) for s in range(2)]
    (t,) = _tables(recs, tmp_path)
    add_comparison([t], REFS, ["mediclip"])
    assert _col(t, "published", "image_auroc").text == {0: "89.90 ± 0.40*"}  # Table 1, flagged
    assert _col(t, "published", "pixel_auroc").text == {0: "89.90 ± 0.90"}  # Table 2
    assert _col(t, "published", "pixel_auroc").csv["mediclip:table"] == {0: "2"}
    assert any(n.startswith("* mediclip Table 1, MediCLIP (I-AUROC): Tables 3, 4 and 5 give") for n in t.notes)


def test_ppad_variant_and_zero_shot_entries(tmp_path: Path) -> None:
    """PPAD's CoOp is our ``coop`` (a named config of ppad); CheXzero is zero-shot, so the
    training set of our chexzero_zeroshot run is not a difference."""
    recs = [_rec("coop", s, bench="zhanglab", shots=64, config={"views": [""], "image_prompt": False},
                 image_auroc=0.9) for s in range(2)]
    recs += [_rec("ppad", s, bench="zhanglab", shots=64, image_auroc=0.95) for s in range(2)]
    recs += [_rec("chexzero_zeroshot", s, bench="zhanglab", image_auroc=0.93) for s in range(2)]
    (t,) = _tables(recs, tmp_path)
    add_comparison([t], REFS, ["ppad", "mediclip"], missing=True)
    rows = _rows(t)
    pub = _col(t, "ppad", "image_auroc").text
    assert (pub[rows["coop (64-shot)"]], pub[rows["ppad (64-shot)"]], pub[rows["chexzero_zeroshot"]]) == \
        ("94.60 ± 1.10", "96.70 ± 0.40", "92.70")
    assert not t.label_marks
    assert "coop (64-shot): compared with ppad's CoOp, the paper's variant 'CoOp' (views=[\"\"], " \
           "image_prompt=false)" in t.notes
    assert pub[rows["Xplainer (paper only, ppad, zero-shot)"]] == "89.90"
    assert pub[rows["SQUID (paper only, ppad)"]] == "87.60 ± 1.50"  # SQUID's own full-set number
    assert "MaPLe (paper only, ppad, 64-shot)" in rows and "CoOp (paper only, ppad, 64-shot)" not in rows
    assert not [c for c in t.columns if c.title == "mediclip"]  # MediCLIP has no ZhangLab numbers


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


def test_cli_compare_mediclip_on_brainmri(tmp_path: Path) -> None:
    res = _write(tmp_path / "res", [_rec("mediclip", s, bench="brainmri", shots=16, image_auroc=0.92 + 0.02 * s)
                                    for s in range(2)])
    out = run_bmad("leaderboard", "--results", str(res), "--compare", "mediclip", "--compare-missing")
    assert out.returncode == 0, out.stderr
    assert "| algorithm | n | I-AUROC | published | Δ |" in out.stdout
    assert "| mediclip (16-shot) | 2/2 | **93.00 ± 1.41** | 94.80 ± 0.50 | -1.80 |" in out.stdout
    assert "| RegAD (paper only, 32-shot) | – | – | 83.00 ± 2.40 | – |" in out.stdout
    assert "- mediclip: X. Zhang, M. Xu, D. Qiu, R. Yan, N. Lang, X. Zhou, MediCLIP: Adapting CLIP" in out.stdout
    assert "‡" not in out.stdout.split("### brainmri")[1].split("Values:")[0]  # the paper's own setting
