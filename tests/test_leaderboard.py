"""Leaderboard tables from records: mean ± std, ranks, flags, formats, bad records."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from bmad.leaderboard import build_tables, render
from bmad.records import load_records, record_path, write_record
from tests.conftest import run_bmad


def _rec(algo: str, seed: int, auroc: float, bench: str = "brats2021", seeds: int = 3, **metrics) -> dict:
    m = {"image_auroc": auroc, "image_ap": None, "pixel_auroc": None, "aupro": None, "dice": None,
         "best_dice": None, **metrics}
    return {"bench": bench, "algo": algo, "seed": seed, "shots": None, "config": {}, "config_hash": f"h{algo}",
            "status": "ok", "metrics": m, "sweep": {"seeds": seeds}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    values = {"a": [0.90, 0.92, 0.94], "b": [0.80, 0.82, 0.84], "c": [0.70, 0.72], "d": [0.5, 0.6, 0.7]}
    for algo, vals in values.items():
        for seed, v in enumerate(vals):
            write_record(record_path(res, "brats2021", algo, f"h{algo}", seed), _rec(algo, seed, v))
    failed = _rec("d", 3, 0.0) | {"status": "failed", "error": "boom", "metrics": {}}
    write_record(record_path(res, "liver", "d", "hd", 0), _rec("d", 0, 0.6, bench="liver", seeds=1))
    write_record(record_path(res, "liver", "d", "hd", 1), failed | {"bench": "liver", "seed": 1})
    return res


def test_mean_std_ranks_and_flags(results: Path) -> None:
    tables = build_tables(load_records(results).records)
    assert [t.bench for t in tables] == ["brats2021", "liver"]
    t = tables[0]
    assert t.metrics == ["image_auroc"]
    rows = {r.label: r for r in t.rows}
    assert rows["a"].cells["image_auroc"].mean == pytest.approx(0.92)
    assert rows["a"].cells["image_auroc"].std == pytest.approx(np.std([0.9, 0.92, 0.94], ddof=1))
    assert rows["c"].incomplete and not rows["a"].incomplete
    ranks = {t.rows[i].label: r for (i, _), r in t.ranks.items()}
    assert ranks == {"a": 0, "b": 1, "c": 2}
    md = render(tables, "md")
    assert "| a | 3/3 | **92.00 ± 2.00** |" in md
    assert "| b | 3/3 | <u>82.00 ± 2.00</u> |" in md
    assert "| c | 2/3 † | *71.00 ± 1.41* |" in md
    assert "| d | 3/3 | 60.00 ± 10.00 |" in md


def test_failed_runs_counted_not_averaged(results: Path) -> None:
    liver = build_tables(load_records(results).records, benches=["liver"])[0]
    (row,) = liver.rows
    assert row.seeds == 1 and row.failed == 1 and row.cells["image_auroc"].mean == pytest.approx(0.6)


def test_formats(results: Path) -> None:
    tables = build_tables(load_records(results).records)
    latex = render(tables, "latex")
    assert "\\textbf{92.00 $\\pm$ 2.00}" in latex and "\\begin{tabular}" in latex
    html = render(tables, "html")
    assert "<b>92.00 ± 2.00</b>" in html and html.count("<table>") == 2
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv"))))
    a = [r for r in rows if r["algorithm"] == "a"][0]
    assert float(a["mean"]) == pytest.approx(0.92) and a["rank"] == "1" and a["n"] == "3"


def test_cli_skips_corrupt_records_and_writes_atomically(results: Path, tmp_path: Path) -> None:
    bad = results / "runs" / "brats2021" / "x" / "h" / "seed0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"bench": "brats2021", "algo": "x"')  # truncated
    other = results / "runs" / "brats2021" / "y" / "h" / "seed0.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"bench": "brats2021", "algo": "y", "schema": 99}))
    out_file = tmp_path / "lb.md"
    out = run_bmad("leaderboard", "--results", str(results), "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stderr and "unreadable JSON" in out.stderr and "missing keys" in out.stderr
    assert "### brats2021" in out_file.read_text()
    out = run_bmad("leaderboard", "--results", str(tmp_path / "none"))
    assert out.returncode == 2 and "no run records" in out.stderr
    out = run_bmad("leaderboard", "--results", str(results), "--metric", "auc")
    assert out.returncode == 2 and "unknown metric 'auc'" in out.stderr
