"""Sweeps: every (bench, algo, seed) run, seeded, timed, recorded, resumable."""

from __future__ import annotations

import inspect
import json
import platform
import random
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import bmad
from bmad import registry
from bmad.algorithm import Algorithm, Prediction
from bmad.benches import Bench, resolve_bench
from bmad.data import check_masks, few_shot, list_split, make_loader, read_image, resize_maps
from bmad.errors import UsageError
from bmad.records import clean_stale_temps, config_hash, is_done, record_path, write_record


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep."""

    bench: str
    algo: str
    seed: int
    shots: int | None = None
    train_bench: str | None = None  # cross-bench: train (and select) on this bench's data, test on ``bench``
    params: dict[str, Any] | None = field(default=None, compare=False)  # this run's own, over the sweep's


@dataclass
class SweepOptions:
    """Options shared by the runs of a sweep (the CLI's flags)."""

    results: Path = Path("results")
    data_root: Path | None = None
    device: str = "cpu"
    random_init: bool = False
    weights: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    algo_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per algorithm, over ``params``
    n_seeds: int = 1
    batch_size: int = 32
    save_maps: int = 8  # test images whose maps are kept beside each record (0: none)
    progress: bool = True
    verbose: bool = True


@dataclass
class RunOutcome:
    """What happened to one run."""

    spec: RunSpec
    status: str  # "ok" | "failed" | "skipped"
    path: Path
    error: str | None = None
    image_auroc: float | None = None


def describe(o: RunOutcome, seconds: float) -> str:
    """One line saying how a run ended."""
    name = f"{o.path.parts[-4]}/{o.spec.algo}/seed{o.spec.seed}"  # the bench's record name (folder-X, not a path)
    if o.status == "skipped":
        return f"{name}: already done"
    if o.status == "failed":
        return f"{name}: FAILED after {seconds:.1f} s: {o.error}"
    auroc = f", image AUROC {100 * o.image_auroc:.2f}" if o.image_auroc is not None else ""
    return f"{name}: ok in {seconds:.1f} s{auroc}"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_algorithm(name: str, opts: SweepOptions, own: dict[str, Any] | None = None) -> Algorithm:
    """Create ``name`` with the sweep's parameters, then ``own`` (a run's own, e.g. a
    failed run's recorded config), + pretrained/weights where accepted."""
    entry = registry.algorithms.get(name)
    accepted = set(inspect.signature(entry.cls.__init__).parameters)
    params = {**opts.params, **opts.algo_params.get(name, {}), **(own or {})}
    unknown = [k for k in params if k not in accepted and "kwargs" not in accepted]
    if unknown:
        raise UsageError(
            f"algorithm {name!r} has no parameter {', '.join(unknown)}",
            hint=f"its parameters: {', '.join(entry.cls.param_names()) or '(none)'}",
        )
    if opts.random_init and "pretrained" in accepted:
        params["pretrained"] = False
    if opts.weights and "weights" in accepted:
        params["weights"] = opts.weights
    return registry.create(name, **params)


def input_size_for(algo: Algorithm, native: tuple[int, int]) -> tuple[int, int]:
    """The size images are resized to: the algorithm's, or native, made to fit its constraints."""
    h, w = algo.input_size or native
    if algo.square:
        h = w = max(h, w)
    if algo.fixed_sizes:
        side = min(algo.fixed_sizes, key=lambda s: (abs(s - max(h, w)), s))
        return side, side
    m = max(1, algo.size_multiple)
    return -(-h // m) * m, -(-w // m) * m


def plan(benches: list[str], algos: list[str], n_seeds: int, shots: int | None,
         train_benches: list[str] | None = None) -> list[RunSpec]:
    """The run list of a sweep, in a fixed order (train bench, bench, algo, seed).

    With ``train_benches``, every (train bench, test bench) pair: a pair of one bench with
    itself is the ordinary in-domain run (and shares its record)."""
    sources: list[str | None] = list(train_benches) if train_benches else [None]
    return [RunSpec(b, a, s, shots, None if t == b else t)
            for t in sources for b in benches for a in algos for s in range(n_seeds)]


def failed_runs(results: Path, cause: str | None = None) -> tuple[list[RunSpec], list[str]]:
    """The runs recorded as failed under ``results`` (optionally only those failed for
    ``cause``, e.g. "out_of_memory"), rebuilt from their records with their recorded
    configuration; and a note per failed record that cannot be rebuilt."""
    from bmad.records import load_records

    specs, notes = [], []
    for rec in load_records(results).records:
        if rec["status"] != "failed" or (cause is not None and rec.get("failure") != cause):
            continue
        run = rec.get("run")
        if not isinstance(run, dict) or "bench" not in run:
            notes.append(f"{rec['bench']}/{rec['algo']}/seed{rec['seed']}: recorded by an older bmad without "
                         "the run's bench key; rerun its sweep command instead")
            continue
        specs.append(RunSpec(run["bench"], rec["algo"], int(rec["seed"]), rec.get("shots"), run.get("train_bench"),
                             params=dict(rec["config"])))
    return specs, notes


class Sweep:
    """Runs a list of :class:`RunSpec`, skipping those with an ``ok`` record."""

    def __init__(self, opts: SweepOptions) -> None:
        self.opts = opts
        self._benches: dict[str, Bench] = {}

    def bench(self, key: str) -> Bench:
        if key not in self._benches:
            self._benches[key] = resolve_bench(key, self.opts.data_root)
        return self._benches[key]

    def preflight(self, specs: list[RunSpec]) -> None:
        """Fail fast (before any run) on unknown names, bad parameters, missing weights or data."""
        built: set[str] = set()
        for s in specs:
            key = json.dumps([s.algo, s.params], sort_keys=True, default=str)
            if key not in built:
                built.add(key)
                build_algorithm(s.algo, self.opts, s.params)
        for key in dict.fromkeys(s.train_bench or s.bench for s in specs):
            b = self.bench(key)
            list_split(b.root, "train")
            check_masks(list_split(b.root, "valid", required=False))
        for key in dict.fromkeys(s.bench for s in specs):
            check_masks(list_split(self.bench(key).root, "test"))

    def run_all(self, specs: list[RunSpec], preflight: bool = True) -> list[RunOutcome]:
        """Run every spec in this process; a failing run is recorded and the sweep goes on."""
        if preflight:
            self.preflight(specs)
        outcomes = []
        bar = tqdm(specs, desc="sweep", unit="run", disable=not self.opts.progress)
        for i, spec in enumerate(bar, 1):
            bar.set_postfix_str(f"{spec.bench}/{spec.algo}/seed{spec.seed}")
            t0 = time.perf_counter()
            outcome = self.run_one(spec)
            outcomes.append(outcome)
            if self.opts.verbose:
                tqdm.write(f"[{i}/{len(specs)}] {describe(outcome, time.perf_counter() - t0)}")
        bar.close()
        return outcomes

    def _start(self, spec: RunSpec) -> tuple[Algorithm, Path, dict[str, Any]]:
        """The run's algorithm, record path and record skeleton."""
        opts = self.opts
        bench = self.bench(spec.bench)
        train_bench = self.bench(spec.train_bench) if spec.train_bench else None
        algo = build_algorithm(spec.algo, opts, spec.params)
        config = algo.get_config()
        chash = config_hash(spec.algo, config, spec.shots, train_bench.name if train_bench else None)
        path = record_path(opts.results, bench.name, spec.algo, chash, spec.seed)
        record: dict[str, Any] = {
            "bench": bench.name,
            "algo": spec.algo,
            "seed": spec.seed,
            "shots": spec.shots,
            "train_bench": train_bench.name if train_bench else None,
            "run": {k: v for k, v in asdict(spec).items() if k != "params"},  # the keys as given: `bmad run --retry-failed` rebuilds the run from them
            "config": config,
            "config_hash": chash,
            "sweep": {"seeds": opts.n_seeds},
            "env": environment(opts.device),
            "metrics": {k: None for k in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "best_dice")},
        }
        return algo, path, record

    def record_failure(self, spec: RunSpec, cause: str, error: str) -> RunOutcome:
        """Record ``spec`` as failed for ``cause`` when it died outside :meth:`run_one`
        (its worker process was killed); an ``ok`` record is never overwritten."""
        algo, path, record = self._start(spec)
        del algo
        if is_done(path):
            return RunOutcome(spec, "ok", path)
        record.update(status="failed", failure=cause, error=error)
        write_record(path, record)
        return RunOutcome(spec, "failed", path, error)

    def run_one(self, spec: RunSpec) -> RunOutcome:
        """One run: skip if recorded ok, else fit, predict, score and record it."""
        opts = self.opts
        algo, path, record = self._start(spec)
        if is_done(path):
            return RunOutcome(spec, "skipped", path)
        bench = self.bench(spec.bench)
        train_bench = self.bench(spec.train_bench) if spec.train_bench else None
        clean_stale_temps(path)
        record["started"] = time.time()  # wall clock (Unix seconds): when and how long, across workers
        try:
            result, sample = _execute(algo, bench, spec, opts, train_bench)
            record.update(result)
            if sample is not None:
                record["map_sample"] = write_map_sample(path, sample)
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failed run never stops the sweep
            record["status"] = "failed"
            record["failure"] = failure_cause(exc)
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=20)
        finally:
            del algo
            _free_memory(opts.device)
        record["finished"] = time.time()
        write_record(path, record)
        return RunOutcome(spec, record["status"], path, record.get("error"), record["metrics"].get("image_auroc"))


