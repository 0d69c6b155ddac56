"""The runner: records, resume, failures, few-shot, usage errors, SIGKILL safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bmad.records import is_done, load_records, read_record
from bmad.runner import sample_indices, write_map_sample
from tests.conftest import make_bench, run_bmad


def _records(results: Path) -> list[dict]:
    loaded = load_records(results)
    assert not loaded.skipped, loaded.skipped
    return loaded.records


def test_record_contents_and_resume(toy_plugin: Path, bench_dir: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    args = ("run", "--algo", "toy", "--bench", f"folder:{bench_dir}", "--seeds", "2", "--shots", "5",
            "--results", str(res), "--no-progress")
    out = run_bmad(*args, plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    assert "2 done, 0 already done, 0 failed" in out.stdout
    recs = _records(res)
    assert {r["seed"] for r in recs} == {0, 1}
    r = recs[0]
    for key in ("bench", "algo", "seed", "shots", "config", "config_hash", "status", "metrics", "timing",
                "memory", "params", "data", "env", "history"):
        assert key in r
    assert r["bench"] == "folder-Toy" and r["shots"] == 5
    assert set(r["metrics"]) == {"image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "best_dice"}
    assert all(0 <= v <= 1 for v in r["metrics"].values())
    assert r["timing"]["fit_s"] >= 0 and r["timing"]["ms_per_image"] > 0
    assert r["memory"]["peak_rss_mb"] > 50
    assert len(r["data"]["train_files"]) == 5 and r["data"]["n_train"] == 5 and r["data"]["n_test"] == 16
    assert recs[0]["data"]["train_files"] != recs[1]["data"]["train_files"]  # drawn per seed
    assert r["config"] == {"sleep": 0.0, "fail": False, "noise": 0.0, "input_size": None, "oom_flag": None,
                           "kill_flag": None}
    assert r["history"] == [{"epoch": 0, "n": 5}]
    assert r["env"]["torch"] and r["env"]["device"] == "cpu" and r["env"]["deterministic"] is True
    assert r["per_image"]["labels"] == [0] * 8 + [1] * 8  # test order: good, then Ungood
    assert len(r["per_image"]["scores"]) == 16
    sample = np.load(res.rglob(r["map_sample"]["file"]).__next__())
    assert r["map_sample"] == {"file": f"seed{r['seed']}.maps.npz", "n": 8, "size": [32, 32]}
    assert list(sample["index"]) == sample_indices(r["per_image"]["labels"], 8)
    assert list(sample["labels"]) == [r["per_image"]["labels"][i] for i in sample["index"]]
    np.testing.assert_allclose(sample["scores"], [r["per_image"]["scores"][i] for i in sample["index"]])
    assert sample["maps"].shape == (8, 32, 32) and sample["maps"].dtype == np.float16
    assert all(f.startswith("test/") for f in sample["files"])
    mtimes = {p: p.stat().st_mtime_ns for p in res.rglob("seed*.json")}

    again = run_bmad(*args, plugin=toy_plugin)
    assert again.returncode == 0 and "0 done, 2 already done" in again.stdout
    assert mtimes == {p: p.stat().st_mtime_ns for p in res.rglob("seed*.json")}


def test_sample_indices_favour_anomalies_and_spread_evenly() -> None:
    labels = [0] * 10 + [1] * 10
    assert sample_indices(labels, 8) == [0, 9, 10, 12, 14, 15, 17, 19]  # 2 normal + 6 anomalous, ends included
    assert sample_indices([0] * 5 + [1], 4) == [0, 2, 4, 5]  # one anomaly only: normals fill up
    assert sample_indices([1, 1], 8) == [0, 1]
    assert sample_indices(labels, 0) == [] and sample_indices([], 8) == []


def test_map_sample_is_shrunk_to_256_px_and_written_atomically(tmp_path: Path) -> None:
    record = tmp_path / "seed3.json"
    maps = np.random.default_rng(0).random((2, 300, 600)).astype(np.float32)
    entry = write_map_sample(record, {"index": np.array([4, 7]), "maps": maps, "labels": np.array([1, 0])})
    assert entry == {"file": "seed3.maps.npz", "n": 2, "size": [128, 256]}
    assert [p.name for p in tmp_path.iterdir()] == ["seed3.maps.npz"]  # no temp file left
    sample = np.load(tmp_path / "seed3.maps.npz")
    assert sample["maps"].shape == (2, 128, 256) and sample["maps"].dtype == np.float16
    assert abs(float(sample["maps"].mean()) - float(maps.mean())) < 0.01
    assert list(sample["index"]) == [4, 7]


def test_same_seed_same_metrics(toy_plugin: Path, bench_dir: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{bench_dir}", "--param", "noise=0.5",
                       "--results", str(tmp_path / name), "--no-progress", plugin=toy_plugin)
        assert out.returncode == 0, out.stderr
        runs.append(_records(tmp_path / name)[0]["metrics"])
    assert runs[0] == runs[1]


def test_per_algorithm_params_apply_to_their_algorithm_only(toy_plugin: Path, bench_dir: Path,
                                                            tmp_path: Path) -> None:
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{bench_dir}", "--param", "noise=0.1",
                   "--param", "toy:noise=0.5", "--results", str(tmp_path), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    assert _records(tmp_path)[0]["config"]["noise"] == 0.5  # the per-algorithm value wins
    import algorithms  # noqa: F401
    from bmad.runner import SweepOptions, build_algorithm

    opts = SweepOptions(params={"input_size": 64}, algo_params={"deepsvdd": {"epochs": 3}}, random_init=True)
    assert build_algorithm("deepsvdd", opts).get_config()["epochs"] == 3
    assert build_algorithm("fanogan", opts).get_config()["input_size"] == (64, 64)
    assert build_algorithm("fanogan", opts).get_config()["epochs"] != 3


def test_failed_run_is_recorded_and_sweep_continues(toy_plugin: Path, bench_dir: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    other = make_bench(tmp_path / "Other", seed=3)
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{bench_dir},folder:{other}", "--param", "fail=true",
                   "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 1
    assert "toy failure on purpose" in out.stderr
    recs = _records(res)
    assert len(recs) == 2 and all(r["status"] == "failed" for r in recs)
    assert all("RuntimeError: toy failure on purpose" in r["error"] for r in recs)
    assert not any(is_done(p) for p in res.rglob("seed*.json"))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--algo", "nope", "--bench", "demo"), "unknown algo 'nope'"),
        (("--algo", "toy", "--bench", "bratz"), "unknown bench 'bratz'"),
        (("--algo", "toy", "--bench", "brats2021"), "bench 'brats2021' not found"),
        (("--algo", "toy", "--bench", "folder:/no/such/dir"), "/no/such/dir does not exist"),
        (("--algo", "toy", "--bench", "BENCH", "--param", "nope=1"), "has no parameter nope"),
        (("--algo", "toy", "--bench", "BENCH", "--param", "toy:nope=1"), "has no parameter nope"),
        (("--algo", "toy", "--bench", "BENCH", "--param", "padim:noise=1"), "names algorithm 'padim', which is not"),
        (("--algo", "toy", "--bench", "BENCH", "--param", "toy:=1"), "is not KEY=VALUE or ALGO:KEY=VALUE"),
        (("--algo", "toy", "--bench", "BENCH", "--device", "cuda:7"), "--device cuda:7"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(toy_plugin: Path, tmp_path: Path, args: tuple, message: str) -> None:
    res = tmp_path / "res"
    args = tuple(f"folder:{make_bench(tmp_path / 'B')}" if a == "BENCH" else a for a in args)
    out = run_bmad("run", *args, "--results", str(res), "--data-root", str(tmp_path / "data"), "--no-progress",
                   plugin=toy_plugin)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not res.exists()


def test_empty_test_split_is_a_usage_error(toy_plugin: Path, tmp_path: Path) -> None:
    root = make_bench(tmp_path / "B", n_test=(0, 0))
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{root}", "--results", str(tmp_path / "r"),
                   plugin=toy_plugin)
    assert out.returncode == 2 and "split 'test'" in out.stderr and "is empty" in out.stderr
    assert not (tmp_path / "r").exists()


def test_mask_size_mismatch_is_a_usage_error(toy_plugin: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    root = make_bench(tmp_path / "B")
    mask = sorted((root / "test" / "Ungood" / "anomaly_mask").iterdir())[2]
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(mask)
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{root}", "--results", str(tmp_path / "r"),
                   plugin=toy_plugin)
    assert out.returncode == 2 and str(mask) in out.stderr and "fix:" in out.stderr
    assert not (tmp_path / "r").exists()


def _kill_loop(toy_plugin: Path, bench: Path, res: Path, iterations: int, seeds: int) -> int:
    """SIGKILL a sweep at random moments, rerun until finished; return kills that hit."""
    import random

    rng = random.Random(1234)
    args = [sys.executable, "-m", "bmad.cli", "run", "--algo", "toy", "--bench", f"folder:{bench}",
            "--seeds", str(seeds), "--param", "sleep=0.02", "--results", str(res), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(toy_plugin))
    kills = 0
    for _ in range(iterations):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.5, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for p in res.rglob("seed*.json"):  # what a kill leaves must always be valid JSON records
            read_record(p)
    final = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    return kills


def _check_complete(res: Path, seeds: int) -> None:
    recs = _records(res)
    assert sorted(r["seed"] for r in recs) == list(range(seeds))
    assert all(r["status"] == "ok" for r in recs)
    files = [p for p in res.rglob("*") if p.is_file()]
    samples = [p for p in files if p.name.endswith(".maps.npz")]
    assert not [p for p in files if p.suffix != ".json" and p not in samples], "partial files left"
    assert all(p.with_name(p.name.replace(".maps.npz", ".json")).exists() for p in samples), "orphan map samples"


def test_sigkill_then_rerun_finishes_without_loss(toy_plugin: Path, tmp_path: Path) -> None:
    bench = make_bench(tmp_path / "B", n_train=40)
    res = tmp_path / "res"
    kills = _kill_loop(toy_plugin, bench, res, iterations=3, seeds=6)
    assert kills >= 1
    _check_complete(res, 6)


@pytest.mark.slow
def test_sigkill_many_times(toy_plugin: Path, tmp_path: Path) -> None:
    bench = make_bench(tmp_path / "B", n_train=40)
    res = tmp_path / "res"
    kills = _kill_loop(toy_plugin, bench, res, iterations=15, seeds=20)
    assert kills >= 5
    _check_complete(res, 20)


def test_records_written_are_complete_json(toy_plugin: Path, bench_dir: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{bench_dir}", "--results", str(res),
                   plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    (p,) = list(res.rglob("seed0.json"))
    assert json.loads(p.read_text())["status"] == "ok"
    assert p.parent.name == read_record(p)["config_hash"]


def test_input_size_constraints_are_applied_by_the_harness() -> None:
    from bmad.algorithm import Algorithm
    from bmad.runner import input_size_for

    class Free(Algorithm):
        pass

    class Multiple(Algorithm):
        size_multiple = 32

    class Fixed(Algorithm):
        fixed_sizes = (128, 256)

    class Square(Algorithm):
        square = True
        size_multiple = 8

    assert input_size_for(Free(), (240, 200)) == (240, 200)
    assert input_size_for(Multiple(), (240, 200)) == (256, 224)
    assert input_size_for(Fixed(), (240, 200)) == (256, 256)
    assert input_size_for(Fixed(), (100, 90)) == (128, 128)
    assert input_size_for(Square(), (240, 201)) == (240, 240)
    sized = Square()
    sized.input_size = (100, 60)
    assert input_size_for(sized, (512, 512)) == (104, 104)


def test_stale_temp_cleanup_leaves_other_seeds_writes_alone(tmp_path: Path) -> None:
    from bmad.records import clean_stale_temps

    mine = [tmp_path / ".seed3.json.ab12cd.tmp", tmp_path / ".seed3.maps.npz.x9y8.tmp"]
    others = [tmp_path / ".seed4.json.ef34gh.tmp", tmp_path / ".seed31.json.zz.tmp", tmp_path / "seed3.json"]
    for p in mine + others:
        p.write_text("x")
    clean_stale_temps(tmp_path / "seed3.json")  # another worker may be writing seed 4 right now
    assert not any(p.exists() for p in mine) and all(p.exists() for p in others)
