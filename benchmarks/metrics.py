"""Time and peak memory of the pixel metrics at RESC scale (run by hand, not by pytest).

    python benchmarks/metrics.py                          # default: 1e8 and 1e9 pixels
    python benchmarks/metrics.py --pixels 1e8 --cases pixel_auroc sklearn_auroc
    python benchmarks/metrics.py --pixels 1e9 --cases compute_all   # all four pixel metrics

Each (case, size) runs in a fresh subprocess, one at a time, so peak RSS is that
case's own: the generated inputs (float32 maps [N, 512, 1024] + bool masks) plus what
the metric allocates. Inputs: smooth float32 maps, blob-shaped masks, half the images
normal, ~5% anomalous pixels overall. scikit-learn's ``roc_auc_score`` runs only up to
``--sklearn-max`` pixels: it sorts all pixels at once (int64 argsort, float64 copies,
cumulative sums), ~50 bytes per pixel beyond the inputs (5.0 GB measured at 1e8), so
~50 GB at 1e9 pixels: more than a 24 GB machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

H, W = 512, 1024
CASES = ("pixel_auroc", "aupro", "sklearn_auroc", "compute_all")
DEFAULT_CASES = ("pixel_auroc", "aupro", "sklearn_auroc")


def make_inputs(n_pixels: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth maps and elliptic blob masks, generated image by image (no big temporaries)."""
    from scipy import ndimage

    n = max(2, round(n_pixels / (H * W)))
    rng = np.random.default_rng(seed)
    maps = np.empty((n, H, W), dtype=np.float32)
    masks = np.zeros((n, H, W), dtype=bool)
    yy, xx = np.ogrid[:H, :W]
    for i in range(n):
        maps[i] = ndimage.zoom(rng.random((H // 16, W // 16), dtype=np.float32), 16, order=1)
        if i % 2:  # anomalous image: 1-4 ellipses covering ~10% of it
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.integers(60, H - 60), rng.integers(60, W - 60)
                ry, rx = rng.uniform(40, 100), rng.uniform(40, 160)
                d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                masks[i] |= d2 < 1
                maps[i] += (0.6 * np.exp(-d2)).astype(np.float32)
    return maps, masks


def worker(case: str, n_pixels: float) -> dict:
    """Run one case in this process and report time and memory."""
    import psutil

    from bmad import metrics

    maps, masks = make_inputs(n_pixels)
    inputs_gb = psutil.Process().memory_info().rss / 1e9
    t0 = time.perf_counter()
    if case == "pixel_auroc":
        value = metrics.pixel_auroc(maps, masks)
    elif case == "aupro":
        value = metrics.aupro(maps, masks)
    elif case == "compute_all":  # what the runner calls: all pixel metrics, shared passes
        out = metrics.compute_all(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
        value = out["pixel_auroc"]
    else:
        from sklearn.metrics import roc_auc_score

        value = float(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
    return {
        "case": case,
        "pixels": int(maps.size),
        "images": int(maps.shape[0]),
        "anomalous_fraction": float(masks.mean()),
        "value": value,
        "seconds": seconds,
        "rss_after_inputs_gb": inputs_gb,
        "peak_rss_gb": peak_gb,
    }


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, numpy {np.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", nargs="+", type=float, default=[1e8, 1e9])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    ap.add_argument("--sklearn-max", type=float, default=2e8, help="largest size scikit-learn is run on")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "PIXELS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], float(args.worker[1]))))
        return

    print(f"machine: {machine()}")
    print("| case | pixels | time s | peak RSS GB | RSS of inputs GB | value |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for n_pixels in args.pixels:
        for case in args.cases:
            if case == "sklearn_auroc" and n_pixels > args.sklearn_max:
                print(f"| {case} | {n_pixels:.0e} | skipped: needs ~50 bytes/pixel (~50 GB at 1e9) | | | |")
                continue
            cmd = [sys.executable, __file__, "--worker", case, repr(n_pixels)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                err = done.stderr.strip()[-200:]
                print(f"| {case} | {n_pixels:.0e} | failed (exit {done.returncode}): {err} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(
                f"| {case} | {r['pixels']:.3g} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} "
                f"| {r['rss_after_inputs_gb']:.2f} | {r['value']:.10f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
