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


def build_parser() -> argparse.ArgumentParser:
    from bmad import __version__

    parser = argparse.ArgumentParser(prog="bmad", description="Benchmark harness for medical image anomaly detection.")
    parser.add_argument("--version", action="version", version=f"bmad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="whole pipeline on a small synthetic bench, no download")
    _add_run_options(p)
    p.set_defaults(seeds=2)

    p = sub.add_parser("run", help="run algorithms on benches over seeds (resumable)")
    p.add_argument("--algo", required=True, help="algorithm names, comma list, or all")
    p.add_argument("--bench", required=True, help="bench names, comma list, all, or folder:PATH")
    p.add_argument("--shots", type=int, default=None, help="few-shot: K normal training images per seed")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyper-parameter (value parsed as JSON when possible); repeatable")
    p.add_argument("--executor", choices=["local"], default="local", help="where runs execute (default local)")
    _add_run_options(p)

    p = sub.add_parser("leaderboard", help="mean ± std tables from the run records")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--bench", default=None, help="comma list of benches (default all found)")
    p.add_argument("--metric", default=None, help="comma list of metrics (default all)")
    p.add_argument("--format", default="md", choices=["md", "latex", "csv", "html"])
    p.add_argument("--out", type=Path, default=None, help="write to this file (atomically) instead of stdout")

    p = sub.add_parser("list", help="list algorithms, benches or datasets")
    p.add_argument("what", choices=["algos", "benches", "datasets"])

    p = sub.add_parser("weights", help="pretrained weights (fetch them on a connected machine)")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wp = wsub.add_parser("fetch", help="download weights NAME (e.g. timm/resnet18.a1_in1k) into $BMAD_WEIGHTS")
    wp.add_argument("name")
    wp.add_argument("--to", type=Path, default=None, help="folder (default $BMAD_WEIGHTS)")

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
    except KeyboardInterrupt:
        print("bmad: interrupted", file=sys.stderr)
        return 130


def _parse_params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--param {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


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


def _sweep(args: argparse.Namespace, benches: list[str], algos: list[str], shots: int | None,
           params: dict[str, Any]) -> int:
    from bmad.runner import Sweep, SweepOptions, plan

    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if shots is not None and shots < 1:
        raise UsageError("--shots must be at least 1")
    opts = SweepOptions(
        results=args.results, data_root=args.data_root, device=args.device, random_init=args.random_init,
        weights=args.weights, params=params, n_seeds=args.seeds, progress=_progress(args),
    )
    outcomes = Sweep(opts).run_all(plan(benches, algos, args.seeds, shots))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    print(f"runs: {counts['ok']} done, {counts['skipped']} already done, {counts['failed']} failed "
          f"(records under {args.results / 'runs'})")
    for o in outcomes:
        if o.status == "failed":
            print(f"  failed: {o.spec.bench}/{o.spec.algo}/seed{o.spec.seed}: {o.error}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal unless --no-progress (see :func:`main` for libraries' bars)."""
    return not args.no_progress and sys.stderr.isatty()


def cmd_run(args: argparse.Namespace) -> int:
    from bmad.benches import parse_bench_list

    _check_device(args.device)
    return _sweep(args, parse_bench_list(args.bench), _parse_algos(args.algo), args.shots, _parse_params(args.param))


def cmd_demo(args: argparse.Namespace) -> int:
    from bmad.demo import run_demo

    _check_device(args.device)
    return run_demo(args)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bmad.fsutil import write_text_atomic
    from bmad.leaderboard import build_tables, render
    from bmad.records import METRIC_KEYS, load_records

    metrics = [m.strip() for m in args.metric.split(",")] if args.metric else None
    for m in metrics or []:
        if m not in METRIC_KEYS:
            raise UsageError(f"unknown metric {m!r}", hint=f"metrics: {', '.join(METRIC_KEYS)}")
    benches = [b.strip() for b in args.bench.split(",")] if args.bench else None
    loaded = load_records(args.results)
    for path, why in loaded.skipped:
        print(f"bmad: skipped {path}: {why}", file=sys.stderr)
    tables = build_tables(loaded.records, benches, metrics)
    if not tables:
        raise UsageError(f"no run records under {args.results / 'runs'}" + (f" for {args.bench}" if benches else ""),
                         hint="run `bmad run ...` or `bmad demo` first, or point --results at your results folder")
    text = render(tables, args.format)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


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
}

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
