"""Overhead of bmad's anomalib wrapper vs the bare torch module and anomalib's Engine (run by hand).

    python benchmarks/wrapper_overhead.py                       # defaults below, ~10 min on 2 cores
    python benchmarks/wrapper_overhead.py --repeats 5 --json out.json
    python benchmarks/wrapper_overhead.py --algos padim_r18 --paths bmad bare --profile

One generated bench (``tests/conftest.py::make_bench``: smooth grayscale background,
bright disc anomalies; PNG, ``--size`` px square, ``--n-train`` normal training
images, ``--n-test`` test images half normal half anomalous with masks, no valid
split) is shared by every path. Each algorithm's config (``patchcore_r18``,
``padim_r18``, ``stfpm_r18`` with ``--epochs``) is run on random-init backbones on
CPU along four paths:

``bmad``
    ``bmad.runner._execute`` (what ``bmad run`` calls): bmad's loaders read the PNGs,
    the algorithm's ``fit`` / ``predict_map`` run; fit and predict seconds are the
    runner's own timers (``record["timing"]``: predict includes reading the test
    images and masks and copying the maps into the evaluation array, not the metrics).
``bare``
    the same anomalib Lightning module (built like the adapter does), its torch model
    ``lm.model`` driven by a plain loop over tensors that are read, replicated to 3
    channels and ImageNet-normalised before the clock starts (no loaders):
    memory-bank models forward every training batch then ``lm.fit()``; STFPM runs
    ``lm.model`` + ``lm.loss`` + SGD (bmad's settings) per batch; predict is
    ``lm.model(x)`` per test batch under ``no_grad``.
``engine`` / ``engine_default``
    anomalib's own path: the model with its own pre-processor (resize to ``--size`` +
    ImageNet normalisation; no post-processor, evaluator or visualizer, so the
    outputs are raw like bmad's), anomalib's ``Folder`` datamodule over the same PNG
    folders (``num_workers=0`` like bmad's loaders, no validation split, batch 32),
    ``Engine(barebones=True)`` (``engine``) or ``Engine()`` with its defaults
    (``engine_default``: checkpoint callback writing to a temporary folder, progress
    bar), ``accelerator="cpu"``; timed ``engine.fit`` and ``engine.predict``.

Each (path, algorithm) runs in a fresh process; the runs are interleaved (repeat 1
of every case, then repeat 2, ...) so that load from other jobs spreads over all
paths, and the table reports the median of ``--repeats``. Before its clock starts
every process warms the CPU kernels with one forward of a throwaway resnet18 on a
batch of the same shape (so first-call oneDNN set-up is in no path's time); model
construction (and ``import anomalib``) is outside the timed part everywhere.
Every model is built with the same seed, so all paths start from the same weights.

The ``bmad`` process also measures inference throughput on one batch of
``--batch`` test images already in memory (median of ``--tp-repeats`` interleaved
calls): ``predict_map`` (bmad's method), ``lm.model(x)`` on the normalised batch
(the bare module) and the backbone alone (the timm feature extractor inside the
model: ``lm.model.feature_extractor``; STFPM's teacher ``lm.model.teacher_model``,
its student is a second network of the same size). It also times the pieces of
bmad's own work: one pass over the train loader and over the test loader (read,
decode, channel replication, masks, collate), normalisation (``_prepare``), and the
``Prediction`` conversion plus the runner's map copy; their sum, scaled to the run
(epochs x train loading + test loading + one normalisation per batch + one conversion
per test batch), is the bottom-up estimate of bmad's extra work, which is less
exposed to the machine's load than the difference of two wall times. ``--profile``
adds a cProfile of the bmad path (top functions by cumulative time) to the output.

Memory: processes run with glibc's default malloc settings, as a user's would.
PatchCore's coreset differs between the paths on purpose: bmad selects the same
points as anomalib's ``KCenterGreedy`` (bit for bit, tested) without its per-point
N x d temporaries (``algorithms/patchcore/coreset.py``); the bare and Engine paths run
anomalib's. ``--mmap-threshold N`` sets ``MALLOC_MMAP_THRESHOLD_=N`` in every process
(``131072`` keeps anomalib's coreset from fragmenting the heap, at the cost of a page
fault per page of every large temporary). ``--mem-cap-gb`` (default 12) caps each
process's address space, so a runaway fails with an allocation error instead of the
kernel's OOM killer choosing some other job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ALGOS = ("patchcore_r18", "padim_r18", "stfpm_r18", "patchcore", "padim", "stfpm")
DEFAULT_ALGOS = ALGOS[:3]  # the wide-ResNet-50 configs take ~10x longer on a CPU
PATHS = ("bmad", "bare", "engine", "engine_default")
ANOMALIB_CLASS = {"patchcore": "Patchcore", "padim": "Padim", "stfpm": "Stfpm"}  # by family (name before "_")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- data ----------------------------------------------------------------------------------
def write_bench(root: Path, size: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """The generated bench of the tests (PNG files in BMAD's layout)."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_bench

    n_bad = n_test // 2
    return make_bench(root, n_train=n_train, n_valid=(0, 0), n_test=(n_test - n_bad, n_bad), size=size, seed=seed)


# -- helpers shared by the worker paths -----------------------------------------------------
def seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warm_up(batch: int, size: int) -> None:
    """One forward of a throwaway resnet18 at the timed shape (CPU kernel set-up)."""
    import timm
    import torch

    net = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        net(torch.randn(batch, 3, size, size))


def model_kwargs(algo: str) -> dict[str, Any]:
    """The anomalib constructor arguments of a registered bmad config (read from bmad)."""
    import algorithms  # noqa: F401  (registers)
    from bmad import registry

    return registry.create(algo, pretrained=False).model_kwargs()


def build_module(algo: str, pre_processor: Any) -> Any:
    """The anomalib Lightning module, random init, raw outputs (as the adapter builds it)."""
    import inspect
    import warnings

    from bmad.weights import offline_random_init

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import anomalib.models

    cls = getattr(anomalib.models, ANOMALIB_CLASS[algo.split("_")[0]])
    kwargs = model_kwargs(algo)
    if "pre_trained" in inspect.signature(cls).parameters:
        kwargs["pre_trained"] = False
    if pre_processor is True:
        pre_processor = cls.configure_pre_processor(image_size=(SIZE, SIZE))
    with offline_random_init():
        return cls(**kwargs, pre_processor=pre_processor, post_processor=False, evaluator=False, visualizer=False)


def backbone_of(lm: Any) -> Any:
    model = lm.model
    return model.teacher_model if hasattr(model, "teacher_model") else model.feature_extractor


def load_split(bench: Path, split: str) -> Any:
    """All images of a split as one float tensor [N, 3, H, W] in [0, 1] (bmad's reader)."""
    import torch

    from bmad.data import list_split, read_image, to_channels

    imgs = [to_channels(torch.from_numpy(read_image(s.path)), 3) for s in list_split(bench, split)]
    return torch.stack(imgs).contiguous() if imgs else torch.empty(0, 3, SIZE, SIZE, dtype=torch.float32)


def normalise(x: Any) -> Any:
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# -- the paths ------------------------------------------------------------------------------
def run_bmad(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    import algorithms  # noqa: F401
    from bmad.algorithm import Prediction
    from bmad.benches import resolve_bench
    from bmad.data import list_split, make_loader, resize_maps
    from bmad.runner import RunSpec, SweepOptions, _execute, build_algorithm

    algo_name = cfg["algo"]
    params: dict[str, Any] = {"input_size": SIZE}
    if algo_name.startswith("stfpm"):
        params["epochs"] = cfg["epochs"]
    opts = SweepOptions(random_init=True, params=params, batch_size=cfg["batch"], progress=False, verbose=False)
    bench = resolve_bench(f"folder:{cfg['bench']}")
    algo = build_algorithm(algo_name, opts)
    spec = RunSpec(bench.name, algo_name, 0)
    # the runner seeds, then builds the module in ``algo.to``; build it here after the same seed (same
    # weights) so that a --profile shows fit and predict, not ``import anomalib``; ``_execute`` seeds again
    seed_all(0)
    algo.build()
    warm_up(cfg["batch"], SIZE)

    # CPU seconds of the runner's two timed spans: fit (hooked on ``algo.fit``) and predict (from fit's
    # return to the runner's call of ``metrics.compute_all`` right after its predict loop)
    import bmad.metrics

    cpu: dict[str, float] = {}
    fit_method, compute_all = algo.fit, bmad.metrics.compute_all

    def fit_hook(*a: Any, **k: Any) -> None:
        cpu["fit0"] = time.process_time()
        fit_method(*a, **k)
        cpu["fit1"] = time.process_time()

    def compute_all_hook(*a: Any, **k: Any) -> Any:
        cpu["predict1"] = time.process_time()
        return compute_all(*a, **k)

    algo.fit = fit_hook
    bmad.metrics.compute_all = compute_all_hook

    profile_text = None
    if cfg.get("profile"):
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        rec, _ = _execute(algo, bench, spec, opts)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        profile_text = buf.getvalue()
    else:
        rec, _ = _execute(algo, bench, spec, opts)
    bmad.metrics.compute_all = compute_all
    del algo.fit
    out: dict[str, Any] = {
        "fit_s": rec["timing"]["fit_s"],
        "predict_s": rec["timing"]["predict_s"],
        "fit_cpu_s": cpu["fit1"] - cpu["fit0"],
        "predict_cpu_s": cpu["predict1"] - cpu["fit1"],
        "image_auroc": rec["metrics"]["image_auroc"],
        "pixel_auroc": rec["metrics"]["pixel_auroc"],
    }
    if profile_text:
        out["profile"] = profile_text

    # -- pieces of bmad's own work (after the timed run, same loaders as the runner's) ----
    mk = {"input_size": (SIZE, SIZE), "eval_size": (SIZE, SIZE), "channels": 3,
          "batch_size": rec["sizes"]["batch_size"]}
    train = list_split(bench.root, "train")
    test = list_split(bench.root, "test")

    def one_pass(loader: Any) -> float:
        t = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t

    out["load_train_epoch_s"] = statistics.median(one_pass(make_loader(train, shuffle=True, **mk)) for _ in range(3))
    out["load_test_s"] = statistics.median(one_pass(make_loader(test, **mk)) for _ in range(3))

    # -- throughput on one in-memory batch ----------------------------------------------------
    lm = algo.build()
    x = next(iter(make_loader(test, **mk)))["image"][: cfg["batch"]].contiguous()
    xn = normalise(x)
    backbone = backbone_of(lm)
    lm.eval()

    def t_predict_map() -> float:
        t = time.perf_counter()
        algo.predict_map(x)
        return time.perf_counter() - t

    def t_module() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            lm.model(xn)
        return time.perf_counter() - t

    def t_backbone() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            backbone(xn)
        return time.perf_counter() - t

    def t_prepare() -> float:
        t = time.perf_counter()
        algo._prepare(x)
        return time.perf_counter() - t

    with torch.no_grad():
        raw = lm.model(xn)

    def t_convert() -> float:  # Prediction's numpy conversion + the runner's copy into its array
        t = time.perf_counter()
        n = x.shape[0]
        pred = Prediction(scores=raw.pred_score.reshape(n), maps=raw.anomaly_map.reshape(n, SIZE, SIZE))
        dst = np.empty((n, SIZE, SIZE), np.float32)
        dst[:] = resize_maps(pred.maps, (SIZE, SIZE))
        return time.perf_counter() - t

    fns = {"predict_map": t_predict_map, "module": t_module, "backbone": t_backbone,
           "prepare": t_prepare, "convert": t_convert}
    for f in fns.values():  # warm-up
        f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(cfg["tp_repeats"]):
        for k, f in fns.items():
            samples[k].append(f())
    out["tp_batch"] = int(x.shape[0])
    out["tp_s"] = {k: statistics.median(v) for k, v in samples.items()}

    # bottom-up: the work bmad does that the bare loop does not (data loading, normalisation per batch,
    # Prediction conversion + the runner's map copy), from the pieces timed above
    b = rec["sizes"]["batch_size"]
    epochs = cfg["epochs"] if algo.trains_by_epochs else 1
    n_train_batches, n_test_batches = -(-len(train) // b), -(-len(test) // b)
    out["extra_s"] = {
        "load": epochs * out["load_train_epoch_s"] + out["load_test_s"],
        "prepare": (epochs * n_train_batches + n_test_batches) * out["tp_s"]["prepare"],
        "convert": n_test_batches * out["tp_s"]["convert"],
    }
    return out


def run_bare(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    algo_name, b, epochs = cfg["algo"], cfg["batch"], cfg["epochs"]
    bench = Path(cfg["bench"])
    train = normalise(load_split(bench, "train"))
    test = normalise(load_split(bench, "test"))
    seed_all(0)
    lm = build_module(algo_name, pre_processor=False).eval()
    warm_up(b, SIZE)

    t0, c0 = time.perf_counter(), time.process_time()
    if algo_name.startswith("stfpm"):
        opt = torch.optim.SGD(lm.model.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0,
                              weight_decay=1e-4)  # bmad's stfpm settings
        lm.train()
        for _ in range(epochs):
            for i in range(0, len(train), b):
                teacher, student = lm.model(train[i : i + b])
                loss = lm.loss(teacher, student)
                opt.zero_grad()
                loss.backward()
                opt.step()
    else:
        lm.train()
        with torch.no_grad():
            for i in range(0, len(train), b):
                lm.model(train[i : i + b])
            lm.fit()
    lm.eval()
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    t1, c1 = time.perf_counter(), time.process_time()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(test), b):
            out = lm.model(test[i : i + b])
            scores.append(out.pred_score)
            maps.append(out.anomaly_map)
    predict_s, predict_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    return {"fit_s": fit_s, "predict_s": predict_s, "fit_cpu_s": fit_cpu_s, "predict_cpu_s": predict_cpu_s}


def run_engine(cfg: dict[str, Any], barebones: bool) -> dict[str, Any]:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from anomalib.data import Folder
    from anomalib.engine import Engine

    algo_name, b = cfg["algo"], cfg["batch"]
    bench = Path(cfg["bench"])
    seed_all(0)
    lm = build_module(algo_name, pre_processor=True)
    dm = Folder(
        name="bench",
        root=bench,
        normal_dir="train/good/img",
        abnormal_dir="test/Ungood/img",
        normal_test_dir="test/good/img",
        mask_dir="test/Ungood/anomaly_mask",
        train_batch_size=b,
        eval_batch_size=b,
        num_workers=0,
        val_split_mode="none",
        seed=0,
    )
    warm_up(b, SIZE)
    with tempfile.TemporaryDirectory(prefix="bmad-engine-") as tmp:
        # no validation split and no validation loop (limit_val_batches=0): the same work as the other paths
        kwargs: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "max_epochs": cfg["epochs"],
                                  "default_root_dir": tmp, "limit_val_batches": 0}
        if barebones:
            kwargs["barebones"] = True
        t0, c0 = time.perf_counter(), time.process_time()
        engine = Engine(**kwargs)
        engine.fit(model=lm, datamodule=dm)
        fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t1, c1 = time.perf_counter(), time.process_time()
        preds = engine.predict(model=lm, datamodule=dm)
        predict_s, predict_cpu_s = time.perf_counter() - t1, time.process_time() - c1
        n = sum(len(p.pred_score) for p in preds)
        ckpt_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*.ckpt")) / 2**20
    return {"fit_s": fit_s, "predict_s": predict_s, "fit_cpu_s": fit_cpu_s, "predict_cpu_s": predict_cpu_s,
            "n_predicted": n, "checkpoint_mb": ckpt_mb}


SIZE = 128  # set from the worker's config


def worker(path: str, cfg: dict[str, Any]) -> dict[str, Any]:
    global SIZE
    SIZE = cfg["size"]
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(cfg["threads"])
    if cfg.get("mem_cap_gb"):  # fail with an allocation error, not the OOM killer picking another job
        import resource

        cap = int(cfg["mem_cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    if path == "bmad":
        out = run_bmad(cfg)
    elif path == "bare":
        out = run_bare(cfg)
    elif path in ("engine", "engine_default"):
        out = run_engine(cfg, barebones=path == "engine")
    else:
        raise ValueError(path)
    import resource

    out.update(path=path, algo=cfg["algo"], threads=torch.get_num_threads(),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


# -- driver -------------------------------------------------------------------------------
def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


Results = dict[tuple[str, str], list[dict[str, Any]]]


def total(results: Results, path: str, algo: str, cpu: bool = False) -> float | None:
    """Median over processes of fit + predict seconds, wall or CPU (None when the case has no run)."""
    rows = results.get((path, algo))
    f, p = ("fit_cpu_s", "predict_cpu_s") if cpu else ("fit_s", "predict_s")
    return statistics.median(r[f] + r[p] for r in rows) if rows else None


def report(results: Results, args: argparse.Namespace) -> str:
    lines = []
    paths = [p for p in PATHS if p in args.paths]
    lines.append("Wall seconds (median over fresh processes; all runs listed) and CPU seconds (user + system, "
                 "all threads; median):")
    lines.append("")
    lines.append("| algorithm | path | fit s | predict s | fit + predict s | runs (fit + predict s) | "
                 "CPU fit + predict s |")
    lines.append("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for algo in args.algos:
        for path in paths:
            rows = results.get((path, algo))
            if not rows:
                continue
            runs = ", ".join(f"{r['fit_s'] + r['predict_s']:.1f}" for r in rows)
            lines.append(f"| {algo} | {path} | {median(rows, 'fit_s'):.2f} | {median(rows, 'predict_s'):.2f} | "
                         f"{total(results, path, algo):.2f} | {runs} | {total(results, path, algo, cpu=True):.2f} |")
    lines.append("")
    lines.append("| algorithm | bmad / bare | bmad / Engine (barebones) | bmad / Engine (default) | "
                 "CPU: bmad / bare | CPU: bmad / Engine (barebones) | CPU: bmad / Engine (default) |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for algo in args.algos:
        cells = []
        for cpu in (False, True):
            b = total(results, "bmad", algo, cpu)
            others = (total(results, p, algo, cpu) for p in ("bare", "engine", "engine_default"))
            cells += [f"{b / o:.3f}" if b and o else "—" for o in others]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    bm = {algo: results.get(("bmad", algo)) for algo in args.algos}
    if any(bm.values()):
        lines.append("")
        lines.append("Throughput on one in-memory batch (images/s, median of the interleaved calls):")
        lines.append("")
        lines.append("| algorithm | batch | predict_map | lm.model | backbone | predict_map / backbone | "
                     "_prepare ms | Prediction + copy ms |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for algo, rows in bm.items():
            if not rows:
                continue
            n = rows[0]["tp_batch"]
            s = {k: statistics.median(r["tp_s"][k] for r in rows) for k in rows[0]["tp_s"]}
            lines.append(f"| {algo} | {n} | {n / s['predict_map']:.1f} | {n / s['module']:.1f} | "
                         f"{n / s['backbone']:.1f} | {s['backbone'] / s['predict_map']:.3f} | "
                         f"{1000 * s['prepare']:.1f} | {1000 * s['convert']:.1f} |")
        lines.append("")
        lines.append("Work bmad does that the bare loop does not (bottom-up, timed piece by piece in the bmad "
                     "processes; medians):")
        lines.append("")
        lines.append("| algorithm | one train epoch of loading s | test set loading s | normalisation s | "
                     "Prediction + copy s | total extra s | extra / bare fit + predict |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for algo, rows in bm.items():
            if not rows:
                continue
            ex = {k: statistics.median(r["extra_s"][k] for r in rows) for k in rows[0]["extra_s"]}
            extra = sum(ex.values())
            bare_total = total(results, "bare", algo)
            frac = f"{100 * extra / bare_total:.1f}%" if bare_total else "—"
            lines.append(f"| {algo} | {median(rows, 'load_train_epoch_s'):.3f} | {median(rows, 'load_test_s'):.3f} | "
                         f"{ex['prepare']:.3f} | {ex['convert']:.3f} | {extra:.2f} | {frac} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=list(DEFAULT_ALGOS), choices=ALGOS)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--size", type=int, default=128, help="image side in px (images are written at it: no resizing)")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=60, help="half normal, half anomalous")
    ap.add_argument("--epochs", type=int, default=3, help="STFPM epochs (memory-bank models: one pass)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per (path, algorithm); median")
    ap.add_argument("--tp-repeats", type=int, default=7, help="calls per throughput measurement; median")
    ap.add_argument("--bench", type=Path, help="write/reuse the generated bench here (default: a temp folder)")
    ap.add_argument("--profile", action="store_true", help="cProfile the bmad path (first repeat) and print it")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every process (default: torch's)")
    ap.add_argument("--mem-cap-gb", type=float, default=12.0, help="address-space limit per process (0: none)")
    ap.add_argument("--mmap-threshold", type=int,
                    help="set MALLOC_MMAP_THRESHOLD_ to this many bytes in every process (default: glibc's own)")
    ap.add_argument("--json", type=Path, help="write every run's raw result here")
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return

    with tempfile.TemporaryDirectory(prefix="bmad-overhead-") as tmp:
        bench = args.bench or Path(tmp) / "Bench"
        if not (bench / "train").is_dir():
            write_bench(bench, args.size, args.n_train, args.n_test)
        import torch

        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; bench {bench}: {args.n_train} train + {args.n_test} test "
              f"images, {args.size}x{args.size} px; batch {args.batch}; STFPM {args.epochs} epochs; "
              f"{args.repeats} fresh processes per case; torch threads per process: {args.threads or 'default'}; "
              f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'unset'}", flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
        if args.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        results: Results = {}
        raw: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for algo in args.algos:
                for path in args.paths:
                    cfg = {"algo": algo, "bench": str(bench), "size": args.size, "epochs": args.epochs,
                           "batch": args.batch, "tp_repeats": args.tp_repeats, "threads": args.threads,
                           "mem_cap_gb": args.mem_cap_gb, "profile": args.profile and rep == 0 and path == "bmad"}
                    load = load_avg()
                    t = time.perf_counter()
                    done = subprocess.run([sys.executable, __file__, "--worker", path, json.dumps(cfg)],
                                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
                    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                    if done.returncode or not lines:
                        print(f"[{rep + 1}/{args.repeats}] {algo} {path}: FAILED (exit {done.returncode})\n"
                              f"{done.stderr[-3000:]}", flush=True)
                        continue
                    res = json.loads(lines[-1][len("RESULT "):])
                    res.update(repeat=rep, load_before=load, process_s=time.perf_counter() - t)
                    prof = res.pop("profile", None)
                    if prof:
                        print(f"\n## cProfile of the bmad path, {algo}\n{prof}", flush=True)
                    results.setdefault((path, algo), []).append(res)
                    raw.append(res)
                    print(f"[{rep + 1}/{args.repeats}] {algo:14s} {path:15s} fit {res['fit_s']:7.2f} s  "
                          f"predict {res['predict_s']:6.2f} s  (load avg {load:.2f}, process {res['process_s']:.0f} s)",
                          flush=True)
        print()
        print(report(results, args))
        if args.json:
            meta = {k: str(v) for k, v in vars(args).items()}
            args.json.write_text(json.dumps({"args": meta, "runs": raw}, indent=1))


if __name__ == "__main__":
    main()
