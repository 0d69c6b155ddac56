"""Leaderboards from run records: mean ± std over seeds, per bench, in percent."""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
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
    """One algorithm (config) on one bench; ``records``: its ``ok`` records, one per seed.

    A row with ``paper_only`` set holds no runs of ours, only published numbers (``--compare-missing``).
    """

    label: str
    seeds: int
    expected: int
    cells: dict[str, Cell]
    failed: int
    algo: str = ""
    shots: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    paper_only: bool = False

    @property
    def incomplete(self) -> bool:
        return self.seeds < self.expected


@dataclass
class Column:
    """A column added to a table: right after metric ``after``'s column (one such column per
    metric), or at the end of the row when ``after`` is None. ``text``: shown text per row index
    ("–" where absent); ``csv``: CSV column name -> value per row index (in the CSV's long format
    a per-metric column's value sits on that metric's line, a row column's on every line)."""

    title: str
    after: str | None
    text: dict[int, str]
    csv: dict[str, dict[int, Any]] = field(default_factory=dict)


@dataclass
class Table:
    """One bench's table: rows, metric columns, and rank (0, 1, 2) per (row, metric).

    ``columns``, ``cell_marks`` (a marker after a metric cell), ``label_marks`` (after a row's
    label) and ``notes`` (lines under the table) are filled by the optional analyses
    (``--compare``, ``--stats``, ``--bootstrap``, ``--efficiency``).
    """

    bench: str
    metrics: list[str]
    rows: list[Row]
    ranks: dict[tuple[int, str], int]
    columns: list[Column] = field(default_factory=list)
    cell_marks: dict[tuple[int, str], str] = field(default_factory=dict)
    label_marks: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_tables(
    records: list[dict[str, Any]],
    benches: list[str] | None = None,
    metrics: list[str] | None = None,
) -> list[Table]:
    """Group ``ok`` records by bench and (algo, config); one table per bench. A cross-bench
    run's row says which bench it was trained on (``bmad.transfer`` makes the matrices)."""
    wanted = list(metrics or METRIC_KEYS)
    groups: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for r in records:
        if benches and r["bench"] not in benches:
            continue
        groups.setdefault(r["bench"], {}).setdefault((r["algo"], r["config_hash"]), []).append(r)
    tables = []
    for bench in sorted(groups):
        labels = {key: _base_label(key[0], recs[0]) for key, recs in groups[bench].items()}
        rows = []
        for (algo, chash), recs in sorted(groups[bench].items()):
            ok = _latest_per_seed([r for r in recs if r["status"] == "ok"])
            failed = len({r["seed"] for r in recs if r["status"] == "failed"} - {r["seed"] for r in ok})
            label = labels[(algo, chash)]
            shots = recs[0].get("shots")
            if list(labels.values()).count(label) > 1:
                label += f" [{chash[:6]}]"
            expected = max(int(r.get("sweep", {}).get("seeds", 1) or 1) for r in recs)
            cells = {
                m: Cell([float(r["metrics"][m]) for r in ok if r["metrics"].get(m) is not None]) for m in wanted
            }
            rows.append(Row(label, len(ok), expected, cells, failed, algo=algo, shots=shots,
                            config=dict(recs[0].get("config") or {}), records=ok))
        cols = [m for m in wanted if any(row.cells[m].n for row in rows)]
        tables.append(Table(bench, cols, rows, _ranks(rows, cols)))
    return tables


def _base_label(algo: str, rec: dict[str, Any]) -> str:
    """``algo`` (K-shot) (trained on BENCH), from a record of the group."""
    label = algo + (f" ({rec['shots']}-shot)" if rec.get("shots") else "")
    return label + (f" (trained on {rec['train_bench']})" if rec.get("train_bench") else "")


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


