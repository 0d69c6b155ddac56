"""One self-contained HTML page of the results: per bench, the leaderboard, the efficiency
plot (inline SVG) and an anomaly-map grid (inline PNG). No external request: CSS and
images are inline, and a Content-Security-Policy forbids anything else."""

from __future__ import annotations

import base64
import html
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from bmad.errors import BmadError
from bmad.fsutil import write_text_atomic
from bmad.leaderboard import METRIC_TITLES, build_tables, render
from bmad.plots import (
    efficiency_figure,
    figure_bytes,
    find_bench,
    map_grid,
    record_mtime,
    run_groups,
    select_map_runs,
)


def _table_html(records: list[dict[str, Any]], bench: str, add: Callable[[list[Any]], list[str]]) -> str | None:
    """The bench's leaderboard with ``add``'s columns (the leaderboard's own functions), as
    an HTML fragment; None when ``add`` has nothing for this bench."""
    tables = build_tables(records, [bench])
    legend = add(tables)
    if not legend and not any(t.notes for t in tables):
        return None
    return _fragment(render(tables, "html", legend))


def _significance_and_efficiency(records: list[dict[str, Any]], bench: str) -> str | None:
    from bmad.leaderboard import add_efficiency
    from bmad.stats import add_significance

    return _table_html(records, bench, lambda t: add_significance(t) + add_efficiency(t))


def _published(records: list[dict[str, Any]], bench: str) -> str | None:
    from bmad.compare import add_comparison, load_references

    refs = load_references()
    if not any(e.bench == bench for e in refs.entries):
        return None
    return _table_html(records, bench, lambda t: add_comparison(t, refs, list(refs.sources)))


# Further tables per bench, after the leaderboard: (title, function(records, bench) -> HTML or None).
ANALYSIS_TABLES: tuple[tuple[str, Callable[[list[dict[str, Any]], str], str | None]], ...] = (
    ("Significance against the best, and efficiency", _significance_and_efficiency),
    ("Published numbers", _published),
)

CSS = """
:root{--fg:#1d232b;--muted:#5b6573;--line:#d8dde3;--accent:#1f5fa8;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#1d2b3a;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:24px}
header p{margin:2px 0;color:#c9d3de}
header a{color:#9cc7ff}
main{max-width:1320px;margin:0 auto;padding:8px 32px 40px}
.howto{background:#fff;border:1px solid var(--line);border-left:4px solid var(--accent);padding:10px 14px;
margin:18px 0;border-radius:4px}
section.bench{background:#fff;border:1px solid var(--line);border-radius:6px;padding:6px 24px 20px;margin:22px 0}
section.bench h2{border-bottom:2px solid var(--accent);padding-bottom:4px}
h3{margin:22px 0 6px;font-size:17px}
.facts{color:var(--muted);margin:0}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;margin:8px 0;font-size:14px;font-variant-numeric:tabular-nums}
th{background:#eef2f6;text-align:center;font-weight:600}
td,th{border:1px solid var(--line);padding:4px 10px;white-space:nowrap}
td{text-align:right}
td:first-child{text-align:left;font-weight:500}
tr:nth-child(even) td{background:#fafbfc}
td b{color:#0b5d1e}
.figure{margin:6px 0}
.figure svg,.figure img{max-width:100%;height:auto;display:block}
.figure.efficiency svg{width:100%;max-width:1050px}
.caption{color:var(--muted);font-size:13px;margin:4px 0 0}
.note{color:#8a5300;background:#fff7e6;border:1px solid #f1d8a6;padding:6px 10px;border-radius:4px}
footer{color:var(--muted);font-size:13px;text-align:center;padding:16px}
"""


@dataclass
class Report:
    """The page and what could not be drawn (one line each)."""

    html: str
    notes: list[str] = field(default_factory=list)


def _leaderboard_html(records: list[dict[str, Any]], bench: str) -> str:
    return _fragment(render(build_tables(records, [bench]), "html"))


def _fragment(page: str) -> str:
    """The body of a rendered HTML leaderboard, styled for the report."""
    m = re.search(r"<body>(.*)</body>", page, re.S)
    body = m.group(1) if m else page
    body = re.sub(r"<h3>.*?</h3>", "", body, count=1, flags=re.S).strip()
    body = re.sub(r"<p>(.*?)</p>", r'<p class="caption">\1</p>', body, flags=re.S)
    return '<div class="tablewrap">' + body.replace("<table>", '<table class="leaderboard">', 1) + "</div>"


