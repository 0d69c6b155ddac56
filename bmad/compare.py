"""Our leaderboard beside published numbers (``bmad leaderboard --compare SOURCE``).

The published numbers live in ``bmad/data/reference_results.json`` (one entry per paper,
table, bench, method and metric, in percent as printed). A leaderboard row is matched on
(bench, algorithm): a named config such as ``patchcore_r18`` is compared with its base
algorithm (``patchcore``), and every way our run's configuration or protocol differs from
the paper's is listed under the table. Few-shot entries carry their ``shots``: a row is
compared with the entry of its own shots (else the nearest); a zero-shot entry (``shots`` 0)
used no training image, so the training set is not compared.
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bmad.errors import DataError, UsageError
from bmad.leaderboard import METRIC_TITLES, Cell, Column, Row, Table
from bmad.records import METRIC_KEYS

# Parameters that do not change what a run computes (a weights file is the same weights from elsewhere).
IGNORED_PARAMS = frozenset({"weights"})
CONFIG_MARK = " ‡"
NOTE_MARK = "*"


@dataclass(frozen=True)
class Reference:
    """One published number: ``value`` and ``std`` in percent; ``algo`` None for a method that
    is not a bmad algorithm; ``variant`` names a non-default configuration of ``algo``, which
    ``config`` (our parameter values) reproduces, or nothing does (``config`` None)."""

    source: str
    table: str
    bench: str
    method: str
    algo: str | None
    metric: str
    value: float
    std: float | None
    variant: str | None = None
    config: dict[str, Any] | None = None
    shots: int | None = None
    flag: str | None = None
    note: str | None = None

    @property
    def comparable(self) -> bool:
        """Whether a run of ours can be this entry's configuration."""
        return self.algo is not None and (self.variant is None or self.config is not None)

    def text(self) -> str:
        """``mean ± std`` as printed, ``*`` when the entry carries a note."""
        value = f"{self.value:.2f}" + ("" if self.std is None else f" ± {self.std:.2f}")
        return value + (NOTE_MARK if self.note else "")


@dataclass
class References:
    """The reference file: its sources (key -> title, tables, protocol, ...) and entries."""

    sources: dict[str, dict[str, Any]]
    entries: list[Reference]
    path: str


ENTRY_KEYS = {"source": str, "table": str, "bench": str, "method": str, "metric": str}
OPTIONAL_KEYS = ("algo", "std", "variant", "config", "shots", "flag", "note")
FLAGS = ("copy_error", "inconsistent")


def default_reference_file() -> Path:
    """The reference file shipped with bmad."""
    return Path(str(importlib.resources.files("bmad") / "data" / "reference_results.json"))


def load_references(path: Path | None = None) -> References:
    """Read and check a reference file (default: the shipped one); a DataError names the entry
    and what is wrong with it."""
    path = Path(path) if path is not None else default_reference_file()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"cannot read the reference file {path}: {exc}",
                        hint="pass a valid JSON file to --references (see docs/reporting.md for its format)") from None
    if not isinstance(doc, dict) or doc.get("schema") != 1 or not isinstance(doc.get("sources"), dict) \
            or not all(isinstance(s, dict) for s in doc["sources"].values()) or not isinstance(doc.get("entries"), list):
        raise DataError(f"{path}: not a bmad reference file (needs schema 1, a 'sources' object of objects and an "
                        "'entries' list)", hint="see docs/reporting.md for the format")
    entries = []
    for i, raw in enumerate(doc["entries"]):
        try:
            entries.append(_entry(raw, doc["sources"]))
        except ValueError as exc:
            raise DataError(f"{path}: entry {i} ({json.dumps(raw, ensure_ascii=False)[:160]}): {exc}",
                            hint="fix or remove that entry") from None
    return References(doc["sources"], entries, str(path))


