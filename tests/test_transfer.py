"""Cross-bench transfer matrices from run records."""

from __future__ import annotations

import pytest

from bmad.leaderboard import render
from bmad.transfer import transfer_tables


def _rec(algo: str, bench: str, seed: int, auroc: float, train: str | None = None, config: dict | None = None):
    return {"algo": algo, "bench": bench, "seed": seed, "train_bench": train, "shots": None, "status": "ok",
            "config": config or {"k": 1}, "config_hash": "h", "sweep": {"seeds": 2},
            "metrics": {"image_auroc": auroc}}


def test_matrix_rows_are_training_benches_and_columns_test_benches():
    recs = [_rec("a", "X", 0, 0.9), _rec("a", "X", 1, 0.8), _rec("a", "Y", 0, 0.6, "X"), _rec("a", "Y", 1, 0.7, "X"),
            _rec("a", "Y", 0, 0.95), _rec("a", "X", 0, 0.5, "Y"),
            _rec("b", "X", 0, 0.99),  # no cross-bench run: no matrix
            _rec("a", "Y", 0, 0.1, "X", config={"k": 2})]  # another configuration: its own matrix
    tables = transfer_tables(recs)
    assert len(tables) == 2
    t = tables[0]
    assert t.metrics == ["X", "Y"] and [r.label for r in t.rows] == ["trained on X", "trained on Y"]
    on_x, on_y = t.rows
    assert on_x.cells["X"].mean == pytest.approx(0.85) and on_x.cells["Y"].mean == pytest.approx(0.65)
    assert on_y.cells["X"].values == [0.5] and on_y.cells["Y"].values == [0.95]
    assert t.ranks[(0, "X")] == 0 and t.ranks[(1, "Y")] == 0  # best source per test bench
    assert tables[1].metrics == ["Y"] and tables[1].rows[0].cells["Y"].values == [0.1]
    text = render(tables, "md")
    assert "trained on X" in text and "85.00 ± 7.07" in text and "training bench (rows) x test bench" in text


def test_no_cross_runs_no_tables():
    assert transfer_tables([_rec("a", "X", 0, 0.9)]) == []
