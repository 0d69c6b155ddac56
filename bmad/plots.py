"""Figures from run records: efficiency bubbles (BMAD thesis Figure 3.9) and anomaly-map grids.

Everything is drawn on plain :class:`matplotlib.figure.Figure` objects (the Agg canvas, no
display, no pyplot state) and written atomically. See docs/reporting.md.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bmad.benches import Bench
from bmad.errors import DataError, UsageError
from bmad.fsutil import write_bytes_atomic
from bmad.leaderboard import METRIC_TITLES, Cell
from bmad.records import record_path

LOG_X_RATIO = 10.0  # inference times spanning at least this factor get a log x axis
BUBBLE_MAX_PT2 = 1800.0  # marker area (points²) of the largest memory on a plot


# ---------------------------------------------------------------- grouping


@dataclass
class RunGroup:
    """The ``ok`` records of one (algo, config) on one bench, one per seed (the latest)."""

    label: str
    algo: str
    config_hash: str
    records: list[dict[str, Any]]


def run_groups(records: list[dict[str, Any]], bench: str) -> list[RunGroup]:
    """Group a bench's records by (algo, config_hash) and label them as the leaderboard
    does (``algo``, `` (K-shot)``, `` [hash]`` when an algo has several configs); groups
    without an ``ok`` record are left out."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["bench"] == bench:
            groups.setdefault((r["algo"], r["config_hash"]), []).append(r)
    configs: dict[str, int] = {}
    for algo, _ in groups:
        configs[algo] = configs.get(algo, 0) + 1
    out = []
    for (algo, chash), recs in sorted(groups.items()):
        ok = list({r["seed"]: r for r in recs if r["status"] == "ok"}.values())
        if not ok:
            continue
        label = algo
        if recs[0].get("shots"):
            label += f" ({recs[0]['shots']}-shot)"
        if configs[algo] > 1:
            label += f" [{chash[:6]}]"
        out.append(RunGroup(label, algo, chash, sorted(ok, key=lambda r: r["seed"])))
    return out


def bench_keys(text: str | None, records: list[dict[str, Any]]) -> list[str]:
    """Benches named by ``--bench`` (comma list; ``folder:PATH`` becomes its record key),
    or every bench with records; UsageError for a bench without records."""
    from bmad.benches import folder_bench_key

    found = sorted({r["bench"] for r in records})
    if not text:
        return found
    keys = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key = folder_bench_key(Path(item[len("folder:"):])) if item.startswith("folder:") else item
        if key not in found:
            raise UsageError(f"no run records for bench {item!r}",
                             hint=f"benches with records: {', '.join(found) or 'none'} (check --results)")
        keys.append(key)
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------- efficiency


@dataclass
class EfficiencyPoint:
    """One algorithm (config) on the efficiency plot; times and memory are means over seeds."""

    label: str
    score: Cell
    ms_per_image: float
    memory_mb: float


def efficiency_points(records: list[dict[str, Any]], bench: str, metric: str = "image_auroc"
                      ) -> tuple[list[EfficiencyPoint], str]:
    """Points of one bench and the memory they show: ``"GPU"`` (peak GPU memory) when every
    point has it, else ``"RSS"`` (peak resident memory) for all, so bubbles compare.
    Groups without ``metric`` or without timings are left out."""
    groups = []
    for g in run_groups(records, bench):
        recs = [r for r in g.records if r["metrics"].get(metric) is not None and (r.get("timing") or {}).get(
            "ms_per_image") is not None]
        if recs:
            groups.append((g, recs))
    gpu = bool(groups) and all((r.get("memory") or {}).get("peak_gpu_mb") is not None
                               for _, recs in groups for r in recs)
    key = "peak_gpu_mb" if gpu else "peak_rss_mb"
    points = []
    for g, recs in groups:
        mem = [float(r["memory"][key]) for r in recs if (r.get("memory") or {}).get(key) is not None]
        points.append(EfficiencyPoint(
            g.label, Cell([float(r["metrics"][metric]) for r in recs]),
            float(np.mean([r["timing"]["ms_per_image"] for r in recs])), float(np.mean(mem)) if mem else 0.0,
        ))
    return points, "GPU" if gpu else "RSS"