def _entry(raw: Any, sources: dict[str, Any]) -> Reference:
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    unknown = set(raw) - set(ENTRY_KEYS) - set(OPTIONAL_KEYS) - {"value"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    for key, kind in ENTRY_KEYS.items():
        if not isinstance(raw.get(key), kind) or not raw[key]:
            raise ValueError(f"'{key}' must be a non-empty string")
    if raw["source"] not in sources:
        raise ValueError(f"source {raw['source']!r} is not among the file's sources {sorted(sources)}")
    if raw["metric"] not in METRIC_KEYS:
        raise ValueError(f"metric {raw['metric']!r} is not one of {', '.join(METRIC_KEYS)}")
    value, std = raw.get("value"), raw.get("std")
    if not _number(value) or not 0 <= value <= 100:
        raise ValueError(f"value {value!r} is not a percentage in [0, 100]")
    if std is not None and (not _number(std) or not 0 <= std <= 100):
        raise ValueError(f"std {std!r} is not a percentage in [0, 100]")
    if raw.get("algo") is not None and not isinstance(raw["algo"], str):
        raise ValueError("'algo' must be a string or null")
    if raw.get("config") is not None and not isinstance(raw["config"], dict):
        raise ValueError("'config' must be an object (parameter -> value) or null")
    if any(isinstance(v, dict) and set(v) == {"one_of"} and not (isinstance(v["one_of"], list) and v["one_of"])
           for v in (raw.get("config") or {}).values()):
        raise ValueError("a config value {'one_of': ...} must hold a non-empty list of values")
    for key in ("variant", "note"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"'{key}' must be a string or null")
    if raw.get("flag") is not None and raw["flag"] not in FLAGS:
        raise ValueError(f"flag {raw['flag']!r} is not one of {FLAGS}")
    if raw.get("flag") and not raw.get("note"):
        raise ValueError("a flagged entry needs a 'note' saying what is wrong")
    shots = raw["shots"] if "shots" in raw else sources[raw["source"]].get("shots")
    if shots is not None and not (_number(shots) and isinstance(shots, int) and shots >= 0):
        raise ValueError(f"shots {shots!r} is neither null (the full training set) nor a number of shots (0: zero-shot)")
    return Reference(raw["source"], raw["table"], raw["bench"], raw["method"], raw.get("algo"), raw["metric"],
                     float(value), None if std is None else float(std), raw.get("variant"), raw.get("config"),
                     shots, raw.get("flag"), raw.get("note"))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_sources(spec: str, refs: References) -> list[str]:
    """``all`` or a comma list of source keys -> the keys; UsageError for an unknown one."""
    if spec.strip() == "all":
        return list(refs.sources)
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in refs.sources]
    if unknown or not keys:
        raise UsageError(f"--compare {spec!r}: unknown source {', '.join(unknown) or '(none given)'}",
                         hint=f"sources in {refs.path}: {', '.join(refs.sources)}, or all")
    return keys


@dataclass(frozen=True)
class AlgoInfo:
    """What a paper would have run for one of our algorithm names: the base algorithm and its
    published defaults (constructor defaults; None when the name is not registered here)."""

    base: str
    defaults: dict[str, Any] | None


@cache
def algo_info(algo: str) -> AlgoInfo:
    """The base algorithm of ``algo`` (itself, or the name its named config extends)."""
    from bmad import registry

    try:
        entry = registry.algorithms.get(algo)
    except UsageError:
        return AlgoInfo(algo, None)
    base = algo
    if entry.defaults:
        bases = [n for n in registry.algorithms.names()
                 if registry.algorithms.get(n).cls is entry.cls and not registry.algorithms.get(n).defaults]
        if bases:
            base = getattr(entry.cls, "name", "") if getattr(entry.cls, "name", "") in bases else bases[0]
    params = inspect.signature(entry.cls.__init__).parameters.values()
    return AlgoInfo(base, {p.name: p.default for p in params if p.default is not inspect.Parameter.empty})


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def same_value(ours: Any, expected: Any) -> bool:
    """Parameter equality across how configs are recorded: tuples are lists, a scalar size
    equals the square one (224 == [224, 224]), ``{"one_of": [...]}`` accepts any of its values."""
    if isinstance(expected, dict) and set(expected) == {"one_of"}:
        return any(same_value(ours, v) for v in expected["one_of"])
    a, b = _plain(ours), _plain(expected)
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if _number(x) and isinstance(y, list) and y and all(v == x for v in y):
            return True
    return False


def _show(v: Any) -> str:
    if isinstance(v, dict) and set(v) == {"one_of"}:
        v = v["one_of"][0]
    return v if isinstance(v, str) else json.dumps(_plain(v))


