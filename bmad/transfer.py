"""Cross-bench transfer matrices (MediCLIP's Table 3 protocol): for each algorithm
configuration, the metric of every (training bench, test bench) pair over seeds."""

from __future__ import annotations

import json
from typing import Any

from bmad.leaderboard import METRIC_TITLES, Cell, Row, Table, _ranks


def transfer_tables(records: list[dict[str, Any]], metric: str = "image_auroc") -> list[Table]:
    """One table per algorithm configuration with at least one cross-bench run: rows are
    the training benches, columns the test benches (an in-domain run is the diagonal)."""
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for r in records:
        if r["status"] == "ok":
            key = (r["algo"], json.dumps(r["config"], sort_keys=True, default=str), r.get("shots"))
            groups.setdefault(key, []).append(r)
    tables = []
    for (algo, _, shots), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if not any(r.get("train_bench") for r in recs):
            continue
        latest: dict[tuple[str, str, int], dict[str, Any]] = {}
        for r in recs:
            latest[(r.get("train_bench") or r["bench"], r["bench"], r["seed"])] = r
        sources = sorted({k[0] for k in latest})
        targets = sorted({k[1] for k in latest})
        rows = []
        for source in sources:
            cells = {t: Cell([float(r["metrics"][metric]) for (s, b, _), r in sorted(latest.items())
                              if s == source and b == t and r["metrics"].get(metric) is not None])
                     for t in targets}
            seeds = max((c.n for c in cells.values()), default=0)
            expected = max(int(r.get("sweep", {}).get("seeds", 1) or 1) for r in recs)
            rows.append(Row(f"trained on {source}", seeds, expected, cells, 0))
        label = algo + (f" ({shots}-shot)" if shots else "")
        title = f"{label}: {METRIC_TITLES.get(metric, metric)}, training bench (rows) x test bench (columns)"
        tables.append(Table(title, targets, rows, _ranks(rows, targets)))
    return tables