def _nice_sizes(values: list[float]) -> list[float]:
    """Two or three round memory sizes (1-2-5 steps) spanning ``values``, for the legend."""
    lo, hi = min(values), max(values)
    nice = [m * 10.0**e for e in range(-1, 7) for m in (1, 2, 5)]
    top = max([v for v in nice if v <= hi] or [nice[0]])
    low = max([v for v in nice if v <= lo] or [nice[0]])
    picks = [top]
    mid = max([v for v in nice if v <= math.sqrt(top * max(low, 1e-9))] or [nice[0]])
    for v in (mid, low):
        if v < picks[-1] / 1.9:
            picks.append(v)
    return sorted(picks)


def efficiency_figure(records: list[dict[str, Any]], bench: str, metric: str = "image_auroc") -> Figure:
    """``metric`` (mean over seeds, std as error bars) against inference ms/image, bubble
    area proportional to peak memory, one labelled point per algorithm (config).

    The scatter of points has gid ``"points"``; UsageError when no record of ``bench``
    has ``metric``."""
    points, kind = efficiency_points(records, bench, metric)
    if not points:
        raise UsageError(f"no ok run of bench {bench!r} has {metric} and a recorded inference time",
                         hint="image-level algorithms have no pixel metrics; try --metric image_auroc")
    x = np.array([p.ms_per_image for p in points])
    y = np.array([100 * p.score.mean for p in points])
    err = np.array([100 * p.score.std for p in points])
    mem = np.array([p.memory_mb for p in points])
    scale = BUBBLE_MAX_PT2 / max(float(mem.max()), 1e-9)

    fig = Figure(figsize=(8.5, 5.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [matplotlib.colormaps["tab20"](i % 20) for i in range(len(points))]
    ax.errorbar(x, y, yerr=err, fmt="none", ecolor="0.35", elinewidth=1, capsize=3, zorder=2)
    ax.scatter(x, y, s=mem * scale, c=colors, alpha=0.55, edgecolors="0.2", linewidths=0.8, zorder=3, gid="points")
    ax.scatter(x, y, s=6, c="0.1", zorder=4)
    if x.min() > 0 and x.max() / x.min() >= LOG_X_RATIO:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("inference time (ms / image, mean over seeds)")
    ax.set_ylabel(f"{METRIC_TITLES.get(metric, metric)} (%, mean ± std over seeds)")
    ax.set_title(f"{bench}: accuracy vs. inference time (bubble area = peak {kind} memory)")
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", markersize=math.sqrt(v * scale), markerfacecolor="0.8",
                      markeredgecolor="0.2", label=f"{v:g} MB") for v in _nice_sizes(list(mem))]
    ax.legend(handles=handles, title=f"peak {kind}", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False,
              labelspacing=2.2, borderpad=1.2, handletextpad=1.5)
    _place_labels(fig, ax, [p.label for p in points], x, y)
    return fig


_LABEL_OFFSETS = ((6, 4, "left"), (6, -11, "left"), (-6, 4, "right"), (-6, -11, "right"),
                  (6, 14, "left"), (6, -21, "left"), (-6, 14, "right"), (-6, -21, "right"))