def add_efficiency(tables: list[Table]) -> list[str]:
    """Add inference ms/image, peak memory and parameter counts (means over a row's seeds) at
    the end of every row; returns the legend lines. Memory is GPU memory when every run on the
    bench recorded it, else the process's peak RSS for all rows, so a column always compares."""
    for t in tables:
        recs = [r for row in t.rows for r in row.records]
        gpu = bool(recs) and all((r.get("memory") or {}).get("peak_gpu_mb") is not None for r in recs)
        mem_key, mem_title = ("peak_gpu_mb", "peak GPU MB") if gpu else ("peak_rss_mb", "peak RSS MB")
        fields = {
            "ms_per_image": ("timing", "ms_per_image"),
            "peak_gpu_mb": ("memory", "peak_gpu_mb"),
            "peak_rss_mb": ("memory", "peak_rss_mb"),
            "params_total": ("params", "total"),
            "params_trainable": ("params", "trainable"),
        }
        means: dict[str, dict[int, float]] = {k: {} for k in fields}
        for i, row in enumerate(t.rows):
            for key, (group, name) in fields.items():
                vals = [float(v) for r in row.records if (v := (r.get(group) or {}).get(name)) is not None]
                if vals:
                    means[key][i] = float(np.mean(vals))
        shown = (("ms/image", "ms_per_image", "{:.1f}", 1.0), (mem_title, mem_key, "{:.0f}", 1.0),
                 ("params (M)", "params_total", "{:.2f}", 1e-6), ("trainable (M)", "params_trainable", "{:.2f}", 1e-6))
        for title, key, pattern, scale in shown:
            csv = {key: means[key]} if key != mem_key else {"peak_gpu_mb": means["peak_gpu_mb"],
                                                            "peak_rss_mb": means["peak_rss_mb"]}
            t.columns.append(Column(title, None, {i: pattern.format(v * scale) for i, v in means[key].items()}, csv))
    return [
        "Efficiency (means over seeds): ms/image = inference time per test image; peak memory over the whole run, "
        "training included: GPU memory when every run on the bench recorded it (--device cuda), else the "
        "process's peak resident memory (RSS, which includes Python and torch themselves); params (M) = "
        "parameters in millions, all and trainable."
    ]


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