def _inline_svg(fig: Any) -> str:
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bmad"}):
        svg = figure_bytes(fig, "svg").decode("utf-8")
    svg = svg[svg.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def _png_img(fig: Any, alt: str) -> str:
    data = base64.b64encode(figure_bytes(fig, "png", dpi=110)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _map_choice(results: Path, records: list[dict[str, Any]], bench: str) -> tuple[list[str], list[str], int] | None:
    """Algorithms with map samples on ``bench`` (latest config each), their config hashes and
    the seed most of them share (lowest first); None when no run kept maps."""
    per_algo: dict[str, tuple[str, set[int], float]] = {}
    for g in run_groups(records, bench):
        seeds = {r["seed"] for r in g.records if r.get("map_sample")}
        if not seeds:
            continue
        t = max(record_mtime(results, r) for r in g.records)
        if g.algo not in per_algo or t > per_algo[g.algo][2]:
            per_algo[g.algo] = (g.config_hash, seeds, t)
    if not per_algo:
        return None
    all_seeds = sorted(set().union(*(s for _, s, _ in per_algo.values())))
    seed = max(all_seeds, key=lambda k: (sum(k in s for _, s, _ in per_algo.values()), -k))
    algos = [a for a, (_, s, _) in per_algo.items() if seed in s]
    return algos, [per_algo[a][0] for a in algos], seed


def _bench_section(results: Path, records: list[dict[str, Any]], bench: str, data_root: Path | None, n_maps: int,
                   metric: str, notes: list[str]) -> str:
    on_bench = [r for r in records if r["bench"] == bench]
    ok = [r for r in on_bench if r["status"] == "ok"]
    groups = run_groups(records, bench)
    key = html.escape(bench)
    parts = [f'<section class="bench" id="bench-{key}" data-bench="{key}">', f"<h2>{key}</h2>",
             f'<p class="facts">{len(groups)} algorithm configurations · {len(ok)} ok runs'
             f"{f', {len(on_bench) - len(ok)} failed' if len(on_bench) > len(ok) else ''}"
             f" · seeds {', '.join(map(str, sorted({r['seed'] for r in ok}))) or '–'}</p>",
             "<h3>Leaderboard</h3>", _leaderboard_html(records, bench)]
    for title, fn in ANALYSIS_TABLES:
        fragment = fn(records, bench)
        if fragment:
            parts += [f"<h3>{html.escape(title)}</h3>", f'<div class="tablewrap">{fragment}</div>']

    parts.append("<h3>Efficiency</h3>")
    try:
        svg = _inline_svg(efficiency_figure(records, bench, metric))
        parts += [f'<div class="figure efficiency">{svg}</div>',
                  f'<p class="caption">{METRIC_TITLES.get(metric, metric)} (mean over seeds, bars: std) against '
                  "inference time per image; bubble area proportional to the runs' peak memory, training included "
                  "(GPU when every run recorded it, else the process's peak RSS).</p>"]
    except BmadError as exc:
        parts.append(_note(f"efficiency plot not drawn: {exc}", notes, bench))

    parts.append("<h3>Anomaly maps</h3>")
    choice = _map_choice(results, records, bench)
    if choice is None:
        parts.append(_note("no run on this bench kept map samples (image-level algorithms return none; runs "
                           "recorded before map samples were kept need a rerun into a fresh results folder)",
                           notes, bench))
    else:
        algos, configs, seed = choice
        try:
            selection = select_map_runs(results, records, bench, algos, seed, configs)
            fig = map_grid(selection, find_bench(bench, records, data_root), n_maps)
            parts += [f'<div class="figure maps">{_png_img(fig, f"anomaly maps on {bench}")}</div>',
                      f'<p class="caption">Seed {seed}. Columns: the same test images for every algorithm. Rows: '
                      "the image, the ground truth (red, when the bench has masks; dashed white outline on the "
                      "maps), then each algorithm's map over the image (jet colormap, 50% opacity), min–max "
                      "normalised over that row's images, so colours compare within a row, not across rows; the "
                      "row label gives the raw range, each cell its image score.</p>"]
            parts += [_note(n, notes, bench) for n in selection.notes]
        except BmadError as exc:
            parts.append(_note(f"map grid not drawn: {exc}", notes, bench))
    parts.append("</section>")
    return "\n".join(parts)


def _note(text: str, notes: list[str], bench: str) -> str:
    notes.append(f"{bench}: {text}")
    return f'<p class="note">{html.escape(text)}</p>'


def build_report(results: Path, records: list[dict[str, Any]], benches: list[str], *,
                 data_root: Path | None = None, n_maps: int = 8, metric: str = "image_auroc",
                 skipped: int = 0) -> Report:
    """The report page for ``benches`` (keys with records in ``records``)."""
    from bmad import __version__

    notes: list[str] = []
    sections = [_bench_section(Path(results), records, b, data_root, n_maps, metric, notes) for b in benches]
    n_ok = sum(r["status"] == "ok" for r in records if r["bench"] in benches)
    n_all = sum(r["bench"] in benches for r in records)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    toc = " · ".join(f'<a href="#bench-{html.escape(b)}">{html.escape(b)}</a>' for b in benches)
    head = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>bmad report: {html.escape(', '.join(benches))}</title><style>{CSS}</style></head><body>\n"
        f"<header><h1>bmad report</h1>"
        f"<p>generated {now} by bmad {html.escape(__version__)} from {html.escape(str(results))}</p>"
        f"<p>{n_all} run records ({n_ok} ok, {n_all - n_ok} failed)"
        f"{f', {skipped} unreadable files skipped' if skipped else ''} · "
        f"{len(benches)} bench{'es' if len(benches) != 1 else ''}: {toc}</p></header>\n"
        "<main><p class='howto'><b>How to read.</b> Per bench: the leaderboard gives each metric as mean ± std "
        "over seeds in percent (best in bold, second underlined, third in italics; n = seeds done / asked for); "
        "the efficiency plot puts accuracy against inference time with bubble area for memory (up and left is "
        "better, smaller is lighter); the map grid shows where each algorithm finds the anomaly on the same test "
        "images.</p>\n"
    )
    page = head + "\n".join(sections) + "\n</main><footer>bmad " + html.escape(__version__) + "</footer></body></html>\n"
    return Report(page, notes)


def write_report(out: Path, report: Report) -> None:
    """Write the page atomically."""
    write_text_atomic(out, report.html)