def _place_labels(fig: Figure, ax: Any, labels: list[str], x: np.ndarray, y: np.ndarray) -> None:
    """Annotate each point, trying a few offsets so that labels do not overlap (greedy,
    top to bottom); the last try stays when all overlap."""
    fig.canvas.draw()  # settles the layout and the axis limits the label boxes depend on
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for i in np.argsort(-y):
        for dx, dy, ha in _LABEL_OFFSETS:
            text = ax.annotate(labels[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                               ha=ha, zorder=5)
            box = text.get_window_extent(renderer).expanded(1.04, 1.1)
            if not any(box.overlaps(b) for b in placed) or (dx, dy, ha) == _LABEL_OFFSETS[-1]:
                placed.append(box)
                break
            text.remove()


def figure_bytes(fig: Figure, fmt: str, dpi: int = 130) -> bytes:
    """The figure encoded as ``fmt`` (png or svg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``fig`` atomically as ``path`` with each suffix in ``formats``; returns the paths."""
    out = []
    for fmt in formats:
        p = Path(path).with_suffix(f".{fmt}")
        write_bytes_atomic(p, figure_bytes(fig, fmt))
        out.append(p)
    return out


def plot_efficiency(records: list[dict[str, Any]], benches: list[str], out_dir: Path,
                    metric: str = "image_auroc") -> list[Path]:
    """``efficiency_<bench>.png`` and ``.svg`` in ``out_dir`` for each bench; returns the paths."""
    paths = []
    for bench in benches:
        paths += save_figure(efficiency_figure(records, bench, metric), Path(out_dir) / f"efficiency_{bench}")
    return paths


# ---------------------------------------------------------------- anomaly maps


@dataclass
class MapRun:
    """One algorithm's stored map sample (``seed<k>.maps.npz``) for a bench and seed."""

    algo: str
    label: str  # as in the leaderboard: with the config hash when the algo has several configs
    config_hash: str
    seed: int
    record: dict[str, Any]
    index: np.ndarray
    files: list[str]
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray


@dataclass
class MapSelection:
    """The map samples chosen for a grid, and notes for the user (a choice made for them)."""

    bench: str
    runs: list[MapRun]
    notes: list[str]


def record_mtime(results: Path, rec: dict[str, Any]) -> float:
    """When ``rec``'s file was written (0 when it is not under ``results``)."""
    p = record_path(results, rec["bench"], rec["algo"], rec["config_hash"], rec["seed"])
    return p.stat().st_mtime if p.exists() else 0.0


def select_map_runs(results: Path, records: list[dict[str, Any]], bench: str, algos: list[str], seed: int = 0,
                    configs: list[str] | None = None) -> MapSelection:
    """Find each algorithm's map sample for ``bench`` and ``seed``.

    An algorithm with several configs on the bench uses the one run most recently, unless
    ``configs`` (config-hash prefixes) names one. UsageError with what to do for a bench or
    algorithm without records, a missing seed, or a run that kept no maps."""
    results = Path(results)
    on_bench = [r for r in records if r["bench"] == bench]
    if not on_bench:
        found = sorted({r["bench"] for r in records})
        raise UsageError(f"no run records for bench {bench!r} under {results / 'runs'}",
                         hint=f"benches with records: {', '.join(found) or 'none'}")
    prefixes = [c for c in (configs or []) if c]
    for c in prefixes:
        if not any(r["config_hash"].startswith(c) and r["algo"] in algos for r in on_bench):
            raise UsageError(f"--config {c}: no config hash of {', '.join(algos)} on {bench} starts with {c!r}",
                             hint="the hashes are the folder names under runs/<bench>/<algo>/")
    runs, notes = [], []
    for algo in algos:
        recs = [r for r in on_bench if r["algo"] == algo and r["status"] == "ok"]
        if not recs:
            have = sorted({r["algo"] for r in on_bench if r["status"] == "ok"})
            raise UsageError(f"no ok run of algorithm {algo!r} on bench {bench!r}",
                             hint=f"algorithms with ok runs on {bench}: {', '.join(have) or 'none'}")
        hashes = sorted({r["config_hash"] for r in recs})
        named = [h for h in hashes if any(h.startswith(c) for c in prefixes)]
        if len(named) > 1:
            raise UsageError(f"--config matches several configs of {algo} on {bench}: {', '.join(named)}",
                             hint="give a longer prefix")
        if named:
            chash = named[0]
        else:
            chash = max(hashes, key=lambda h: max(record_mtime(results, r) for r in recs if r["config_hash"] == h))
            if len(hashes) > 1:
                notes.append(f"{algo} has {len(hashes)} configs on {bench}: using the latest run, {chash} "
                             f"(others: {', '.join(h for h in hashes if h != chash)}; choose with --config HASH)")
        rec = next((r for r in recs if r["config_hash"] == chash and r["seed"] == seed), None)
        if rec is None:
            seeds = sorted(r["seed"] for r in recs if r["config_hash"] == chash)
            raise UsageError(f"{algo} ({chash}) on {bench} has no ok run with seed {seed}",
                             hint=f"seeds with ok runs: {', '.join(map(str, seeds))}; pass --seed")
        pixel_bench = any(r["metrics"].get("pixel_auroc") is not None for r in on_bench)
        label = next(g.label for g in run_groups(records, bench) if (g.algo, g.config_hash) == (algo, chash))
        runs.append(_load_map_run(results, rec, label, pixel_bench))
    return MapSelection(bench, runs, notes)


def _load_map_run(results: Path, rec: dict[str, Any], label: str, pixel_bench: bool) -> MapRun:
    where = f"{rec['algo']} on {rec['bench']} (config {rec['config_hash']}, seed {rec['seed']})"
    sample = rec.get("map_sample")
    if not sample:
        if "per_image" not in rec:
            bench_arg = (rec.get("run") or {}).get("bench") or rec["bench"]
            raise UsageError(
                f"the run of {where} predates stored map samples",
                hint=f"rerun it into a fresh results folder (`bmad run --algo {rec['algo']} --bench {bench_arg} "
                     f"--seeds {rec['seed'] + 1} ... --results NEW`: a rerun into the same folder is skipped, the run "
                     "being recorded already), then pass --results NEW",
            )
        image_level = pixel_bench and rec["metrics"].get("pixel_auroc") is None
        raise UsageError(
            f"the run of {where} kept no anomaly maps"
            + (f": {rec['algo']} is an image-level algorithm (it returns no maps)" if image_level else
               ": the algorithm returned no maps (image-level) or the run used --save-maps 0"),
            hint="choose pixel-level algorithms (`bmad list algos`, column pixel-level), or rerun with --save-maps N",
        )
    path = record_path(results, rec["bench"], rec["algo"], rec["config_hash"], rec["seed"]).with_name(sample["file"])
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in ("index", "files", "labels", "scores", "maps")}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read the map sample {path} of {where}: {exc}",
                        hint="rerun that run into a fresh results folder") from None
    return MapRun(rec["algo"], label, rec["config_hash"], rec["seed"], rec, data["index"].astype(int),
                  [str(f) for f in data["files"]], data["labels"].astype(int), data["scores"].astype(float),
                  data["maps"].astype(np.float32))