def sample_indices(labels: list[int], n: int) -> list[int]:
    """Up to ``n`` test indices whose maps are kept: three quarters anomalous, the rest
    normal (more of one class when the other runs short), evenly spread over the sorted
    test list, so every algorithm on a bench keeps the same images."""
    y = np.asarray(labels)
    pools = [np.flatnonzero(y == 1), np.flatnonzero(y == 0)]
    want = [min(len(pools[0]), -(-3 * n // 4)), 0]
    want[1] = min(len(pools[1]), n - want[0])
    want[0] = min(len(pools[0]), n - want[1])
    picked = [p[np.linspace(0, len(p) - 1, k).round().astype(int)] for p, k in zip(pools, want) if k]
    return sorted(int(i) for i in np.concatenate(picked)) if picked else []


def failure_cause(exc: BaseException) -> str:
    """"out_of_memory" for an allocation failure (CUDA or host), else "error"."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "out_of_memory"
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                          or "failed to allocate" in text):
        return "out_of_memory"
    return "error"


def _execute(
    algo: Algorithm, bench: Bench, spec: RunSpec, opts: SweepOptions, train_bench: Bench | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    from bmad import metrics

    seed_everything(spec.seed)
    source = train_bench or bench
    train = list_split(source.root, "train")
    valid = list_split(source.root, "valid", required=False)
    test = list_split(bench.root, "test")
    check_masks(valid + test)
    data: dict[str, Any] = {"manifest_sha256": bench.manifest_sha256()}
    if train_bench is not None:
        data["train_manifest_sha256"] = train_bench.manifest_sha256()
    if spec.shots:
        train = few_shot(train, spec.shots, spec.seed)
        data["train_files"] = [s.path.relative_to(source.root).as_posix() for s in train]
    data.update(n_train=len(train), n_valid=len(valid), n_test=len(test))

    native = tuple(read_image(test[0].path).shape[-2:])
    eval_size = bench.spec.eval_size or native
    in_size = input_size_for(algo, native)
    device = torch.device(opts.device)
    algo.to(device)
    batch = int(getattr(algo, "batch_size", opts.batch_size) or opts.batch_size)
    mk = dict(input_size=in_size, eval_size=eval_size, channels=algo.channels, batch_size=batch)
    train_loader = make_loader(train, shuffle=True, seed=spec.seed, **mk)
    valid_loader = _DeviceLoader(make_loader(valid, **mk), device) if valid else None
    test_loader = make_loader(test, **mk)

    mem = _PeakMemory(device)
    t0 = time.perf_counter()
    algo.fit(
        _DeviceLoader(train_loader, device, desc="fit", progress=opts.progress),
        valid_loader,
    )
    fit_s = time.perf_counter() - t0

    pixel = bench.spec.pixel_masks and algo.pixel_level
    scores, labels = [], []
    # maps are filled in place: one [N, H, W] float32 array, no concatenated copy (RESC: 3.8 GB)
    maps = np.empty((len(test), *eval_size), np.float32) if pixel else None
    masks = np.zeros((len(test), *eval_size), bool) if pixel else None
    keep = sample_indices([s.label for s in test], opts.save_maps)
    kept: dict[int, np.ndarray] = {}
    done = 0
    infer_s = 0.0
    t1 = time.perf_counter()
    for b in tqdm(test_loader, desc="predict", leave=False, disable=not opts.progress):
        x = b["image"].to(device, non_blocking=True)
        _sync(device)
        ti = time.perf_counter()
        with torch.no_grad():
            pred = algo.predict_map(x)
        _sync(device)
        infer_s += time.perf_counter() - ti
        if not isinstance(pred, Prediction):
            raise TypeError(f"{spec.algo}.predict_map returned {type(pred).__name__}, expected Prediction")
        if pred.scores.shape[0] != x.shape[0]:
            raise ValueError(f"{spec.algo} returned {pred.scores.shape[0]} scores for {x.shape[0]} images")
        scores.append(pred.scores)
        labels.append(b["label"].numpy())
        for i in (i for i in keep if done <= i < done + x.shape[0] and pred.maps is not None):
            kept[i] = resize_maps(pred.maps[i - done : i - done + 1], eval_size)[0]
        if pixel:
            if pred.maps is None:
                raise ValueError(f"{spec.algo} is pixel-level but returned no maps")
            n = x.shape[0]
            maps[done : done + n] = resize_maps(pred.maps, eval_size)
            masks[done : done + n] = b["mask"].numpy().astype(bool)
        done += x.shape[0]
    predict_s = time.perf_counter() - t1

    s, y = np.concatenate(scores), np.concatenate(labels)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{spec.algo} returned non-finite scores")
    sample = None
    if kept:
        idx = sorted(kept)
        sample = {"index": np.array(idx), "files": np.array([test[i].path.relative_to(bench.root).as_posix()
                                                            for i in idx]),
                  "labels": y[idx], "scores": s[idx], "maps": np.stack([kept[i] for i in idx])}
    return {
        "metrics": metrics.compute_all(s, y, maps, masks),
        "per_image": {"scores": [float(v) for v in s], "labels": [int(v) for v in y]},
        "timing": {"fit_s": fit_s, "predict_s": predict_s, "ms_per_image": 1000 * infer_s / len(test)},
        "memory": mem.read(),
        "params": algo.parameter_counts(),
        "data": data,
        "sizes": {"input": list(in_size), "eval": list(eval_size), "batch_size": batch},
        "history": list(algo.history),
    }, sample


MAP_SAMPLE_SIDE = 256


def write_map_sample(record_file: Path, sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write the kept maps beside the record (``seed<k>.maps.npz``, float16 where the values
    fit its range, else float32; longest side at most 256 px) atomically; returns the
    record's ``map_sample`` entry."""
    import io

    from bmad.fsutil import write_bytes_atomic

    maps = sample["maps"]
    h, w = maps.shape[-2:]
    if max(h, w) > MAP_SAMPLE_SIDE:
        f = MAP_SAMPLE_SIDE / max(h, w)
        maps = resize_maps(maps, (max(1, round(h * f)), max(1, round(w * f))))
    buf = io.BytesIO()
    # raw maps can exceed float16 (UTRAD's reach ~1e5: inf) or sit below its normal range (flushed)
    peak = float(np.abs(maps).max(initial=0.0))
    half = np.finfo(np.float16)
    fits = peak <= float(half.max) and (peak == 0 or peak >= float(half.tiny))
    np.savez_compressed(buf, **{**sample, "maps": maps.astype(np.float16 if fits else np.float32)})
    out = record_file.with_name(record_file.stem + ".maps.npz")
    write_bytes_atomic(out, buf.getvalue())
    return {"file": out.name, "n": int(len(maps)), "size": [int(v) for v in maps.shape[-2:]]}


class _DeviceLoader:
    """Re-iterable view of a loader that moves images to ``device`` (and shows progress)."""

    def __init__(self, loader: Any, device: torch.device, desc: str | None = None, progress: bool = False):
        self.loader, self.device, self.desc, self.progress = loader, device, desc, progress

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = tqdm(self.loader, desc=self.desc, leave=False, disable=not self.progress)
        for b in it:
            b = dict(b)
            b["image"] = b["image"].to(self.device, non_blocking=True)
            yield b


class _PeakMemory:
    """Peak RSS (Linux: VmHWM after resetting it via /proc/self/clear_refs) and peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.exact = _reset_peak_rss()
        self.start_rss = _current_rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> dict[str, float | None]:
        peak = _peak_rss_mb() if self.exact else None
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {"peak_rss_mb": peak if peak is not None else _current_rss_mb(), "peak_gpu_mb": gpu,
                "rss_at_start_mb": self.start_rss}


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float | None:
    return _proc_status_mb("VmHWM")


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: str) -> None:
    """Collect the finished run's garbage, then freeze what survives (libraries, caches)
    so the next collection scans only the next run's objects: a full collection over
    torch's and anomalib's object graph took ~0.2 s per run."""
    import gc

    gc.collect()
    gc.freeze()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


@cache
def _git_commit() -> str | None:
    root = Path(bmad.__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions and machine facts stored in every record."""
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "bmad": bmad.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "device": dev,
        # CPU runs repeat to the bit at one thread count (tests/test_determinism.py); CUDA ones only when
        # torch is told to (then it raises on kernels that cannot; warn-only mode lets them run)
        "deterministic": not device.startswith("cuda") or (torch.are_deterministic_algorithms_enabled()
                                                           and not torch.is_deterministic_algorithms_warn_only_enabled()),
        "threads": torch.get_num_threads(),  # CPU results change in the last bits with the thread count
        "platform": platform.platform(),
        "git": _git_commit(),
    }

