"""The demo: synthetic BraTS-like set -> brats2021 reorganizer -> patchcore + padim -> leaderboard."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bmad.benches import resolve_bench
from bmad.data import list_split
from bmad.demo import DEMO_RUNS, ensure_demo_data
from bmad.records import load_records
from tests.conftest import run_bmad


def test_demo_data_is_generated_once_and_deterministic(tmp_path: Path) -> None:
    a = ensure_demo_data(tmp_path / "a", progress=False)
    b = ensure_demo_data(tmp_path / "b", progress=False)
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    stamp = (a / "manifest.csv").stat().st_mtime_ns
    assert ensure_demo_data(tmp_path / "a", progress=False) == a
    assert (a / "manifest.csv").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "a" / "demo").iterdir() if p.name.startswith(".")]  # raw temp removed
    bench = resolve_bench("demo", tmp_path / "a")
    assert bench.root == a and bench.spec.pixel_masks
    test = list_split(a, "test")
    assert {s.label for s in test} == {0, 1} and all(s.mask for s in test if s.label)
    assert len(list_split(a, "train")) >= 100


@pytest.mark.slow
def test_bmad_demo_end_to_end(tmp_path: Path) -> None:
    """The README's first command: whole pipeline, under 10 minutes, both methods clearly above chance."""
    empty = {k: str(tmp_path / "no-weights" / k) for k in ("HF_HOME", "TORCH_HOME", "BMAD_WEIGHTS")}
    t0 = time.perf_counter()
    out = run_bmad("demo", "--data-root", str(tmp_path / "data"), "--results", str(tmp_path / "results"),
                   cwd=tmp_path, timeout=900, env=empty)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert wall < 600, f"demo took {wall:.0f} s"
    recs = load_records(tmp_path / "results").records
    assert sorted((r["algo"], r["seed"]) for r in recs) == sorted((a, s) for a in DEMO_RUNS for s in (0, 1))
    for r in recs:
        assert r["status"] == "ok" and r["bench"] == "demo"
        assert r["config"]["pretrained"] is False  # no weights anywhere: random-init backbones
        assert r["metrics"]["image_auroc"] >= 0.7, (r["algo"], r["seed"], r["metrics"])
        assert r["metrics"]["pixel_auroc"] >= 0.7
    assert "no pretrained weights cached" in out.stdout
    assert "### demo" in out.stdout and "| patchcore_r18 | 2/2 |" in out.stdout and "| padim_r18 | 2/2 |" in out.stdout

    # `bmad run --bench demo` reuses the cached set and the finished records
    again = run_bmad("run", "--algo", "padim_r18", "--bench", "demo", "--param", "input_size=128", "--random-init",
                     "--seeds", "2", "--data-root", str(tmp_path / "data"), "--results", str(tmp_path / "results"),
                     cwd=tmp_path)
    assert again.returncode == 0 and "0 done, 2 already done" in again.stdout