def differences(row: Row, bench: str, ref: Reference, info: AlgoInfo) -> list[str]:
    """How ``row``'s runs differ from the paper's configuration and protocol for ``ref``."""
    expected = {**(info.defaults or {}), **(ref.config or {})}
    out = [f"{k} {_show(row.config[k])} (paper: {_show(expected[k])})" for k in sorted(row.config)
           if k in expected and k not in IGNORED_PARAMS and not same_value(row.config[k], expected[k])]
    out += [f"{k} not recorded (paper: {_show(v)})" for k, v in (ref.config or {}).items() if k not in row.config]
    if info.defaults is None:
        out.append(f"{row.algo} is not registered here, so its configuration was not checked")
    if ref.shots != 0 and row.shots != ref.shots:  # a zero-shot method's number does not depend on it
        ours = f"{row.shots}-shot" if row.shots else "the full training set"
        theirs = f"{ref.shots}-shot" if ref.shots else "the full training set"
        out.append(f"trained on {ours} (paper: {theirs})")
    trained = {r.get("train_bench") for r in row.records} - {None, bench}
    if trained:
        out.append(f"trained on {', '.join(sorted(trained))} (paper: on {bench})")
    return out


@dataclass
class Match:
    """The reference entry a row is compared with, and how the row's runs differ from it."""

    ref: Reference
    differences: list[str]


# The full training set, counted as a number of shots larger than any bench's training set.
FULL_SET_SHOTS = 2**20


def shots_gap(ours: int | None, theirs: int | None) -> float:
    """How far apart two training-set sizes are, on a log scale (4 is nearer 8 than 32; the full
    set, ``None``, is nearest the largest K)."""
    a, b = (FULL_SET_SHOTS if s is None else s for s in (ours, theirs))
    return abs(math.log2(1 + a) - math.log2(1 + b))


def best_match(row: Row, bench: str, metric: str, source: str, refs: list[Reference]) -> Match | None:
    """The entry of ``source`` for (bench, base algorithm of ``row``, metric) whose configuration
    is closest to the row's (fewest differences; on a tie the paper's default configuration, then
    the nearest number of shots)."""
    info = algo_info(row.algo)
    found = []
    for ref in refs:
        if ref.source == source and ref.bench == bench and ref.metric == metric and ref.comparable \
                and ref.algo == info.base:
            diff = differences(row, bench, ref, info)
            found.append((len(diff), ref.variant is not None, shots_gap(row.shots, ref.shots), Match(ref, diff)))
    return min(found, key=lambda f: f[:3])[3] if found else None


def shots_text(shots: int | None) -> str:
    """``16-shot``, ``zero-shot``, or nothing for the full training set."""
    return "" if shots is None else "zero-shot" if shots == 0 else f"{shots}-shot"


def _with_shots(method: str, shots: list[int | None]) -> str:
    """A method and the training sets of its entries: ``AnoDDPM (4/8/16/32-shot)``; only the full set: the name."""
    ks = sorted({s for s in shots if s})
    parts = (["full"] if None in shots and len(set(shots)) > 1 else []) + (["zero-shot"] if 0 in shots else []) \
        + ([f"{'/'.join(map(str, ks))}-shot"] if ks else [])
    return f"{method} ({', '.join(parts)})" if parts else method


