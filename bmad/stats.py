"""Statistics BMAD never reported: paired tests against the best row across seeds
(``bmad leaderboard --stats``) and bootstrap confidence intervals of image AUROC over the
test images (``--bootstrap N``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from bmad.leaderboard import METRIC_TITLES, Column, Row, Table

TESTS = ("ttest", "wilcoxon")
TEST_NAMES = {"ttest": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}
ALPHA = 0.05
TIE_MARK = " ≈"


@dataclass(frozen=True)
class Paired:
    """One row against the best row: the p-value (None when fewer than 2 seeds pair) and the
    number of seeds both rows have."""

    p: float | None
    n: int

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def seed_values(row: Row, metric: str) -> dict[int, float]:
    """``metric`` per seed of ``row``'s ok records (seeds without the metric left out)."""
    return {int(r["seed"]): float(r["metrics"][metric]) for r in row.records
            if (r.get("metrics") or {}).get(metric) is not None}


def paired_test(best: Sequence[float], other: Sequence[float], test: str = "ttest") -> float | None:
    """Two-sided p-value of a paired test of ``best`` against ``other`` (same length, paired by
    position); None with fewer than 2 pairs; 1.0 when every pair is equal (no evidence of a
    difference: the tests themselves are undefined there)."""
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}")
    a, b = np.asarray(best, float), np.asarray(other, float)
    if a.shape != b.shape:
        raise ValueError("paired samples need the same length")
    if a.size < 2:
        return None
    if np.all(a == b):
        return 1.0
    with warnings.catch_warnings():
        # scipy warns on near-constant differences (t-test: precision loss; its p is then ~0, a
        # consistent shift) and on zero differences (Wilcoxon: normal approximation)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        p = float((sps.ttest_rel(a, b) if test == "ttest" else sps.wilcoxon(a, b)).pvalue)
    return None if math.isnan(p) else p


def compare_to_best(table: Table, metric: str, test: str = "ttest") -> tuple[int, dict[int, Paired]] | None:
    """The best row for ``metric`` (highest mean; the first on a tie) and every other row with
    values, tested against it over the seeds both have; None when no row has the metric."""
    means = {i: row.cells[metric].mean for i, row in enumerate(table.rows) if row.cells[metric].n}
    if not means:
        return None
    best = max(means, key=lambda i: (means[i], -i))
    best_vals = seed_values(table.rows[best], metric)
    out = {}
    for i in means:
        if i == best:
            continue
        vals = seed_values(table.rows[i], metric)
        shared = sorted(set(best_vals) & set(vals))
        out[i] = Paired(paired_test([best_vals[k] for k in shared], [vals[k] for k in shared], test), len(shared))
    return best, out