def find_bench(bench: str, records: list[dict[str, Any]], data_root: Path | None = None) -> Bench:
    """The bench folder holding ``bench``'s images, for a map grid: a named bench under
    ``data_root`` (the default data root when None); a ``folder-`` bench at
    ``data_root/<name>`` or where it was run from. DataError pointing at ``--data-root``
    when absent."""
    from bmad.benches import BENCHES, resolve_bench

    if bench in BENCHES:
        try:
            return resolve_bench(bench, data_root)
        except DataError as exc:
            raise DataError(f"the map grid needs the images of bench {bench!r}, and they are not there: "
                            f"{str(exc).splitlines()[0]}",
                            hint=f"point --data-root at the folder holding {BENCHES[bench].folder}/") from None
    name = bench[len("folder-"):] if bench.startswith("folder-") else bench
    candidates = [Path(data_root) / name, Path(data_root)] if data_root is not None else []
    candidates += [Path(r["run"]["bench"][len("folder:"):]) for r in records
                   if r["bench"] == bench and str((r.get("run") or {}).get("bench", "")).startswith("folder:")]
    for c in dict.fromkeys(candidates):
        if (c / "test").is_dir():
            return resolve_bench(f"folder:{c}")
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates)) or "no recorded location"
    raise DataError(f"the map grid needs the images of bench {bench!r}: no bench folder found (tried {tried})",
                    hint=f"point --data-root at the folder that holds the bench folder {name}/")


_MASK_CMAP = ListedColormap(["#ff1744"])