def render(tables: list[Table], fmt: str = "md", legend: list[str] | None = None) -> str:
    """Render tables as Markdown, LaTeX, CSV or HTML. ``legend``: lines explaining added columns
    and markers, printed under the tables (CSV carries data only: no legend, no notes)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    if fmt == "csv":
        return _render_csv(tables)
    legend = list(legend or [])
    parts = [_render_one(t, fmt, legend) for t in tables]
    if fmt == "md":
        note = (
            "\nValues: mean ± std over seeds (%), n = seeds. Best in bold, second underlined, third in italics. "
            "† fewer seeds than the sweep asked for."
        )
        return "\n\n".join(parts) + "\n" + note + "\n" + "".join(f"- {line}\n" for line in legend)
    if fmt == "html":
        body = "\n".join(parts)
        extra = "".join(f"<p>{html.escape(line)}</p>\n" for line in legend)
        return (
            "<!doctype html>\n<html><head><meta charset='utf-8'><title>bmad leaderboard</title>"
            "<style>table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;padding:4px 8px}"
            "td{text-align:right}td:first-child{text-align:left}</style></head><body>\n"
            f"{body}\n<p>mean ± std over seeds (%); n = seeds; † fewer seeds than the sweep asked for.</p>"
            f"\n{extra}</body></html>\n"
        )
    return "\n\n".join(parts) + "\n"


def _row_text(t: Table, i: int, fmt: str) -> list[str]:
    """The shown cells of row ``i`` (label, n, metrics with their added columns, row columns)."""
    r = t.rows[i]

    def esc(text: str) -> str:
        return html.escape(text) if fmt == "html" else _latex_escape(text) if fmt == "latex" else text

    if r.paper_only:
        n = "–"
    else:
        n = f"{r.seeds}/{r.expected}" + (" †" if r.incomplete else "")
        if r.failed:
            n += f" ({r.failed} failed)"
    cells = [esc(r.label) + t.label_marks.get(i, ""), n]
    for m in t.metrics:
        cells.append(_mark(_fmt(r.cells[m]), t.ranks.get((i, m)), fmt) + t.cell_marks.get((i, m), ""))
        cells += [esc(c.text.get(i, "–")) for c in t.columns if c.after == m]
    cells += [esc(c.text.get(i, "–")) for c in t.columns if c.after is None]
    return cells


def _head(t: Table) -> list[str]:
    head = ["algorithm", "n"]
    for m in t.metrics:
        head.append(METRIC_TITLES.get(m, m))
        head += [c.title for c in t.columns if c.after == m]
    return head + [c.title for c in t.columns if c.after is None]


def _render_one(t: Table, fmt: str, legend: list[str]) -> str:
    head = _head(t)
    body = [_row_text(t, i, fmt) for i in range(len(t.rows))]
    if fmt == "md":
        lines = [f"### {t.bench}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        if t.notes:  # a note starting with "*" would open a nested list
            lines += [""] + ["- " + ("\\" if note.startswith("*") else "") + note for note in t.notes]
        return "\n".join(lines)
    if fmt == "latex":
        lines = [
            "\\begin{table}[t]\\centering",
            f"\\caption{{{_latex_escape(t.bench)}: mean $\\pm$ std over seeds (\\%).}}",
            "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
            "\\toprule",
            " & ".join(_latex_symbols(_latex_escape(h)) for h in head) + " \\\\",
            "\\midrule",
        ]
        lines += [" & ".join(_latex_symbols(c) for c in row) + " \\\\" for row in body]
        lines += ["\\bottomrule", "\\end{tabular}"]
        foot = [_latex_symbols(_latex_escape(line)) for line in t.notes + legend]
        if foot:
            lines.append("\\par\\smallskip{\\footnotesize " + " \\\\\n".join(foot) + "}")
        lines.append("\\end{table}")
        return "\n".join(lines)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in body)
    ths = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    notes = "".join(f"\n<p>{html.escape(note)}</p>" for note in t.notes)
    return f"<h3>{html.escape(t.bench)}</h3>\n<table>\n<tr>{ths}</tr>\n{rows}</table>{notes}"


def _render_csv(tables: list[Table]) -> str:
    import csv

    extra: list[str] = []
    for t in tables:
        for c in t.columns:
            extra += [k for k in c.csv if k not in extra]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["bench", "algorithm", "seeds", "expected_seeds", "failed", "metric", "mean", "std", "n", "rank"] + extra)
    for t in tables:
        for i, r in enumerate(t.rows):
            for m in t.metrics:
                c = r.cells[m]
                rank = t.ranks.get((i, m))
                added: dict[str, Any] = {}
                for col in t.columns:
                    if col.after is None or col.after == m:
                        added.update({k: v.get(i) for k, v in col.csv.items()})
                w.writerow([
                    t.bench, r.label, r.seeds, r.expected, r.failed, m,
                    f"{c.mean:.6f}" if c.n else "", f"{c.std:.6f}" if c.n else "", c.n,
                    "" if rank is None else rank + 1,
                ] + [_csv_value(added.get(k)) for k in extra])
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


_LATEX_SYMBOLS = (("±", "$\\pm$"), ("†", "$^\\dagger$"), ("‡", "$^\\ddagger$"), ("≈", "$^{\\approx}$"),
                  ("Δ", "$\\Delta$"), ("≥", "$\\geq$"), ("<", "$<$"), ("−", "-"), ("×", "$\\times$"))


def _latex_symbols(s: str) -> str:
    for a, b in _LATEX_SYMBOLS:
        s = s.replace(a, b)
    return s


def _latex_escape(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        s = s.replace(a, b)
    return s
