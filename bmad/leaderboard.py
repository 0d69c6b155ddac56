"""Leaderboards from run records: mean ± std over seeds, per bench, in percent."""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from bmad.records import METRIC_KEYS

METRIC_TITLES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC",
    "aupro": "AUPRO",
    "dice": "Dice@0.5",
    "best_dice": "Dice best (oracle)",
}
FORMATS = ("md", "latex", "csv", "html")


@dataclass
class Cell:
    """Mean and std (fractions) of one metric over the seeds that have it."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0


@dataclass
class Row:
    """One algorithm (config) on one bench."""

    label: str
    seeds: int
    expected: int
    cells: dict[str, Cell]
    failed: int

    @property
    def incomplete(self) -> bool:
        return self.seeds < self.expected


@dataclass
class Table:
    """One bench's table: rows, metric columns, and rank (0, 1, 2) per (row, metric)."""

    bench: str
    metrics: list[str]
    rows: list[Row]
    ranks: dict[tuple[int, str], int]


def build_tables(
    records: list[dict[str, Any]],
    benches: list[str] | None = None,
    metrics: list[str] | None = None,
) -> list[Table]:
    """Group ``ok`` records by bench and (algo, config); one table per bench."""
    wanted = list(metrics or METRIC_KEYS)
    groups: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for r in records:
        if benches and r["bench"] not in benches:
            continue
        groups.setdefault(r["bench"], {}).setdefault((r["algo"], r["config_hash"]), []).append(r)
    tables = []
    for bench in sorted(groups):
        by_algo: dict[str, int] = {}
        for algo, _ in groups[bench]:
            by_algo[algo] = by_algo.get(algo, 0) + 1
        rows = []
        for (algo, chash), recs in sorted(groups[bench].items()):
            ok = _latest_per_seed([r for r in recs if r["status"] == "ok"])
            failed = len({r["seed"] for r in recs if r["status"] == "failed"} - {r["seed"] for r in ok})
            label = algo
            shots = recs[0].get("shots")
            if shots:
                label += f" ({shots}-shot)"
            if by_algo[algo] > 1:
                label += f" [{chash[:6]}]"
            expected = max(int(r.get("sweep", {}).get("seeds", 1) or 1) for r in recs)
            cells = {
                m: Cell([float(r["metrics"][m]) for r in ok if r["metrics"].get(m) is not None]) for m in wanted
            }
            rows.append(Row(label, len(ok), expected, cells, failed))
        cols = [m for m in wanted if any(row.cells[m].n for row in rows)]
        tables.append(Table(bench, cols, rows, _ranks(rows, cols)))
    return tables


def _latest_per_seed(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({r["seed"]: r for r in recs}.values())


def _ranks(rows: list[Row], cols: list[str]) -> dict[tuple[int, str], int]:
    ranks = {}
    for m in cols:
        means = sorted({round(r.cells[m].mean, 12) for r in rows if r.cells[m].n}, reverse=True)[:3]
        for i, r in enumerate(rows):
            if r.cells[m].n and round(r.cells[m].mean, 12) in means:
                ranks[(i, m)] = means.index(round(r.cells[m].mean, 12))
    return ranks


def _fmt(cell: Cell) -> str:
    if not cell.n:
        return "–"
    return f"{100 * cell.mean:.2f} ± {100 * cell.std:.2f}"


def _mark(text: str, rank: int | None, fmt: str) -> str:
    if rank is None:
        return text
    style = {
        "md": ("**{}**", "<u>{}</u>", "*{}*"),
        "latex": ("\\textbf{{{}}}", "\\underline{{{}}}", "\\textit{{{}}}"),
        "html": ("<b>{}</b>", "<u>{}</u>", "<i>{}</i>"),
    }[fmt][rank]
    return style.format(text)


def render(tables: list[Table], fmt: str = "md") -> str:
    """Render tables as Markdown, LaTeX, CSV or HTML."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    if fmt == "csv":
        return _render_csv(tables)
    parts = [_render_one(t, fmt) for t in tables]
    if fmt == "md":
        note = (
            "\nValues: mean ± std over seeds (%), n = seeds. Best in bold, second underlined, third in italics. "
            "† fewer seeds than the sweep asked for."
        )
        return "\n\n".join(parts) + "\n" + note + "\n"
    if fmt == "html":
        body = "\n".join(parts)
        return (
            "<!doctype html>\n<html><head><meta charset='utf-8'><title>bmad leaderboard</title>"
            "<style>table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;padding:4px 8px}"
            "td{text-align:right}td:first-child{text-align:left}</style></head><body>\n"
            f"{body}\n<p>mean ± std over seeds (%); n = seeds; † fewer seeds than the sweep asked for.</p>"
            "\n</body></html>\n"
        )
    return "\n\n".join(parts) + "\n"


def _cells(t: Table, fmt: str) -> tuple[list[str], list[list[str]]]:
    head = ["algorithm", "n"] + [METRIC_TITLES.get(m, m) for m in t.metrics]
    body = []
    for i, r in enumerate(t.rows):
        n = f"{r.seeds}/{r.expected}" + (" †" if r.incomplete else "")
        if r.failed:
            n += f" ({r.failed} failed)"
        label = html.escape(r.label) if fmt == "html" else _latex_escape(r.label) if fmt == "latex" else r.label
        body.append([label, n] + [_mark(_fmt(r.cells[m]), t.ranks.get((i, m)), fmt) for m in t.metrics])
    return head, body


def _render_one(t: Table, fmt: str) -> str:
    head, body = _cells(t, fmt)
    if fmt == "md":
        lines = [f"### {t.bench}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    if fmt == "latex":
        lines = [
            "\\begin{table}[t]\\centering",
            f"\\caption{{{_latex_escape(t.bench)}: mean $\\pm$ std over seeds (\\%).}}",
            "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
            "\\toprule",
            " & ".join(head).replace("±", "$\\pm$") + " \\\\",
            "\\midrule",
        ]
        lines += [" & ".join(row).replace("±", "$\\pm$").replace("†", "$^\\dagger$") + " \\\\" for row in body]
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in body)
    ths = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<h3>{html.escape(t.bench)}</h3>\n<table>\n<tr>{ths}</tr>\n{rows}</table>"


def _render_csv(tables: list[Table]) -> str:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["bench", "algorithm", "seeds", "expected_seeds", "failed", "metric", "mean", "std", "n", "rank"])
    for t in tables:
        for i, r in enumerate(t.rows):
            for m in t.metrics:
                c = r.cells[m]
                rank = t.ranks.get((i, m))
                w.writerow([
                    t.bench, r.label, r.seeds, r.expected, r.failed, m,
                    f"{c.mean:.6f}" if c.n else "", f"{c.std:.6f}" if c.n else "", c.n,
                    "" if rank is None else rank + 1,
                ])
    return buf.getvalue()


def _latex_escape(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        s = s.replace(a, b)
    return s
