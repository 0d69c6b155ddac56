"""``bmad demo``: a synthetic BraTS-like set, the real reorganizer, two algorithms, a leaderboard."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

DEMO_ALGOS = ("patchcore_r18", "padim")
DEMO_PARAMS = {"input_size": 128}
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
        cls(raw, **cls.synthetic_options()).prepare(out, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bench


def run_demo(args: argparse.Namespace) -> int:
    """Prepare (once), run the demo algorithms over ``args.seeds`` seeds, print the leaderboard."""
    from bmad.benches import default_data_root
    from bmad.cli import _sweep
    from bmad.leaderboard import build_tables, render
    from bmad.records import load_records

    t0 = time.perf_counter()
    data_root = args.data_root or default_data_root()
    ensure_demo_data(data_root, progress=not args.no_progress)
    args.data_root = data_root
    rc = _sweep(args, ["demo"], list(DEMO_ALGOS), None, dict(DEMO_PARAMS))
    tables = build_tables(
        [r for r in load_records(args.results).records if r["algo"] in DEMO_ALGOS], benches=["demo"]
    )
    print()
    print(render(tables, "md"))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; records in {args.results / 'runs' / 'demo'}")
    return rc