def _p_text(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def add_significance(tables: list[Table], test: str = "ttest") -> list[str]:
    """Per table and metric: a "p" column after the metric (the best row: "best") and a marker
    on the cells whose row the best is not significantly better than. Returns the legend."""
    for t in tables:
        for m in t.metrics:
            result = compare_to_best(t, m, test)
            if result is None:
                continue
            best, tested = result
            text = {best: "best"}
            for i, res in tested.items():
                text[i] = _p_text(res.p)
                if not res.significant:
                    t.cell_marks[(i, m)] = t.cell_marks.get((i, m), "") + TIE_MARK
            t.columns.append(Column("p", m, text, {
                "p_vs_best": {i: res.p for i, res in tested.items()},
                "paired_seeds": {i: res.n for i, res in tested.items()},
                "is_best": {i: int(i == best) for i in text},
            }))
    name = TEST_NAMES[test]
    return [
        f"p: two-sided {name} of the best row (highest mean, p = best) against this row, paired by seed over the "
        f"seeds both have; {TIE_MARK.strip()} the best is not significantly better (p ≥ {ALPHA}, or n/a: fewer "
        "than 2 shared seeds). No correction for multiple comparisons."
        + (" With 5 seeds (BMAD's protocol) a two-sided Wilcoxon test cannot go below p = 2/32 = 0.0625, with "
           "fewer it goes less low still: use the t-test (the default) unless you have 6 seeds or more."
           if test == "wilcoxon" else "")
    ]


# -- bootstrap over test images ---------------------------------------------------------------


def auroc_weighted(scores: np.ndarray, labels: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """AUROC of the weighted sample in which positive i appears ``w_pos[:, i]`` times and
    negative j ``w_neg[:, j]`` times, for each row of the weights ([B, n_pos], [B, n_neg]):
    the Mann-Whitney statistic with ties counted half, in O(B n) (no per-resample sort)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    order = np.argsort(neg, kind="stable")
    sorted_neg = neg[order]
    lo = np.searchsorted(sorted_neg, pos, "left")
    hi = np.searchsorted(sorted_neg, pos, "right")
    cum = np.zeros((w_neg.shape[0], neg.size + 1))
    np.cumsum(w_neg[:, order], axis=1, out=cum[:, 1:])
    below = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])  # weighted negatives under each positive
    return (w_pos * below).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def _counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """[b, n] multiplicities of n draws with replacement from n items, for b resamples."""
    draws = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
    return np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(float)


def bootstrap_auroc(scores_by_seed: Sequence[Sequence[float]], labels: Sequence[int], n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(point, lo, hi): the mean image AUROC over seeds and its percentile bootstrap interval.

    The test images are resampled with replacement within each class (so both stay present,
    in their original numbers); one resample of the images is applied to every seed's scores
    (the seeds scored the same images), and its AUROC is the mean over seeds. ``seed`` fixes
    the random draws."""
    y = np.asarray(labels)
    s = np.asarray(scores_by_seed, float)
    if s.ndim != 2 or s.shape[1] != y.size:
        raise ValueError("scores_by_seed must be [seeds, images] with one label per image")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0 or n_pos + n_neg != y.size:
        raise ValueError("labels must be 0/1 with both classes present")
    point = float(np.mean([auroc_weighted(x, y, np.ones((1, n_pos)), np.ones((1, n_neg)))[0] for x in s]))
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // y.size)
    values = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w_pos, w_neg = _counts(rng, b, n_pos), _counts(rng, b, n_neg)
        values.append(np.mean([auroc_weighted(x, y, w_pos, w_neg) for x in s], axis=0))
    dist = np.concatenate(values)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(dist, [tail, 100 - tail])
    return point, float(lo), float(hi)


def add_bootstrap(tables: list[Table], n_boot: int, seed: int = 0) -> list[str]:
    """A "95% CI" column after image AUROC: the bootstrap interval over test images of the
    row's mean over seeds, from the records' ``per_image`` scores. Rows whose records lack
    them are listed in a note under the table. Returns the legend."""
    metric = "image_auroc"
    for t in tables:
        if metric not in t.metrics:
            t.notes.append(f"--bootstrap: {METRIC_TITLES[metric]} is not in this table (--metric), no intervals")
            continue
        text, lo_v, hi_v, used = {}, {}, {}, {}
        without, mixed = [], []
        for i, row in enumerate(t.rows):
            per = [r for r in row.records if isinstance(r.get("per_image"), dict)]
            if row.records and not per:
                without.append(row.label)
            if not per:
                continue
            labels = per[0]["per_image"]["labels"]
            same = [r for r in per if r["per_image"]["labels"] == labels]
            if len(same) < len(row.records):
                mixed.append(f"{row.label} ({len(same)} of {len(row.records)} seeds)")
            _, lo, hi = bootstrap_auroc([r["per_image"]["scores"] for r in same], labels, n_boot, seed)
            text[i], lo_v[i], hi_v[i], used[i] = f"[{100 * lo:.2f}, {100 * hi:.2f}]", lo, hi, len(same)
        t.columns.append(Column("95% CI", metric, text, {"ci_lo": lo_v, "ci_hi": hi_v, "ci_seeds": used}))
        if without:
            t.notes.append(f"no 95% CI for {', '.join(without)}: their records have no per-image scores (recorded "
                           "before bmad stored them); rerun into a fresh results folder (`bmad run ... --results "
                           "NEW`) to get them")
        if mixed:
            t.notes.append(f"95% CI from part of the seeds for {', '.join(mixed)}: the other records lack per-image "
                           "scores or scored a different test set")
    return [
        f"95% CI: percentile bootstrap interval of {METRIC_TITLES[metric]} (mean over seeds) over the test images, "
        f"{n_boot} resamples within each class (fixed RNG seed {seed}); one resample of the images applies to all "
        "seeds. It covers test-set sampling only; the ± std covers the seeds."
    ]
