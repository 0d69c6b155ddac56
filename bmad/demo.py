"""``bmad demo``: a synthetic BraTS-like set, the real reorganizer, two algorithms, a leaderboard."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

# ResNet-18 features at the set's native 128 px. PatchCore's greedy coreset costs
# O(patches x coreset); 1% of ~55k patches keeps its fit near 30 s on 2 cores.
DEMO_RUNS: dict[str, dict[str, object]] = {
    "patchcore_r18": {"input_size": 128, "coreset_sampling_ratio": 0.01},
    "padim_r18": {"input_size": 128},
}
DEMO_SEED = 0


def ensure_demo_data(data_root: Path, *, progress: bool = True) -> Path:
    """The demo bench folder ``<data_root>/demo/Brain``, generated on first use."""
    from bmad.reorganizer import reorganizers

    out = Path(data_root) / "demo"
    bench = out / "Brain"
    if (bench / "manifest.csv").is_file():
        return bench
    cls = reorganizers.get("brats2021").cls
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".raw-", dir=out))
    try:
        if progress:
            print(f"generating the synthetic demo set in {bench} (once) ...", flush=True)
        raw = cls.synthesize(tmp / "raw", seed=DEMO_SEED)
        cls(**cls.synthetic_options(raw)).prepare(out, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bench


def _weights_available(args: argparse.Namespace) -> bool:
    from bmad.errors import WeightsError
    from bmad.runner import SweepOptions, build_algorithm

    try:
        for algo, params in DEMO_RUNS.items():
            build_algorithm(algo, SweepOptions(weights=args.weights, params=dict(params)))
    except WeightsError:
        return False
    return True


def run_demo(args: argparse.Namespace) -> int:
    """Prepare (once), run the demo algorithms over ``args.seeds`` seeds, print the leaderboard."""
    from bmad.benches import default_data_root
    from bmad.cli import _progress, _sweep
    from bmad.leaderboard import build_tables, render
    from bmad.records import load_records
    from bmad.runner import plan

    t0 = time.perf_counter()
    data_root = args.data_root or default_data_root()
    ensure_demo_data(data_root, progress=_progress(args))
    args.data_root = data_root
    if not args.random_init and not _weights_available(args):
        print("no pretrained weights cached: the demo uses randomly initialised backbones (--random-init)")
        args.random_init = True
    rc = 0
    for algo, params in DEMO_RUNS.items():
        rc = max(rc, _sweep(args, plan(["demo"], [algo], args.seeds, None), dict(params)))
    tables = build_tables(
        [r for r in load_records(args.results).records if r["algo"] in DEMO_RUNS], benches=["demo"]
    )
    print()
    print(render(tables, "md"))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; records in {args.results / 'runs' / 'demo'}")
    return rc
