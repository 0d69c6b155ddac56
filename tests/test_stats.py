"""`bmad leaderboard --stats` (paired tests against the best row) and `--bootstrap N`
(confidence intervals of image AUROC over test images)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from bmad.leaderboard import build_tables, render
from bmad.metrics import image_auroc
from bmad.records import load_records, record_path, write_record
from bmad.stats import (
    add_bootstrap,
    add_significance,
    auroc_weighted,
    bootstrap_auroc,
    compare_to_best,
    paired_test,
)
from tests.conftest import run_bmad


def _rec(algo: str, seed: int, auroc: float, per_image: tuple[list[float], list[int]] | None = None,
         bench: str = "brats2021") -> dict[str, Any]:
    rec = {"bench": bench, "algo": algo, "seed": seed, "shots": None, "config": {}, "config_hash": f"h{algo}",
           "status": "ok", "sweep": {"seeds": 5},
           "metrics": {"image_auroc": auroc, "image_ap": None, "pixel_auroc": None, "aupro": None, "dice": None,
                       "best_dice": None}}
    if per_image is not None:
        rec["per_image"] = {"scores": list(per_image[0]), "labels": list(per_image[1])}
    return rec


def _tables(recs: list[dict[str, Any]], tmp_path: Path):
    res = tmp_path / "res"
    for r in recs:
        write_record(record_path(res, r["bench"], r["algo"], r["config_hash"], r["seed"]), r)
    return build_tables(load_records(res).records)


# -- paired tests ----------------------------------------------------------------------------------


def test_paired_test_equals_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.8, 0.9, 5), rng.uniform(0.8, 0.9, 5)
    assert paired_test(a, b, "ttest") == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-12)
    a, b = rng.uniform(0.8, 0.9, 8), rng.uniform(0.8, 0.9, 8)
    assert paired_test(a, b, "wilcoxon") == pytest.approx(sps.wilcoxon(a, b).pvalue, rel=1e-12)


def test_identical_not_significant_shift_significant() -> None:
    a = [0.81, 0.84, 0.80, 0.86, 0.83]
    assert paired_test(a, a) == 1.0 and paired_test(a, a, "wilcoxon") == 1.0
    shifted = [v - 0.05 + d for v, d in zip(a, (0.001, -0.002, 0.0015, 0.0, -0.001))]
    assert paired_test(a, shifted) < 0.001
    # five pairs all in favour of the best: the smallest two-sided Wilcoxon p-value, 2/32, is not < 0.05
    assert paired_test(a, shifted, "wilcoxon") == pytest.approx(2 / 32)
    assert paired_test([0.9], [0.8]) is None and paired_test([], []) is None
    with pytest.raises(ValueError, match="test must be one of"):
        paired_test(a, a, "mannwhitney")


def test_pairs_by_seed_not_by_position(tmp_path: Path) -> None:
    best = {0: 0.90, 1: 0.95, 2: 0.91, 3: 0.97, 4: 0.93}
    other = {1: 0.94, 2: 0.89, 3: 0.96, 4: 0.92, 7: 0.5}  # seed 0 missing, an extra seed 7
    recs = [_rec("best", k, v) for k, v in best.items()] + [_rec("other", k, v) for k, v in other.items()]
    (t,) = _tables(recs, tmp_path)
    best_i, tested = compare_to_best(t, "image_auroc")
    assert t.rows[best_i].label == "best"
    (res,) = tested.values()
    shared = [1, 2, 3, 4]
    assert res.n == 4
    assert res.p == pytest.approx(sps.ttest_rel([best[k] for k in shared], [other[k] for k in shared]).pvalue)


def test_significance_marks_and_formats(tmp_path: Path) -> None:
    base = np.array([0.90, 0.93, 0.91, 0.94, 0.92])
    values = {"a": base, "b": base - 0.004 * np.array([1, -1, 2, -2, 1]),  # a tie with a
              "c": base - 0.10 + 0.002 * np.arange(5)}  # clearly worse
    recs = [_rec(algo, k, float(v)) for algo, vals in values.items() for k, v in enumerate(vals)]
    recs.append(_rec("d", 0, 0.99))  # one seed: the best, tested against nobody
    recs.append(_rec("e", 9, 0.5))  # shares no seed with the best: n/a
    (t,) = _tables(recs, tmp_path)
    legend = add_significance([t])
    rows = {r.label: i for i, r in enumerate(t.rows)}
    p = next(c for c in t.columns if c.title == "p")
    assert p.text[rows["d"]] == "best" and p.text[rows["e"]] == "n/a"
    assert p.text[rows["c"]] == "n/a"
    # only one seed pairs a..c with the best (d): n/a for all of them, so all are marked
    assert {i for (i, _) in t.cell_marks} == {rows["a"], rows["b"], rows["c"], rows["e"]}
    assert "paired t-test" in legend[0] and "≈" in legend[0]

    # without d, a is the best: b ties with it, c is significantly worse
    recs = [r for r in recs if r["algo"] not in ("d", "e")]
    (t,) = _tables(recs, tmp_path / "2")
    legend = add_significance([t])
    rows = {r.label: i for i, r in enumerate(t.rows)}
    p = next(c for c in t.columns if c.title == "p")
    assert p.text[rows["a"]] == "best"
    assert p.csv["p_vs_best"][rows["b"]] == pytest.approx(sps.ttest_rel(values["a"], values["b"]).pvalue)
    assert t.cell_marks == {(rows["b"], "image_auroc"): " ≈"}
    md = render([t], "md", legend)
    def shown(v: np.ndarray) -> str:
        return f"{100 * np.mean(v):.2f} ± {100 * np.std(v, ddof=1):.2f}"

    assert f"| b | 5/5 | <u>{shown(values['b'])}</u> ≈ | {p.text[rows['b']]} |" in md
    assert f"| c | 5/5 | *{shown(values['c'])}* | <0.001 |" in md
    latex = render([t], "latex", legend)
    assert "$^{\\approx}$" in latex and "$<$0.001" in latex
    assert "<td>best</td>" in render([t], "html", legend)
    rows_csv = {r["algorithm"]: r for r in csv.DictReader(io.StringIO(render([t], "csv")))}
    assert rows_csv["a"]["is_best"] == "1" and rows_csv["c"]["paired_seeds"] == "5"
    assert float(rows_csv["c"]["p_vs_best"]) < 0.001 and rows_csv["a"]["p_vs_best"] == ""
    # the same data with Wilcoxon: five seeds cannot reach p < 0.05, so c is marked too
    (t,) = _tables(recs, tmp_path / "3")
    legend = add_significance([t], "wilcoxon")
    assert (rows["c"], "image_auroc") in t.cell_marks and "cannot go below p = 2/32 = 0.0625" in legend[0]


# -- bootstrap -------------------------------------------------------------------------------------


def _scores(rng: np.random.Generator, n: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    y = (np.arange(n) % 3 == 0).astype(int)
    return rng.normal(size=n) + shift * y, y


def test_weighted_auroc_is_the_resampled_auroc() -> None:
    rng = np.random.default_rng(1)
    s, y = _scores(rng, 300)
    s = np.round(s, 1)  # ties
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    assert auroc_weighted(s, y, np.ones((1, n_pos)), np.ones((1, n_neg)))[0] == pytest.approx(image_auroc(s, y))
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    w_pos = rng.integers(0, 3, (4, n_pos)).astype(float)
    w_neg = rng.integers(0, 3, (4, n_neg)).astype(float)
    got = auroc_weighted(s, y, w_pos, w_neg)
    for b in range(4):
        idx = np.r_[np.repeat(pos, w_pos[b].astype(int)), np.repeat(neg, w_neg[b].astype(int))]
        assert got[b] == pytest.approx(image_auroc(s[idx], y[idx]))


def test_bootstrap_contains_the_point_and_shrinks() -> None:
    rng = np.random.default_rng(2)
    widths = []
    for n in (120, 3000):
        seeds = [_scores(np.random.default_rng(k), n) for k in range(3)]
        y = seeds[0][1]
        point, lo, hi = bootstrap_auroc([s for s, _ in seeds], y, 500, seed=0)
        assert point == pytest.approx(np.mean([image_auroc(s, y) for s, _ in seeds]))
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1 / sqrt(n): 25x the images, about a fifth of the width
    s, y = _scores(rng, 200)
    assert bootstrap_auroc([s], y, 300, seed=5) == bootstrap_auroc([s], y, 300, seed=5)  # fixed RNG seed
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_auroc([s], np.zeros(200, int), 100)


def test_bootstrap_is_fast() -> None:
    s, y = _scores(np.random.default_rng(3), 10_000)
    start = time.perf_counter()
    bootstrap_auroc([s, s + 0.1], y, 1000)
    assert time.perf_counter() - start < 15  # about 0.5 s on one core; generous for a loaded machine


def test_bootstrap_column_and_old_records(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    recs = []
    for k in range(2):
        s, y = _scores(rng, 200)
        recs.append(_rec("new", k, image_auroc(s, y), (s.tolist(), y.tolist())))
    recs += [_rec("old", k, 0.8) for k in range(2)]  # recorded before per_image existed
    s, y = _scores(rng, 200)
    recs.append(_rec("half", 0, image_auroc(s, y), (s.tolist(), y.tolist())))
    recs.append(_rec("half", 1, 0.7))
    (t,) = _tables(recs, tmp_path)
    legend = add_bootstrap([t], 200)
    rows = {r.label: i for i, r in enumerate(t.rows)}
    ci = next(c for c in t.columns if c.title == "95% CI")
    assert ci.after == "image_auroc" and rows["old"] not in ci.text
    lo, hi = ci.csv["ci_lo"][rows["new"]], ci.csv["ci_hi"][rows["new"]]
    assert lo < t.rows[rows["new"]].cells["image_auroc"].mean < hi
    assert ci.text[rows["new"]] == f"[{100 * lo:.2f}, {100 * hi:.2f}]" and ci.csv["ci_seeds"][rows["half"]] == 1
    notes = " ".join(t.notes)
    assert "no 95% CI for old: their records have no per-image scores" in notes and "rerun" in notes
    assert "part of the seeds for half (1 of 2 seeds)" in notes
    md = render([t], "md", legend)
    old = next(line for line in md.splitlines() if line.startswith("| old |"))
    assert old.endswith("80.00 ± 0.00** | – |") and "resamples within each class" in md
    rows_csv = {r["algorithm"]: r for r in csv.DictReader(io.StringIO(render([t], "csv")))}
    assert float(rows_csv["new"]["ci_lo"]) == pytest.approx(lo, abs=1e-6) and rows_csv["old"]["ci_lo"] == ""
    latex = render([t], "latex", legend)
    assert f"& {ci.text[rows['new']]} \\\\" in latex and "95\\% CI" in latex
    assert f"<td>{ci.text[rows['new']]}</td>" in render([t], "html", legend)


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_stats_and_bootstrap(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    res = tmp_path / "res"
    for algo, shift in (("strong", 2.0), ("weak", 0.3)):
        for k in range(3):
            s, y = _scores(rng, 150, shift)
            r = _rec(algo, k, image_auroc(s, y), (s.tolist(), y.tolist()))
            write_record(record_path(res, r["bench"], algo, r["config_hash"], k), r)
    out = run_bmad("leaderboard", "--results", str(res), "--stats", "--bootstrap", "200")
    assert out.returncode == 0, out.stderr
    strong = next(line for line in out.stdout.splitlines() if line.startswith("| strong"))
    weak = next(line for line in out.stdout.splitlines() if line.startswith("| weak"))
    assert "| best | [" in strong
    cells = [c.strip() for c in weak.split("|")]
    assert "≈" not in cells[3] and float(cells[4]) < 0.05 and cells[5].startswith("[")
    out = run_bmad("leaderboard", "--results", str(res), "--stats", "--test", "wilcoxon", "--format", "html")
    assert out.returncode == 0 and "Wilcoxon signed-rank test" in out.stdout
    for args, message in ((("--test", "wilcoxon"), "--test wilcoxon needs --stats"),
                          (("--bootstrap", "10"), "at least 100 resamples")):
        out = run_bmad("leaderboard", "--results", str(res), *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
