"""Throughput of every reorganizer with 1 and 2 workers on generated raw data at real sizes.

    python benchmarks/prepare.py                       # every registered dataset, n from DEFAULT_N
    python benchmarks/prepare.py --datasets rsna oct2017 --n 200 --workers 1 2 4

Each dataset's raw set is written once by its ``synthesize`` classmethod (true layout,
real image sizes); each (dataset, workers) preparation then runs in a fresh process,
so its peak RSS is its own. Prints a Markdown table: images written per second and
peak RSS (MB) — the peak must not grow with the amount of data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# units per dataset: cases (brats2021), volumes per source (liver), subjects (resc),
# images (oct2017, rsna), slides (camelyon16)
DEFAULT_N = {"brats2021": 12, "liver": 4, "resc": 6, "oct2017": 400, "rsna": 200, "camelyon16": 6}
# generator options for the real image sizes where the generator's default is smaller
REAL_SIZE = {"brats2021": {"shape": (240, 240, 155)}}

CHILD = r"""
import json, sys, time
from pathlib import Path
with open("/proc/self/clear_refs", "w") as fh:  # VmHWM is inherited through fork: reset it
    fh.write("5")
from bmad.reorganizer import reorganizers
name, raw, out, workers = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
cls = reorganizers.get(name).cls
t0 = time.perf_counter()
summary = cls(**cls.synthetic_options(raw), workers=workers).prepare(out, progress=False)
seconds = time.perf_counter() - t0
images = sum(summary.counts.values())
peak = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) / 1024
print(json.dumps({"seconds": seconds, "images": images, "peak_rss_mb": peak}))
"""


def main(argv: list[str] | None = None) -> int:
    from bmad.reorganizer import reorganizers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=None, help="default: every registered dataset")
    parser.add_argument("--n", type=int, default=None, help="units per dataset (default: per-dataset table)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    names = args.datasets or reorganizers.names()
    results = []
    with tempfile.TemporaryDirectory(prefix="bmad-bench-prepare-") as tmp:
        for name in names:
            cls = reorganizers.get(name).cls
            n = args.n or DEFAULT_N.get(name, 10)
            raw = Path(tmp) / name / "raw"
            t0 = time.perf_counter()
            cls.synthesize(raw, n=n, seed=0, **REAL_SIZE.get(name, {}))
            gen_s = time.perf_counter() - t0
            for workers in args.workers:
                out = Path(tmp) / name / f"out{workers}"
                proc = subprocess.run([sys.executable, "-c", CHILD, name, str(raw), str(out), str(workers)],
                                      capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(f"{name} with {workers} workers failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r.update(dataset=name, n=n, workers=workers, generate_s=gen_s)
                results.append(r)
                print(f"{name:11s} n={n:<4d} workers={workers}: {r['images']} images in {r['seconds']:.1f} s "
                      f"({r['images'] / r['seconds']:.1f}/s), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| dataset | raw units | images | workers | seconds | images/s | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['dataset']} | {r['n']} | {r['images']} | {r['workers']} | {r['seconds']:.1f} | "
              f"{r['images'] / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
