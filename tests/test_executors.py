"""Executors: local worker processes, Ray, worker deaths, retries of failed runs, cross-bench runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bmad.records import load_records
from bmad.runner import plan
from tests.conftest import make_bench, run_bmad


def _records(results: Path) -> dict[tuple, dict]:
    loaded = load_records(results)
    assert not loaded.skipped, loaded.skipped
    return {(r["bench"], r["algo"], r["config_hash"], r["seed"], r["train_bench"]): r for r in loaded.records}


@pytest.fixture(scope="module")
def two_benches(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("benches")
    return make_bench(root / "A", seed=1), make_bench(root / "B", seed=2)


def _sweep(benches: tuple[Path, ...], results: Path, *extra: str, plugin: Path, seeds: int = 2):
    return run_bmad("run", "--algo", "toy", "--bench", ",".join(f"folder:{b}" for b in benches), "--seeds",
                    str(seeds), "--param", "noise=0.3", "--results", str(results), "--no-progress", *extra,
                    plugin=plugin)


def test_local_workers_give_the_same_records_as_one_process(toy_plugin, two_benches, tmp_path):
    one = _sweep(two_benches, tmp_path / "one", plugin=toy_plugin)
    two = _sweep(two_benches, tmp_path / "two", "--workers", "2", plugin=toy_plugin)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert "runs: 4 done, 0 already done, 0 failed" in two.stdout
    assert sum(" ok in " in line for line in two.stdout.splitlines()) == 4  # each run reported (and done) once
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert set(a) == set(b) and len(a) == 4
    assert all(a[k]["metrics"] == b[k]["metrics"] and a[k]["per_image"] == b[k]["per_image"] for k in a)


def test_a_killed_worker_is_recorded_and_the_sweep_goes_on(toy_plugin, two_benches, tmp_path):
    flag = tmp_path / "kill-once"
    flag.touch()
    out = _sweep(two_benches, tmp_path / "res", "--workers", "2", "--param", f"kill_flag={flag}", plugin=toy_plugin)
    assert out.returncode == 1
    assert "runs: 3 done, 0 already done, 1 failed" in out.stdout, out.stdout
    recs = _records(tmp_path / "res")
    failed = [r for r in recs.values() if r["status"] == "failed"]
    assert len(recs) == 4 and len(failed) == 1
    assert failed[0]["failure"] == "killed" and "exit code -9" in failed[0]["error"]
    again = _sweep(two_benches, tmp_path / "res", "--workers", "2", "--param", f"kill_flag={flag}",
                   plugin=toy_plugin)
    assert again.returncode == 0 and "runs: 1 done, 3 already done, 0 failed" in again.stdout
    assert all(r["status"] == "ok" for r in _records(tmp_path / "res").values())


def test_out_of_memory_is_recorded_and_retry_failed_reruns_it(toy_plugin, two_benches, tmp_path):
    flag = tmp_path / "oom"
    flag.touch()
    res = tmp_path / "res"
    out = _sweep(two_benches[:1], res, "--param", f"oom_flag={flag}", plugin=toy_plugin)
    assert out.returncode == 1 and "--retry-failed" in out.stderr
    recs = _records(res)
    assert [r["failure"] for r in recs.values()] == ["out_of_memory"] * 2
    assert all("OutOfMemoryError" in r["error"] for r in recs.values())
    flag.unlink()
    none = run_bmad("run", "--retry-failed", "error", "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert none.returncode == 0 and "no failed runs to retry" in none.stdout  # only out_of_memory ones failed
    retry = run_bmad("run", "--retry-failed", "out_of_memory", "--results", str(res), "--no-progress",
                     plugin=toy_plugin)
    assert retry.returncode == 0, retry.stderr
    assert "runs: 2 done, 0 already done, 0 failed" in retry.stdout
    after = _records(res)
    assert set(after) == set(recs)  # the same configurations (same hashes), now ok
    assert all(r["status"] == "ok" and r["config"]["oom_flag"] == str(flag) for r in after.values())


def test_algo_and_bench_are_required_without_retry(toy_plugin, tmp_path):
    out = run_bmad("run", "--algo", "toy", "--results", str(tmp_path), plugin=toy_plugin)
    assert out.returncode == 2 and "--algo and --bench are required" in out.stderr


def test_plan_pairs_train_and_test_benches():
    specs = plan(["a", "b"], ["x"], 1, None, ["a", "b"])
    assert [(s.train_bench, s.bench) for s in specs] == [(None, "a"), ("a", "b"), ("b", "a"), (None, "b")]


def test_cross_bench_runs_train_on_one_bench_and_test_on_another(toy_plugin, two_benches, tmp_path):
    a, b = two_benches
    out = run_bmad("run", "--algo", "toy", "--train-bench", f"folder:{a}", "--bench", f"folder:{a},folder:{b}",
                   "--results", str(tmp_path), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    recs = list(_records(tmp_path).values())
    cross = next(r for r in recs if r["train_bench"])
    home = next(r for r in recs if not r["train_bench"])
    assert (home["bench"], cross["bench"], cross["train_bench"]) == ("folder-A", "folder-B", "folder-A")
    assert cross["config"] == home["config"] and cross["config_hash"] != home["config_hash"]
    assert cross["data"]["train_manifest_sha256"] != cross["data"]["manifest_sha256"]
    assert cross["data"]["n_train"] == home["data"]["n_train"] and cross["run"]["train_bench"] == f"folder:{a}"
    board = run_bmad("leaderboard", "--results", str(tmp_path))
    assert board.returncode == 0 and "| toy (trained on folder-A) |" in board.stdout  # its own row on B
    matrix = run_bmad("leaderboard", "--transfer", "--results", str(tmp_path))
    assert matrix.returncode == 0, matrix.stderr
    assert "| algorithm | n | folder-A | folder-B |" in matrix.stdout and "| trained on folder-A |" in matrix.stdout
    none = run_bmad("leaderboard", "--transfer", "--results", str(tmp_path), "--bench", "folder-Z")
    assert none.returncode == 2 and "no cross-bench runs" in none.stderr


@pytest.mark.slow  # a local Ray instance takes 20-60 s to start on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'bmad[ray]')")
def test_ray_gives_the_same_records_as_local(toy_plugin, two_benches, tmp_path):
    local = _sweep(two_benches, tmp_path / "local", plugin=toy_plugin)
    # default --address auto: no cluster runs here, so bmad starts a local Ray instance
    ray = _sweep(two_benches, tmp_path / "ray", "--executor", "ray", plugin=toy_plugin)
    assert local.returncode == 0 and ray.returncode == 0, ray.stderr[-3000:]
    a, b = _records(tmp_path / "local"), _records(tmp_path / "ray")
    assert set(a) == set(b) and len(a) == 4
    assert all(a[k]["metrics"] == b[k]["metrics"] for k in a)
