"""The ``bmad`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bmad.errors import BmadError, UsageError


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per (bench, algo) (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:i (default cpu)")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding the benches ($BMAD_DATA, ./data)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results/)")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (offline tests, demo)")
    p.add_argument("--weights", default=None, help="explicit pretrained weights file for the backbone")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--save-maps", type=int, default=8, metavar="N",
                   help="keep the maps of N test images beside each record, for `bmad plot maps` (default 8; 0: none)")


def build_parser() -> argparse.ArgumentParser:
    from bmad import __version__

    parser = argparse.ArgumentParser(prog="bmad", description="Benchmark harness for medical image anomaly detection.")
    parser.add_argument("--version", action="version", version=f"bmad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="whole pipeline on a small synthetic bench, no download")
    _add_run_options(p)
    p.set_defaults(seeds=2)

    p = sub.add_parser("run", help="run algorithms on benches over seeds (resumable)")
    p.add_argument("--algo", help="algorithm names, comma list, or all")
    p.add_argument("--bench",
                   help="bench names, comma list, all (BMAD's six), clip (the CLIP papers' five), or folder:PATH")
    p.add_argument("--train-bench", default=None, metavar="BENCHES",
                   help="cross-bench transfer: train on each of these benches' normal data, test on each --bench")
    p.add_argument("--shots", type=int, default=None, help="few-shot: K normal training images per seed")
    p.add_argument("--param", action="append", default=[], metavar="[ALGO:]KEY=VALUE",
                   help="override a hyper-parameter (value parsed as JSON when possible), for every algorithm "
                        "or, with ALGO:, for that one only (e.g. utrad:epochs=20); repeatable")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this machine, one worker per visible GPU (default); ray: a Ray cluster")
    p.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: one per visible GPU with --device cuda, else 1)")
    p.add_argument("--address", default="auto",
                   help="Ray cluster address (default auto: this machine's cluster, or a local instance; "
                        "local: always a new local instance)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each Ray task asks for (default 1)")
    p.add_argument("--retry-failed", nargs="?", const="any", default=None, metavar="CAUSE",
                   help="rerun the runs recorded as failed under --results (only those failed for CAUSE, e.g. "
                        "out_of_memory, if given), each with its recorded configuration; --algo/--bench filter")
    _add_run_options(p)

    p = sub.add_parser("leaderboard", help="mean ± std tables from the run records")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--bench", default=None, help="comma list of benches (default all found)")
    p.add_argument("--metric", default=None, help="comma list of metrics (default all)")
    p.add_argument("--format", default="md", choices=["md", "latex", "csv", "html"])
    p.add_argument("--out", type=Path, default=None, help="write to this file (atomically) instead of stdout")
    p.add_argument("--compare", default=None, metavar="SOURCE",
                   help="published numbers beside ours, with the difference: a source of the reference file "
                        "(bmad-paper, lerec-thesis, clap, ppad, mediclip), a comma list, or all")
    p.add_argument("--compare-missing", action="store_true",
                   help="with --compare: also rows for the methods a paper has on a bench and we have not run")
    p.add_argument("--references", type=Path, default=None, metavar="FILE",
                   help="reference file for --compare (default: bmad's bmad/data/reference_results.json)")
    p.add_argument("--stats", action="store_true",
                   help="per bench and metric: test every row against the best one, paired by seed")
    p.add_argument("--test", choices=["ttest", "wilcoxon"], default=None,
                   help="the paired test of --stats (default ttest; a two-sided Wilcoxon needs 6+ seeds for p < 0.05)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="N",
                   help="95%% bootstrap confidence interval of image AUROC over the test images, N resamples "
                        "(e.g. 1000; needs records with per-image scores)")
    p.add_argument("--efficiency", action="store_true",
                   help="add inference ms/image, peak memory and parameter counts (means over seeds)")
    p.add_argument("--transfer", action="store_true",
                   help="cross-bench transfer matrices instead (runs made with `bmad run --train-bench`): per "
                        "algorithm, training bench x test bench, for the first --metric (default image AUROC)")

    p = sub.add_parser("list", help="list algorithms, benches or datasets")
    p.add_argument("what", choices=["algos", "benches", "datasets"])

    p = sub.add_parser("weights", help="pretrained weights (fetch them on a connected machine)")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wp = wsub.add_parser("fetch", help="download weights NAME (e.g. timm/resnet18.a1_in1k) into $BMAD_WEIGHTS")
    wp.add_argument("name")
    wp.add_argument("--to", type=Path, default=None, help="folder (default $BMAD_WEIGHTS)")

    p = sub.add_parser("plot", help="figures from the run records: efficiency bubbles, anomaly-map grids")
    fsub = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    fp = fsub.add_parser("efficiency", help="per bench: accuracy against inference time, bubble area = peak memory")
    fp.add_argument("--bench", default=None, help="comma list of benches (default all found)")
    fp.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results/)")
    fp.add_argument("--out", type=Path, default=None,
                    help="folder for efficiency_<bench>.png and .svg (default <results>/figures)")
    fp.add_argument("--metric", default="image_auroc", help="the accuracy axis (default image_auroc)")
    fp = fsub.add_parser("maps", help="test images, ground truth and each algorithm's anomaly map, in a grid")
    fp.add_argument("--bench", required=True, help="the bench")
    fp.add_argument("--algo", required=True, help="comma list of algorithms (one row each)")
    fp.add_argument("--n", type=int, default=8, help="test images, one column each (default 8; at most the run kept)")
    fp.add_argument("--seed", type=int, default=0, help="the runs' seed (default 0)")
    fp.add_argument("--config", default=None, metavar="HASH",
                    help="config hash (or prefix; comma list) for an algorithm with several configs "
                         "(default: the one run last)")
    fp.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results/)")
    fp.add_argument("--data-root", type=Path, default=None,
                    help="folder holding the bench, whose images the grid shows ($BMAD_DATA, ./data)")
    fp.add_argument("--out", type=Path, default=None,
                    help="PNG or SVG file (default <results>/figures/maps_<bench>.png)")

    p = sub.add_parser("report", help="one self-contained HTML page: leaderboards, efficiency plots, map grids")
    p.add_argument("--out", type=Path, default=None, help="HTML file, written atomically (default <results>/report.html)")
    p.add_argument("--bench", default=None, help="comma list of benches (default all found)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder (default results/)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding the benches, for the map grids ($BMAD_DATA, ./data)")
    p.add_argument("--n", type=int, default=8, help="test images per map grid (default 8)")
    p.add_argument("--metric", default="image_auroc", help="accuracy axis of the efficiency plots (default image_auroc)")

    p = sub.add_parser("prepare", help="reorganise a raw dataset into a bench folder")
    p.add_argument("--list", action="store_true", help="list the datasets and the raw layout each expects")
    psub = p.add_subparsers(dest="dataset", metavar="DATASET")
    from bmad.reorganizer import reorganizers

    for name in reorganizers.names():
        cls = reorganizers.get(name).cls
        dp = psub.add_parser(name, help=cls.description, description=f"{cls.description}\n\nraw layout:\n"
                             f"{cls.raw_layout}", formatter_class=argparse.RawDescriptionHelpFormatter)
        dp.add_argument("--out", type=Path, required=True, help="data root: the bench folder is written inside it")
        dp.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="parallel workers (default: CPU count, at most 8)")
        dp.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                        help="a bad input file: skip it and list it in skipped.csv (default), or stop")
        dp.add_argument("--overwrite", action="store_true", help="replace an existing, different bench folder")
        dp.add_argument("--no-progress", action="store_true")
        cls.add_arguments(dp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bmad`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if "--no-progress" in argv or not sys.stderr.isatty():
        # tqdm reads TQDM_* defaults when it is imported: this also quiets the bars of libraries
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(format="bmad: %(levelname)s: %(message)s", level=logging.WARNING)
    for name in ("bmad", "datasets_prep", "algorithms"):
        logging.getLogger(name).setLevel(logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except BmadError as exc:
        print(f"bmad: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        from bmad.fsutil import DISK_FULL, disk_full_error

        if exc.errno not in DISK_FULL:
            raise
        err = disk_full_error(exc.filename or "a file", exc)  # a write outside bmad.fsutil (a journal, a figure)
        print(f"bmad: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bmad: interrupted", file=sys.stderr)
        return 130


def _parse_params(items: list[str], algos: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--param`` items -> (parameters for every algorithm, parameters per algorithm)."""
    common: dict[str, Any] = {}
    per_algo: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        algo, colon, key = key.strip().rpartition(":")
        if not sep or not key:
            raise UsageError(f"--param {item!r} is not KEY=VALUE or ALGO:KEY=VALUE")
        if colon and algo not in algos:
            raise UsageError(f"--param {item!r} names algorithm {algo!r}, which is not in --algo",
                             hint=f"this sweep's algorithms: {', '.join(algos)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        (per_algo.setdefault(algo, {}) if colon else common)[key] = value
    return common, per_algo


def _parse_algos(text: str) -> list[str]:
    from bmad import registry

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError("--algo is empty", hint="give an algorithm name, a comma list, or `all`")
    out: list[str] = []
    for item in items:
        if item == "all":
            out += registry.names()
        else:
            registry.algorithms.get(item)  # raises the helpful error
            out.append(item)
    return list(dict.fromkeys(out))


def _sweep(args: argparse.Namespace, specs: list[Any], params: dict[str, Any],
           algo_params: dict[str, dict[str, Any]] | None = None) -> int:
    from bmad.executors import run_sweep
    from bmad.runner import SweepOptions

    opts = SweepOptions(
        results=args.results, data_root=args.data_root, device=args.device, random_init=args.random_init,
        weights=args.weights, params=params, algo_params=algo_params or {}, n_seeds=args.seeds, progress=_progress(args),
        save_maps=args.save_maps,
    )
    outcomes = run_sweep(specs, opts, getattr(args, "executor", "local"), workers=getattr(args, "workers", None),
                         address=getattr(args, "address", "auto"), cpus_per_run=getattr(args, "cpus_per_run", 1.0))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    print(f"runs: {counts['ok']} done, {counts['skipped']} already done, {counts['failed']} failed "
          f"(records under {args.results / 'runs'})")
    for o in outcomes:
        if o.status == "failed":
            print(f"  failed: {o.spec.bench}/{o.spec.algo}/seed{o.spec.seed}: {o.error}", file=sys.stderr)
    if counts["failed"]:
        print("  rerun the same command, or `bmad run --retry-failed`, to retry them", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal unless --no-progress (see :func:`main` for libraries' bars)."""
    return not args.no_progress and sys.stderr.isatty()


def cmd_run(args: argparse.Namespace) -> int:
    from bmad.benches import parse_bench_list
    from bmad.runner import failed_runs, plan

    _check_device(args.device)
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if args.shots is not None and args.shots < 1:
        raise UsageError("--shots must be at least 1")
    if args.retry_failed is not None:
        specs, notes = failed_runs(args.results, None if args.retry_failed == "any" else args.retry_failed)
        for note in notes:
            print(f"bmad: cannot retry {note}", file=sys.stderr)
        if args.algo:
            algos = set(_parse_algos(args.algo))
            specs = [s for s in specs if s.algo in algos]
        if args.bench:
            benches = set(parse_bench_list(args.bench))
            specs = [s for s in specs if s.bench in benches]
        if not specs:
            print(f"no failed runs to retry under {args.results / 'runs'}")
            return 1 if notes else 0
        return _sweep(args, specs, {})
    if not args.algo or not args.bench:
        raise UsageError("--algo and --bench are required (unless --retry-failed)")
    algos = _parse_algos(args.algo)
    train = parse_bench_list(args.train_bench) if args.train_bench else None
    specs = plan(parse_bench_list(args.bench), algos, args.seeds, args.shots, train)
    return _sweep(args, specs, *_parse_params(args.param, algos))


def cmd_demo(args: argparse.Namespace) -> int:
    from bmad.demo import run_demo

    _check_device(args.device)
    return run_demo(args)


def _emit(text: str, out: Path | None) -> int:
    """Write ``text`` to ``out`` (atomically) or stdout."""
    from bmad.fsutil import write_text_atomic

    if out:
        write_text_atomic(out, text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)
    return 0


def _transfer(args: argparse.Namespace, metrics: list[str] | None) -> int:
    from bmad.leaderboard import render
    from bmad.records import load_records
    from bmad.transfer import transfer_tables

    loaded = load_records(args.results)
    for path, why in loaded.skipped:
        print(f"bmad: skipped {path}: {why}", file=sys.stderr)
    records = loaded.records
    if args.bench:
        benches = {b.strip() for b in args.bench.split(",")}
        records = [r for r in records if r["bench"] in benches or r.get("train_bench") in benches]
    tables = transfer_tables(records, (metrics or ["image_auroc"])[0])
    if not tables:
        raise UsageError(f"no cross-bench runs under {args.results / 'runs'}",
                         hint="run e.g. `bmad run --algo patchcore --train-bench brats2021,resc --bench brats2021,resc`")
    return _emit(render(tables, args.format), args.out)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bmad.leaderboard import build_tables, render
    from bmad.records import METRIC_KEYS, load_records

    metrics = [m.strip() for m in args.metric.split(",")] if args.metric else None
    for m in metrics or []:
        if m not in METRIC_KEYS:
            raise UsageError(f"unknown metric {m!r}", hint=f"metrics: {', '.join(METRIC_KEYS)}")
    benches = [b.strip() for b in args.bench.split(",")] if args.bench else None
    if args.compare_missing and not args.compare:
        raise UsageError("--compare-missing needs --compare SOURCE", hint="e.g. --compare bmad-paper --compare-missing")
    if args.references and not args.compare:
        raise UsageError("--references needs --compare SOURCE")
    if args.test and not args.stats:
        raise UsageError(f"--test {args.test} needs --stats")
    if args.bootstrap is not None and args.bootstrap < 100:
        raise UsageError(f"--bootstrap {args.bootstrap}: use at least 100 resamples (1000 is usual)")
    if args.transfer:
        if args.compare or args.stats or args.bootstrap or args.efficiency:
            raise UsageError("--transfer cannot be combined with --compare, --stats, --bootstrap or --efficiency")
        return _transfer(args, metrics)
    refs = sources = None
    if args.compare:
        from bmad.compare import load_references, parse_sources

        refs = load_references(args.references)
        sources = parse_sources(args.compare, refs)
    loaded = load_records(args.results)
    for path, why in loaded.skipped:
        print(f"bmad: skipped {path}: {why}", file=sys.stderr)
    tables = build_tables(loaded.records, benches, metrics)
    if not tables:
        raise UsageError(f"no run records under {args.results / 'runs'}" + (f" for {args.bench}" if benches else ""),
                         hint="run `bmad run ...` or `bmad demo` first, or point --results at your results folder")
    legend: list[str] = []
    if args.stats:
        from bmad.stats import add_significance

        legend += add_significance(tables, args.test or "ttest")
    if args.bootstrap:
        from bmad.stats import add_bootstrap

        legend += add_bootstrap(tables, args.bootstrap)
    if refs is not None and sources is not None:
        from bmad.compare import add_comparison

        legend += add_comparison(tables, refs, sources, missing=args.compare_missing)
    if args.efficiency:
        from bmad.leaderboard import add_efficiency

        legend += add_efficiency(tables)
    if args.format == "csv":  # CSV carries data only: say what the notes under the tables would
        for t in tables:
            for note in t.notes:
                print(f"bmad: note: {t.bench}: {note}", file=sys.stderr)
    return _emit(render(tables, args.format, legend), args.out)


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    if args.what == "algos":
        from bmad.registry import algorithms

        rows = []
        for name in algorithms.names():
            e = algorithms.get(name)
            doc = (e.cls.__doc__ or "").strip().splitlines()
            rows.append([name, e.cls.family, "yes" if e.cls.pixel_level else "no", e.source,
                         ", ".join(f"{k}={v}" for k, v in e.defaults.items()) or (doc[0] if doc else "")])
        print(tabulate(rows, headers=["name", "family", "pixel-level", "source", "notes"]))
        _print_load_errors(algorithms)
    elif args.what == "benches":
        from bmad.benches import BENCHES, default_data_root

        root = default_data_root()
        rows = [[s.name, s.folder, s.domain, "yes" if s.pixel_masks else "no",
                 "yes" if (root / s.folder).is_dir() else "no", s.description] for s in BENCHES.values()]
        print(tabulate(rows, headers=["name", "folder", "domain", "pixel masks", f"in {root}", "description"]))
        print("\nfolder:PATH runs any folder in BMAD's layout.")
    else:
        from bmad.reorganizer import reorganizers

        rows = [[n, reorganizers.get(n).cls.bench, reorganizers.get(n).cls.description] for n in reorganizers.names()]
        print(tabulate(rows, headers=["dataset", "bench", "description"]))
        _print_load_errors(reorganizers)
    return 0


def _print_load_errors(reg: Any) -> None:
    errors = reg.errors()
    if errors:
        print(f"\n{len(errors)} plugin(s) failed to load:")
        for e in errors:
            print(f"  {e.entry_point} ({e.source}): {e.error}")


def cmd_prepare(args: argparse.Namespace) -> int:
    from bmad.reorganizer import reorganizers

    if args.list or not args.dataset:
        if not args.list:
            raise UsageError("name a dataset to prepare", hint="`bmad prepare --list` shows them")
        for name in reorganizers.names():
            cls = reorganizers.get(name).cls
            print(f"{name}  ->  bench {cls.bench} (folder {cls.folder}/)\n  {cls.description}")
            print("  raw layout:\n" + "\n".join(f"    {ln}" for ln in cls.raw_layout.strip().splitlines()) + "\n")
        _print_load_errors(reorganizers)
        return 0
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    cls = reorganizers.get(args.dataset).cls
    summary = cls.from_args(args).prepare(args.out, progress=_progress(args))
    print(summary.text())
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from bmad.weights import fetch

    try:
        path = fetch(args.name, args.to)
    except BmadError:
        raise
    except Exception as exc:  # network and hub errors: one clear line, not a traceback
        raise BmadError(
            f"could not download {args.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="run this on a machine with network access, then copy the file into $BMAD_WEIGHTS",
        ) from None
    print(f"saved {path}")
    return 0


def _records_for_figures(results: Path, metric: str | None = None) -> Any:
    """The records under ``results`` (a ``Loaded``; skipped files reported); UsageError when there are none."""
    from bmad.records import METRIC_KEYS, load_records

    if metric is not None and metric not in METRIC_KEYS:
        raise UsageError(f"unknown metric {metric!r}", hint=f"metrics: {', '.join(METRIC_KEYS)}")
    loaded = load_records(results)
    for path, why in loaded.skipped:
        print(f"bmad: skipped {path}: {why}", file=sys.stderr)
    if not loaded.records:
        raise UsageError(f"no run records under {results / 'runs'}",
                         hint="run `bmad run ...` or `bmad demo` first, or point --results at your results folder")
    return loaded


def cmd_plot(args: argparse.Namespace) -> int:
    from bmad import plots

    records = _records_for_figures(args.results, args.metric if args.figure == "efficiency" else None).records
    benches = plots.bench_keys(args.bench, records)
    if args.figure == "efficiency":
        paths = plots.plot_efficiency(records, benches, args.out or args.results / "figures", args.metric)
    else:
        if len(benches) != 1:
            raise UsageError(f"--bench {args.bench!r}: plot maps takes one bench")
        out = args.out or args.results / "figures" / f"maps_{benches[0]}.png"
        if out.suffix.lower() not in (".png", ".svg"):
            raise UsageError(f"--out {out}: the map grid is written as .png or .svg")
        algos = [a.strip() for a in args.algo.split(",") if a.strip()]
        configs = [c.strip() for c in args.config.split(",")] if args.config else None
        fig, notes = plots.plot_maps(args.results, records, benches[0], algos, n=args.n, seed=args.seed,
                                     data_root=args.data_root, configs=configs)
        for note in notes:
            print(f"bmad: note: {note}", file=sys.stderr)
        paths = plots.save_figure(fig, out, (out.suffix.lower()[1:],))
    for path in paths:
        print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bmad import plots
    from bmad.report import build_report, write_report

    if args.n < 1:
        raise UsageError("--n must be at least 1")
    loaded = _records_for_figures(args.results, args.metric)
    report = build_report(args.results, loaded.records, plots.bench_keys(args.bench, loaded.records),
                          data_root=args.data_root, n_maps=args.n, metric=args.metric, skipped=len(loaded.skipped))
    out = args.out or args.results / "report.html"
    write_report(out, report)
    for note in report.notes:
        print(f"bmad: note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def _check_device(device: str) -> None:
    import torch

    if device == "cpu":
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
        idx = device.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
        return
    raise UsageError(f"--device {device!r} is not cpu, cuda or cuda:i")


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "leaderboard": cmd_leaderboard,
    "list": cmd_list,
    "prepare": cmd_prepare,
    "weights": cmd_weights,
    "plot": cmd_plot,
    "report": cmd_report,
}

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