def _gray_or_rgb(img: np.ndarray) -> np.ndarray:
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def map_grid(selection: MapSelection, bench: Bench, n: int = 8) -> Figure:
    """A grid with one column per test image (the same images for every algorithm) and
    rows: the image, its ground-truth mask (when the bench has masks), then each
    algorithm's map over the image, min-max normalised over the maps in that row.

    Artists carry gids for inspection: ``image``, ``mask`` (the mask as an image) and
    ``map`` (the normalised map)."""
    from bmad.data import list_split, read_image, read_mask

    runs = selection.runs
    common = set(runs[0].index.tolist())
    for r in runs[1:]:
        common &= set(r.index.tolist())
    if not common:
        raise UsageError(f"the map samples of {', '.join(r.algo for r in runs)} on {selection.bench} share no "
                         "test image (runs made with different --save-maps)",
                         hint="rerun them with the same --save-maps, or plot them separately")
    order = sorted(common)
    if n < len(order):
        order = [order[i] for i in np.linspace(0, len(order) - 1, n).round().astype(int)]
    ref = runs[0]
    pos = {int(i): k for k, i in enumerate(ref.index)}
    files = [ref.files[pos[i]] for i in order]
    labels = [int(ref.labels[pos[i]]) for i in order]

    root = bench.root
    samples = {s.path.relative_to(root).as_posix(): s for s in list_split(root, "test")}
    missing = [f for f in files if f not in samples]
    if missing:
        raise DataError(f"{root} is not the folder these runs used: it has no {missing[0]}",
                        hint="point --data-root at the folder holding the bench the runs were made on")
    has_masks = any(s.mask is not None for s in samples.values())
    manifest = ref.record.get("data", {}).get("manifest_sha256")
    if manifest and bench.manifest_sha256() != manifest:
        selection.notes.append(f"{root} differs from the bench folder the runs used (manifest hash): "
                               "the images may not match the maps")

    images = [_gray_or_rgb(read_image(root / f)) for f in files]
    masks = [read_mask(samples[f].mask) if samples[f].mask is not None else None for f in files]
    per_algo = []
    for r in runs:
        p = {int(i): k for k, i in enumerate(r.index)}
        maps = np.stack([r.maps[p[i]] for i in order])
        lo, hi = float(maps.min()), float(maps.max())
        per_algo.append((r, [float(r.scores[p[i]]) for i in order], (maps - lo) / (hi - lo or 1.0), lo, hi))

    nrows = 1 + int(has_masks) + len(runs)
    ncols = len(order)
    cell = 1.55
    fig = Figure(figsize=(1.3 + cell * ncols, 0.6 + cell * 1.12 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for j, (img, mask, label) in enumerate(zip(images, masks, labels)):
        h, w = img.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        ax = axes[0, j]
        ax.imshow(img, gid="image", **gray)
        ax.set_title(f"#{order[j]} {'anomalous' if label else 'normal'}", fontsize=8,
                     color="#b00020" if label else "#1b5e20")
        rows = axes[1:, j]
        if has_masks:
            ax = axes[1, j]
            ax.imshow(img, **gray)
            if mask is not None and mask.any():
                ax.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap=_MASK_CMAP, alpha=0.35, gid="mask",
                          extent=extent, vmin=0, vmax=1)
                ax.contour(mask.astype(float), levels=[0.5], colors="#ff1744", linewidths=1.0)
            rows = axes[2:, j]
        for ax, (_, scores, maps, _, _) in zip(rows, per_algo):
            ax.imshow(img, **gray)
            ax.imshow(maps[j], cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=extent, interpolation="bilinear",
                      gid="map")
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.6, linestyles="dashed")
            ax.set_xlabel(f"score {scores[j]:.3g}", fontsize=7, labelpad=2)
    axes[0, 0].set_ylabel("image", fontsize=9)
    if has_masks:
        axes[1, 0].set_ylabel("ground truth", fontsize=9)
    for ax, (r, _, _, lo, hi) in zip(axes[1 + int(has_masks):, 0], per_algo):
        ax.set_ylabel(f"{r.label}\nmaps {lo:.3g}–{hi:.3g}", fontsize=9)
    fig.suptitle(f"{selection.bench}: anomaly maps (seed {runs[0].seed}); each row min–max normalised over its "
                 "images (row label: raw range)", fontsize=10)
    return fig


def plot_maps(results: Path, records: list[dict[str, Any]], bench: str, algos: list[str], *, n: int = 8,
              seed: int = 0, data_root: Path | None = None, configs: list[str] | None = None
              ) -> tuple[Figure, list[str]]:
    """The map grid of ``algos`` on ``bench`` (see :func:`map_grid`) and notes for the user."""
    if n < 1:
        raise UsageError("--n must be at least 1")
    selection = select_map_runs(results, records, bench, algos, seed, configs)
    fig = map_grid(selection, find_bench(bench, records, data_root), n)
    return fig, selection.notes
