"""Scheduling efficiency of the executors: many short dummy runs (run by hand).

    python benchmarks/sweep.py                          # local (1 and 2 workers) and Ray, 40 runs of 1 s
    python benchmarks/sweep.py --runs 80 --seconds 0.5 --workers 1 2 --executors local ray --json out.json

A dummy algorithm (``bench_sleeper``, written to a temporary module and loaded through
``$BMAD_PLUGINS``) spends ``--seconds`` in ``fit`` (sleeping, or ``--busy``: a Python loop
that keeps one core busy) and predicts random scores (and, with ``--maps``, random maps,
so every run also pays for the exact pixel metrics and a map sample); every run is a real
``bmad run`` run (build, load a tiny generated bench of 4 + 4 images, fit, predict, metrics,
map sample, atomic record). One sweep = ``--runs`` seeds of it through
``bmad run --executor X [--workers W]``, a fresh results folder each time, the command
timed from start to exit.

Ideal throughput with W workers is W runs per ``--seconds``. Two efficiencies:

- *whole command*: ideal time (runs x seconds / W) / wall time of the command, start-up
  (Python, torch, Ray's cluster start) included;
- *steady state*: ideal time / (last record's ``finished`` - first record's ``started``):
  the scheduler and per-run overhead only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DUMMY = '''
import time

import numpy as np
import torch

from bmad.algorithm import Algorithm, Prediction
from bmad.registry import register


@register("bench_sleeper")
class Sleeper(Algorithm):
    """Spends ``seconds`` in fit (sleeping, or busy on one core), then scores at random."""

    family = "test"
    pixel_level = True
    channels = 1

    def __init__(self, seconds: float = 1.0, busy: bool = False, maps: bool = False):
        self.seconds = seconds
        self.busy = busy
        self.maps = maps  # return maps: pixel metrics and a map sample for every run
        self.pixel_level = maps

    def fit(self, train, val=None):
        for _ in train:
            pass
        end = time.perf_counter() + self.seconds
        if self.busy:
            x = 0
            while time.perf_counter() < end:
                x += 1
        else:
            time.sleep(self.seconds)

    def predict_map(self, images):
        g = torch.Generator().manual_seed(int(images.sum() * 1000) % 2**31)
        maps = torch.rand(images.shape[0], *images.shape[-2:], generator=g)
        return Prediction(maps.flatten(1).mean(1), maps if self.maps else None)
'''


def make_tiny_bench(root: Path) -> Path:
    """4 train and 2 + 2 test images of 16 x 16 px in BMAD's layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    bench = root / "Tiny"
    for sub in ("train/good", "test/good", "test/Ungood/img", "test/Ungood/label"):
        (bench / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(bench / f"train/good/{i}.png")
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(bench / f"test/good/{i}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(bench / f"test/Ungood/img/{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        Image.fromarray(mask).save(bench / f"test/Ungood/label/{i}.png")
    return bench


def one_sweep(bench: Path, plugin_dir: Path, results: Path, executor: str, workers: int, args: argparse.Namespace,
              ) -> dict:
    cmd = [sys.executable, "-m", "bmad.cli", "run", "--algo", "bench_sleeper", "--bench", f"folder:{bench}",
           "--seeds", str(args.runs), "--param", f"seconds={args.seconds}", "--param", f"busy={str(args.busy).lower()}", "--param", f"maps={str(args.maps).lower()}",
           "--results", str(results), "--no-progress", "--executor", executor]
    if executor == "local":
        cmd += ["--workers", str(workers)]
    else:
        cmd += ["--address", "local", "--cpus-per-run", "1"]
    env = dict(os.environ, BMAD_PLUGINS="bmad_bench_sleeper",
               PYTHONPATH=os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH", "")])))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"sweep failed ({executor}, {workers} workers):\n{out.stdout}\n{out.stderr}")
    recs = [json.loads(p.read_text()) for p in results.rglob("seed*.json")]
    assert len(recs) == args.runs and all(r["status"] == "ok" for r in recs), "missing or failed records"
    span = max(r["finished"] for r in recs) - min(r["started"] for r in recs)
    ideal = args.runs * args.seconds / workers
    return {"executor": executor, "workers": workers, "runs": args.runs, "seconds": args.seconds, "wall_s": wall,
            "steady_s": span, "ideal_s": ideal, "whole_efficiency": ideal / wall, "steady_efficiency": ideal / span}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=1.0, help="time each dummy run spends in fit")
    ap.add_argument("--busy", action="store_true", help="keep a core busy instead of sleeping")
    ap.add_argument("--maps", action="store_true",
                    help="the dummy returns random maps: every run also computes the pixel metrics (exact, "
                         "~0.1 s on random maps whatever their size) and writes a map sample")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="local worker counts to try")
    ap.add_argument("--executors", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1,
                    help="workers Ray has (its local instance takes every core): the ideal for Ray")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bmad-sweep-") as tmp:
        root = Path(tmp)
        plugin_dir = root / "plugin"
        plugin_dir.mkdir()
        (plugin_dir / "bmad_bench_sleeper.py").write_text(DUMMY)
        bench = make_tiny_bench(root)
        cases = [("local", w) for w in args.workers] if "local" in args.executors else []
        cases += [("ray", args.ray_cpus)] if "ray" in args.executors else []
        for executor, workers in cases:
            row = one_sweep(bench, plugin_dir, root / f"res-{executor}-{workers}", executor, workers, args)
            rows.append(row)
            print(f"{executor:5s} {workers} workers: wall {row['wall_s']:.1f} s, steady {row['steady_s']:.1f} s, "
                  f"ideal {row['ideal_s']:.1f} s -> {100 * row['whole_efficiency']:.1f} % whole, "
                  f"{100 * row['steady_efficiency']:.1f} % steady", flush=True)
    print(f"\n{os.cpu_count()} cores; {args.runs} runs of {args.seconds} s ({'busy' if args.busy else 'sleep'}"
          f"{', with maps' if args.maps else ', image-level'})\n")
    print("| executor | workers | wall (s) | steady span (s) | ideal (s) | efficiency, whole | efficiency, steady |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['executor']} | {r['workers']} | {r['wall_s']:.1f} | {r['steady_s']:.1f} | {r['ideal_s']:.1f} | "
              f"{100 * r['whole_efficiency']:.1f} % | {100 * r['steady_efficiency']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