def add_comparison(tables: list[Table], refs: References, sources: list[str], missing: bool = False) -> list[str]:
    """Add, after each metric column, the published number of every source that has one for
    some row of the table and our difference (ours − published, points); with ``missing``,
    also rows for what the papers have and we have not run. Returns the legend lines."""
    used: dict[str, None] = {}
    for t in tables:
        on_bench = [r for r in refs.entries if r.bench == t.bench and r.source in sources]
        if not on_bench:
            t.notes.append(f"no published numbers for bench {t.bench!r} in {', '.join(sources)}")
            continue
        # (source, row index, metric) -> (entry, differences); paper-only rows get no differences
        found: dict[tuple[str, int, str], tuple[Reference, list[str]]] = {}
        for i, row in enumerate(t.rows):
            for s in sources:
                for m in t.metrics:
                    match = best_match(row, t.bench, m, s, on_bench)
                    if match is not None:
                        found[(s, i, m)] = (match.ref, match.differences)
        # a paper's printed row: one method (or variant) at one number of shots
        matched = {(ref.source, ref.method, ref.shots) for ref, _ in found.values()}
        unmatched = [r for r in on_bench if (r.source, r.method, r.shots) not in matched and r.metric in t.metrics]
        if missing:
            rows: dict[tuple[str, str, int | None], int] = {}
            for ref in unmatched:
                key = (ref.source, ref.method, ref.shots)
                if key not in rows:
                    rows[key] = len(t.rows)
                    tags = ["paper only"] + ([ref.source] if len(sources) > 1 else []) + \
                        ([shots_text(ref.shots)] if ref.shots is not None else [])
                    t.rows.append(Row(f"{ref.method} ({', '.join(tags)})", 0, 0, {m: Cell([]) for m in t.metrics}, 0,
                                      algo=ref.algo or "", shots=ref.shots, paper_only=True))
                found[(ref.source, rows[key], ref.metric)] = (ref, [])
        elif unmatched:
            by_method: dict[str, list[int | None]] = {}
            for r in unmatched:
                by_method.setdefault(r.method, []).append(r.shots)
            names = [_with_shots(m, by_method[m]) for m in sorted(by_method)]
            t.notes.append(f"published on {t.bench} but not run here: {', '.join(names)} "
                           "(--compare-missing shows their numbers)")
        config_notes: dict[str, None] = {}
        ref_notes: dict[tuple[str, str, str, str], list[str]] = {}
        for (s, i, m), (ref, diffs) in found.items():
            used[s] = None
            if ref.note:
                ref_notes.setdefault((s, ref.table, ref.method, ref.note), []).append(m)
            if diffs:
                t.label_marks[i] = CONFIG_MARK
                config_notes[f"{CONFIG_MARK.strip()} {t.rows[i].label}: compared with {s}'s {ref.method} "
                             f"({ref.algo}); different configuration: {'; '.join(diffs)}"] = None
            elif ref.variant and not t.rows[i].paper_only:
                params = ", ".join(f"{k}={_show(v)}" for k, v in (ref.config or {}).items())
                config_notes[f"{t.rows[i].label}: compared with {s}'s {ref.method}, the paper's variant "
                             f"'{ref.variant}' ({params})"] = None
        for s in sources:
            for m in t.metrics:
                of_row = {i: found[(src, i, mm)] for (src, i, mm) in found if src == s and mm == m}
                if not of_row:
                    continue
                diff = {i: 100 * t.rows[i].cells[m].mean - ref.value for i, (ref, _) in of_row.items()
                        if t.rows[i].cells[m].n}
                t.columns.append(Column("published" if len(sources) == 1 else s, m,
                                        {i: ref.text() for i, (ref, _) in of_row.items()}, {
                    f"{s}:mean_pct": {i: ref.value for i, (ref, _) in of_row.items()},
                    f"{s}:std_pct": {i: ref.std for i, (ref, _) in of_row.items()},
                    f"{s}:table": {i: ref.table for i, (ref, _) in of_row.items()},
                    f"{s}:flag": {i: ref.flag for i, (ref, _) in of_row.items()},
                    f"{s}:differences": {i: "; ".join(d) for i, (_, d) in of_row.items() if d},
                }))
                t.columns.append(Column("Δ", m, {i: f"{d:+.2f}" for i, d in diff.items()}, {f"{s}:diff_pts": diff}))
        t.notes += list(config_notes)
        for (s, table, method, note), metrics in ref_notes.items():
            names = ", ".join(METRIC_TITLES.get(m, m) for m in dict.fromkeys(metrics))
            t.notes.append(f"{NOTE_MARK} {s} Table {table}, {method} ({names}): {note}")
    legend = []
    for s in (s for s in sources if s in used):
        src = refs.sources[s]
        legend.append(f"{s}: {src.get('title', s)}; tables {src.get('tables', '?')}. Protocol: "
                      f"{src.get('protocol', 'not stated')}.")
    if used:
        legend.append("Published numbers as printed, mean ± std (%) where a std is given; Δ = ours − published, in "
                      f"points; – none. {NOTE_MARK} the paper's number has a note (under the table); "
                      f"{CONFIG_MARK.strip()} our runs differ from the paper's configuration or protocol "
                      "(under the table: each difference).")
    return legend
