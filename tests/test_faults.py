"""Faults with real processes: SIGKILLed sweeps and preparations, corrupt and foreign
records, a full disk, and untrusted checkpoints and paths.

The sweep kill loops fork ``bmad run`` processes from one warm parent (``HARNESS``, a
script written to a temp folder): each child is a real process running the real CLI, and
can be told to stop at a named phase (mid-training, mid-prediction, half-way through
writing its map sample or its record) and wait there for the test's SIGKILL. Forking
saves the ~4 s of imports per process, so the loops can kill many times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bmad.records import load_records, read_record
from tests.conftest import REPO, make_bench, run_bmad

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL, fork and RLIMIT_FSIZE are POSIX")

# ---------------------------------------------------------------------------------------
# the harness: a warm parent that forks `bmad` CLI children and can pause them at a phase
# ---------------------------------------------------------------------------------------
HARNESS = r'''
"""Fork `bmad` CLI children from one warm process; a child can stop at a phase.

stdin, one JSON object a line: {"argv": [...], "dir": DIR, "tag": TAG, "pause": PHASE|null,
"nth": K, "fsize": BYTES|null} starts a child (answer {"pid": PID}); {"wait": PID} reaps it
(answer {"status": CODE}, negative: killed by that signal). With "fsize" the child's files
can grow to that many bytes only: a write past it fails with EFBIG, as on a full disk
(SIGXFSZ ignored). Every child writes its output to DIR/log.TAG and appends the phases it
enters to DIR/trace.TAG; with "pause" it creates DIR/PHASE.TAG at the K-th entry of PHASE
and sleeps there until killed. A child that finishes writes DIR/done.TAG before it exits.
Phases: fit (after the first training batch), predict (after the first predicted
batch), maps / record (half of the map sample's / the record's bytes written to the
temp file), recorded (a record renamed into place).
"""
import contextlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ["TQDM_DISABLE"] = "1"
import bmad.cli
import bmad.executors
import bmad.metrics
import bmad.fsutil
import bmad.runner
from bmad import registry

from bmad.reorganizer import reorganizers

registry.names()  # built-ins, plugins and reorganizers imported once, here
reorganizers.names()
print(json.dumps({"ready": True}), flush=True)

_build = bmad.runner.build_algorithm
_atomic_open = bmad.fsutil.atomic_open


def child(cmd):
    folder, tag, pause, nth = Path(cmd["dir"]), cmd["tag"], cmd.get("pause"), int(cmd.get("nth") or 1)
    log = os.open(folder / f"log.{tag}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    trace = os.open(folder / f"trace.{tag}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    if cmd.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], cmd["fsize"]))
    seen = {}

    def enter(phase):
        os.write(trace, (phase + "\n").encode())
        seen[phase] = seen.get(phase, 0) + 1
        if phase == pause and seen[phase] == nth:
            (folder / f"{phase}.{tag}").touch()
            time.sleep(600)

    class Halves:
        """A file whose every write lands in two halves, the phase entered in between."""

        def __init__(self, fh, phase):
            self.fh, self.phase = fh, phase

        def write(self, data):
            half = len(data) // 2
            self.fh.write(data[:half])
            self.fh.flush()
            enter(self.phase)
            return half + self.fh.write(data[half:])

        def __getattr__(self, name):
            return getattr(self.fh, name)

    @contextlib.contextmanager
    def atomic_open(path, mode="w", **kwargs):
        name = Path(path).name
        phase = "maps" if name.endswith(".maps.npz") else "record" if name.startswith("seed") else None
        with _atomic_open(path, mode, **kwargs) as fh:
            yield fh if phase is None else Halves(fh, phase)
        if phase == "record":
            enter("recorded")

    def build_algorithm(*args, **kwargs):
        algo = _build(*args, **kwargs)
        fit, predict = algo.fit, algo.predict_map

        def batches(loader):
            for i, batch in enumerate(loader):
                yield batch
                if i == 0:
                    enter("fit")

        class Train:
            def __init__(self, loader):
                self.loader = loader

            def __len__(self):
                return len(self.loader)

            def __iter__(self):
                return batches(self.loader)

        calls = [0]

        def predict_map(images):
            calls[0] += 1
            if calls[0] == 2:
                enter("predict")
            return predict(images)

        algo.fit = lambda train, val=None: fit(Train(train), val)
        algo.predict_map = predict_map
        return algo

    bmad.runner.build_algorithm = build_algorithm
    bmad.fsutil.atomic_open = atomic_open
    try:
        code = bmad.cli.main(cmd["argv"])
    except BaseException:
        traceback.print_exc()
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    (folder / f"done.{tag}").touch()
    os._exit(code)


for line in sys.stdin:
    cmd = json.loads(line)
    if "wait" in cmd:
        _, status = os.waitpid(cmd["wait"], 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        try:
            child(cmd)
        finally:
            os._exit(70)
    print(json.dumps({"pid": pid}), flush=True)
'''

PHASES = ("fit", "predict", "maps", "record")


class Harness:
    """The test's side of ``HARNESS``: start children, pause them at a phase, kill, reap."""

    def __init__(self, folder: Path, plugin: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[int, Path] = {}  # child -> the stem of its files (FOLDER/TAG: FOLDER/log.TAG, ...)
        script = folder / "harness.py"
        script.write_text(HARNESS)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), str(REPO)]), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=folder)
        self.live: set[int] = set()
        assert self.proc.stdout is not None and self.proc.stdout.readline(), "the harness did not start"

    def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the harness died (exit code {self.proc.poll()})"
        return json.loads(line)

    def start(self, argv: list[str], folder: Path, pause: str | None = None, nth: int = 1,
              fsize: int | None = None) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        tag = str(len(self.files))
        pid = self._ask({"argv": argv, "dir": str(folder), "tag": tag, "pause": pause, "nth": nth,
                         "fsize": fsize})["pid"]
        self.live.add(pid)
        self.files[pid] = folder / tag
        return pid

    def _file(self, pid: int, kind: str) -> Path:
        return self.files[pid].with_name(f"{kind}.{self.files[pid].name}")

    def wait(self, pid: int) -> int:
        self.live.discard(pid)
        return self._ask({"wait": pid})["status"]

    def done(self, pid: int) -> bool:
        return self._file(pid, "done").exists()

    def paused(self, pid: int, phase: str) -> bool:
        return self._file(pid, phase).exists()

    def trace(self, pid: int) -> list[str]:
        path = self._file(pid, "trace")
        return path.read_text().split() if path.exists() else []

    def log(self, pid: int) -> str:
        path = self._file(pid, "log")
        return path.read_text() if path.exists() else ""

    def run(self, argv: list[str], folder: Path, timeout: float = 300, fsize: int | None = None) -> tuple[int, str]:
        """Run a child to its end; (exit code, its output)."""
        pid = self.start(argv, folder, fsize=fsize)
        deadline = time.monotonic() + timeout
        while not self.done(pid):
            assert time.monotonic() < deadline, f"the child {pid} did not finish: {self.log(pid)[-2000:]}"
            time.sleep(0.02)
        return self.wait(pid), self.log(pid)

    def close(self) -> None:
        for pid in list(self.live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.wait(pid)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, toy_plugin: Path):
    h = Harness(tmp_path_factory.mktemp("harness"), toy_plugin)
    yield h
    h.close()


def _sweep_argv(bench: Path, res: Path, seeds: int) -> list[str]:
    return ["run", "--algo", "toy", "--bench", f"folder:{bench}", "--seeds", str(seeds), "--results", str(res),
            "--no-progress"]


def _where(trace: list[str]) -> str:
    """The phase a process was in when killed, from its trace."""
    last = trace[-1] if trace else "startup"
    return "between runs" if last == "recorded" else last


def _check_after_kill(res: Path, kept: dict[Path, bytes]) -> None:
    """What a kill leaves: only valid ok records, each with its map sample; a record once
    written is never rewritten (``kept`` holds the bytes of those seen so far)."""
    for p in res.rglob("seed*.json"):
        rec = read_record(p)
        assert rec["status"] == "ok", (p, rec.get("error"))
        sample = p.with_name(rec["map_sample"]["file"])
        with np.load(sample, allow_pickle=False) as z:
            assert z["maps"].shape[0] == rec["map_sample"]["n"]
        data = p.read_bytes()
        assert kept.setdefault(p, data) == data, f"{p} was rewritten after it was recorded ok"


def _check_final(res: Path, reference: Path, seeds: int) -> None:
    """Every run has exactly one valid ok record, with the metrics and scores of an
    uninterrupted sweep; no temp, partial or orphan file is left."""
    loaded = load_records(res)
    assert not loaded.skipped, loaded.skipped
    assert sorted(r["seed"] for r in loaded.records) == list(range(seeds))
    assert all(r["status"] == "ok" for r in loaded.records)
    assert len({r["config_hash"] for r in loaded.records}) == 1
    ref = {r["seed"]: r for r in load_records(reference).records}
    for r in loaded.records:
        assert r["metrics"] == ref[r["seed"]]["metrics"] and r["per_image"] == ref[r["seed"]]["per_image"]
    files = sorted(p.relative_to(res).as_posix() for p in res.rglob("*") if p.is_file())
    folder = f"runs/{loaded.records[0]['bench']}/toy/{loaded.records[0]['config_hash']}"
    expected = sorted(f"{folder}/seed{s}.{ext}" for s in range(seeds) for ext in ("json", "maps.npz"))
    assert files == expected, "temp, partial or orphan files left"


def sweep_kill_loop(harness: Harness, tmp_path: Path, seeds: int, per_phase: int, random_kills: int,
                    rng: random.Random) -> Counter[str]:
    """Kill a toy sweep ``per_phase`` times at each phase and ``random_kills`` times at a
    random moment, rerunning it each time; then finish it and check the results against
    an uninterrupted sweep. Returns the kills per phase."""
    bench = make_bench(tmp_path / "Bench", n_train=80, n_test=(20, 20))  # 3 training and 2 test batches of 32
    reference, res = tmp_path / "reference", tmp_path / "res"
    t0 = time.monotonic()
    code, out = harness.run(_sweep_argv(bench, reference, seeds), tmp_path / "trace")
    full = time.monotonic() - t0
    assert code == 0, out
    plan = [p for p in PHASES for _ in range(per_phase)] + [None] * random_kills
    rng.shuffle(plan)
    kills: Counter[str] = Counter()
    kept: dict[Path, bytes] = {}
    for target in plan:
        done = len(list(res.rglob("seed*.json")))
        if done == seeds:  # finished: start over, the kills go on
            kept.clear()
            for p in sorted(res.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            done = 0
        nth = rng.randint(1, seeds - done)  # which of the remaining runs is hit
        pid = harness.start(_sweep_argv(bench, res, seeds), tmp_path / "trace", pause=target, nth=nth)
        # a random kill: at a moment spread over how long the remaining runs take
        deadline = time.monotonic() + (rng.uniform(0, full * (seeds - done + 1) / (seeds + 1)) if target is None
                                       else 120)
        while time.monotonic() < deadline and not harness.done(pid):
            if target is not None and harness.paused(pid, target):
                break
            time.sleep(0.005)
        if harness.done(pid):
            assert target is None, f"the child never reached {target}: {harness.log(pid)[-2000:]}"
            assert harness.wait(pid) == 0, harness.log(pid)
            continue
        assert target is None or harness.paused(pid, target), f"no pause at {target} within 120 s"
        os.kill(pid, signal.SIGKILL)
        assert harness.wait(pid) == -signal.SIGKILL
        kills[_where(harness.trace(pid))] += 1
        if target in ("maps", "record"):  # killed half-way through writing: the torn temp file is there
            pattern = ".seed*.maps.npz.*.tmp" if target == "maps" else ".seed*.json.*.tmp"
            assert list(res.rglob(pattern)), f"no temp file after a kill while writing the {target}"
        _check_after_kill(res, kept)
    code, out = harness.run(_sweep_argv(bench, res, seeds), tmp_path / "trace")
    assert code == 0, out
    _check_final(res, reference, seeds)
    return kills


def test_sweep_killed_at_every_phase_loses_nothing(harness: Harness, tmp_path: Path) -> None:
    kills = sweep_kill_loop(harness, tmp_path, seeds=4, per_phase=1, random_kills=2, rng=random.Random(8))
    print(f"sweep kills per phase: {dict(kills)}")
    assert all(kills[p] >= 1 for p in PHASES), kills


@pytest.mark.slow
def test_sweep_killed_many_times_loses_nothing(harness: Harness, tmp_path: Path) -> None:
    kills = sweep_kill_loop(harness, tmp_path, seeds=6, per_phase=15, random_kills=60, rng=random.Random(2024))
    print(f"sweep kills per phase: {dict(kills)} ({sum(kills.values())} in all)")
    assert all(kills[p] >= 15 for p in PHASES) and sum(kills.values()) >= 90, kills


# ---------------------------------------------------------------------------------------
# `bmad prepare` killed at random points, rerun: byte-identical to an uninterrupted run
# ---------------------------------------------------------------------------------------
OCT_FOLDER = "Retina_OCT2017"


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX path -> digest)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare_args(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bmad.cli", "prepare", "oct2017", "--raw", str(raw), "--out", str(out),
            "--workers", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def oct_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """A generated OCT2017 raw set (500 JPEGs of 256 x 256: `bmad prepare --workers 2` takes
    a couple of seconds), the bench an uninterrupted `bmad prepare` writes from it, and how
    long that took."""
    from datasets_prep.oct2017 import OCT2017

    raw = OCT2017.synthesize(tmp_path_factory.mktemp("octraw"), n=500, seed=0, size=(256, 256))
    out = tmp_path_factory.mktemp("octref")
    t0 = time.monotonic()
    done = subprocess.run(_prepare_args(raw, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return raw, out / OCT_FOLDER, time.monotonic() - t0


def _journaled(out: Path) -> int:
    """Jobs a `bmad prepare` writing into ``out`` has journaled (finished) so far."""
    journal = out / f".{OCT_FOLDER}.partial" / "journal.jsonl"
    try:
        return journal.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _stage_state(out: Path) -> str:
    """Where a killed `bmad prepare` stopped, from what it left."""
    stage = out / f".{OCT_FOLDER}.partial"
    if not stage.is_dir():
        return "planning (nothing staged)"
    if (stage / "journal.jsonl").exists():
        return "writing images"
    return "finishing (manifest, rename)"


def prepare_kill_loop(oct_raw: tuple[Path, Path, float], out: Path, writing_kills: int, random_kills: int,
                      rng: random.Random) -> Counter[str]:
    """SIGKILL `bmad prepare`, rerun it each time: ``random_kills`` times at a random moment,
    ``writing_kills`` times once a random number of further images is written (the last
    kill is one of those); then rerun it to the end and check the bench is byte-identical
    to the uninterrupted one and that the last run resumed. Returns the kills by where
    they hit."""
    raw, reference, full = oct_raw
    jobs = len((reference / "manifest.csv").read_text().splitlines()) - 1
    plan = ["random"] * random_kills + ["writing"] * (writing_kills - 1)
    rng.shuffle(plan)
    kills: Counter[str] = Counter()
    todo = [*plan, "writing"]
    while todo:
        mode = todo.pop(0)
        before = _journaled(out)
        if mode == "writing" and jobs - before < 2:  # no image left to kill between: start afresh
            shutil.rmtree(out / f".{OCT_FOLDER}.partial")
            before = 0
        proc = subprocess.Popen(_prepare_args(raw, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if mode == "random":
            time.sleep(rng.uniform(0.3, full))
        else:  # wait for k more journal lines: the kill lands between images
            want = before + rng.randint(1, max(1, (jobs - before) // 2))
            while proc.poll() is None and _journaled(out) < want:
                time.sleep(0.002)
        if proc.poll() is not None:  # finished before the kill: start from scratch again
            # (a random kill too late, or a writing kill after a kill that hit the final rename)
            assert proc.returncode == 0
            if mode == "writing":
                todo.insert(0, mode)
            assert _tree(out / OCT_FOLDER) == _tree(reference)
            for p in sorted((out / OCT_FOLDER).rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            (out / OCT_FOLDER).rmdir()
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills[_stage_state(out)] += 1
        # a reader never sees a half bench: the bench folder exists only once it is complete
        assert not (out / OCT_FOLDER).exists() or _tree(out / OCT_FOLDER) == _tree(reference)
        assert {p.name for p in out.iterdir()} <= {OCT_FOLDER, f".{OCT_FOLDER}.partial"}
    final = subprocess.run(_prepare_args(raw, out), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert "resumed:" in final.stdout  # it kept what the killed runs wrote (re-verified), not a fresh start
    assert _tree(out / OCT_FOLDER) == _tree(reference)  # every file, manifest.csv included, byte for byte
    assert (out / OCT_FOLDER / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()
    assert [p.name for p in out.iterdir()] == [OCT_FOLDER], "a staging folder is left"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    return kills


def test_prepare_killed_then_rerun_is_byte_identical(oct_raw: tuple[Path, Path, float], tmp_path: Path) -> None:
    kills = prepare_kill_loop(oct_raw, tmp_path, writing_kills=2, random_kills=1, rng=random.Random(5))
    print(f"prepare kills: {dict(kills)}")
    assert kills["writing images"] >= 2, kills


@pytest.mark.slow
def test_prepare_killed_many_times_is_byte_identical(oct_raw: tuple[Path, Path, float], tmp_path: Path) -> None:
    kills = prepare_kill_loop(oct_raw, tmp_path, writing_kills=12, random_kills=12, rng=random.Random(77))
    print(f"prepare kills: {dict(kills)} ({sum(kills.values())} in all)")
    assert kills["writing images"] >= 12, kills


# ---------------------------------------------------------------------------------------
# corrupt and foreign records: reported (which file, why) and ignored, never a crash
# ---------------------------------------------------------------------------------------
def _changed(rec: dict[str, Any], **changes: Any) -> bytes:
    out = json.loads(json.dumps(rec))
    for key, value in changes.items():
        if value is None and key in ("metrics", "seed"):
            del out[key]
        else:
            out[key] = value
    return json.dumps(out).encode()


def _bad_files(good: dict[str, Any]) -> dict[str, tuple[bytes | str, str]]:
    """Kind -> (bytes of the file, or a special kind of file; a piece of the reason given)."""
    text = json.dumps(good)
    metrics = dict(good["metrics"])
    return {
        "truncated": (text[: len(text) // 2].encode(), "unreadable JSON"),
        "empty": (b"", "unreadable JSON"),
        "binary": (bytes(random.Random(0).randrange(256) for _ in range(4096)), "unreadable JSON"),
        "not_an_object": (b"[0.9, 0.8]", "not a JSON object (a JSON array)"),
        "a_string": (b'"ok"', "not a JSON object (a JSON string)"),
        "missing_keys": (_changed(good, metrics=None, seed=None), "missing keys"),
        "metrics_as_strings": (_changed(good, metrics={**metrics, "image_auroc": "0.93"}), "is not a fraction"),
        "metrics_not_an_object": (_changed(good, metrics=[0.9]), "metrics is a JSON array"),
        "metric_out_of_range": (_changed(good, metrics={**metrics, "image_auroc": 93.1}), "is not a fraction"),
        "metric_nan": (_changed(good, metrics={**metrics, "image_auroc": float("nan")}), "image_auroc=nan"),
        "metric_boolean": (_changed(good, metrics={**metrics, "image_auroc": True}), "is not a fraction"),
        "seed_as_string": (_changed(good, seed="zero"), "seed 'zero'"),
        "seed_huge": (_changed(good, seed=10**40), "is not an integer"),
        "bench_escapes": (_changed(good, bench="../../../../tmp"), "not a plain name"),
        "algo_not_a_string": (_changed(good, algo=["toy"]), "not a plain name"),
        "config_hash_null": (_changed(good, config_hash=None), "not a plain name"),
        "config_not_an_object": (_changed(good, config="lr=0.1"), "config is a JSON string"),
        "shots_as_string": (_changed(good, shots="five"), "shots"),
        "status_unknown": (_changed(good, status="running"), "status 'running'"),
        "sweep_not_an_object": (_changed(good, sweep=[3]), "sweep is a JSON array"),
        "sweep_seeds_as_string": (_changed(good, sweep={"seeds": "many"}), "sweep.seeds"),
        "timing_as_strings": (_changed(good, timing={**good["timing"], "ms_per_image": "fast"}), "timing.ms_per_image"),
        "memory_not_an_object": (_changed(good, memory="1 GB"), "memory is a JSON string"),
        "train_bench_escapes": (_changed(good, train_bench="../other"), "train_bench"),
        "run_not_an_object": (_changed(good, run="folder:/x"), "run is a JSON string"),
        "per_image_mismatch": (_changed(good, per_image={"scores": [0.1, 0.2, 0.3], "labels": [0, 1]}), "per_image"),
        "per_image_one_class": (_changed(good, per_image={"scores": [0.1, 0.2], "labels": [0, 0]}), "both classes"),
        "map_sample_escapes": (_changed(good, map_sample={"file": "../../../../etc/passwd", "n": 1}), "map_sample"),
        "future_version": (_changed(good, schema=2), "written by a newer bmad"),
        "older_version": (_changed(good, schema=0), "schema version 0"),
        "schema_as_string": (_changed(good, schema="1"), "schema version '1'"),
        "nested_deeply": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "huge": ("huge", "larger than any run record"),
        "symlink_loop": ("symlink_loop", "unreadable"),
        "dangling_symlink": ("dangling_symlink", "unreadable"),
        "fifo": ("fifo", "not a regular file"),
        "directory": ("directory", "not a regular file"),
    }


def _plant(path: Path, content: bytes | str) -> None:
    """Write one bad record file (or make the special file ``content`` names) at ``path``."""
    from bmad.records import MAX_RECORD_BYTES

    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "huge":  # sparse: takes no disk space
        with open(path, "wb") as fh:
            fh.truncate(MAX_RECORD_BYTES + 1)
    elif content == "symlink_loop":
        path.symlink_to(path.name)
    elif content == "dangling_symlink":
        path.symlink_to(path.with_name("nowhere.json"))
    elif content == "fifo":  # opening it for reading blocks until a writer comes: a reader must not open it blindly
        os.mkfifo(path)
    else:
        path.mkdir()


Polluted = tuple[Path, dict[str, str], Path]


@pytest.fixture(scope="module")
def polluted(toy_plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> Polluted:
    """A results folder with three good toy records and every kind of bad file beside them
    (each at ``runs/<bench>/toy/bad-<kind>/seed0.json``); also a directory symlink loop.
    Returns the folder, kind -> expected piece of the reason, and a good record's path."""
    root = tmp_path_factory.mktemp("polluted")
    bench = make_bench(root / "Toy")
    res = root / "results"
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{bench}", "--seeds", "3", "--results", str(res),
                   "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    good_path = next(res.rglob("seed0.json"))
    good = json.loads(good_path.read_text())
    algo_dir = good_path.parent.parent
    reasons = {}
    for kind, (content, reason) in _bad_files(good).items():
        _plant(algo_dir / f"bad-{kind}" / "seed0.json", content)
        reasons[kind] = reason
    (algo_dir / "loop").symlink_to("..")  # a directory cycle: the scan must not follow it
    return res, reasons, good_path


def _assert_reported(stderr: str, res: Path, reasons: dict[str, str]) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("bmad: skipped ")]
    for kind, reason in reasons.items():
        hit = [ln for ln in lines if f"/bad-{kind}/seed0.json: " in ln]
        assert len(hit) == 1, f"{kind}: reported {len(hit)} times in:\n{stderr}"
        assert reason in hit[0], f"{kind}: {hit[0]!r} does not say {reason!r}"
    assert len(lines) == len(reasons), "a good record was skipped, or a bad file reported twice"


LEADERBOARD_VARIANTS = [
    ["leaderboard"],
    ["leaderboard", "--format", "latex"],
    ["leaderboard", "--format", "csv"],
    ["leaderboard", "--format", "html"],
    ["leaderboard", "--compare", "all", "--compare-missing"],
    ["leaderboard", "--stats", "--test", "wilcoxon"],
    ["leaderboard", "--bootstrap", "100", "--efficiency"],
    ["report"],
    ["plot", "efficiency"],
]


@pytest.mark.parametrize("argv", LEADERBOARD_VARIANTS, ids=lambda a: " ".join(a))
def test_corrupt_records_are_reported_and_ignored(polluted: Polluted, argv: list[str],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bmad.cli import main

    res, reasons, _ = polluted
    extra = ["--out", str(tmp_path / "figures")] if argv[0] == "plot" else ["--out", str(tmp_path / "r.html")] \
        if argv[0] == "report" else []
    assert main([*argv, "--results", str(res), *extra]) == 0
    captured = capsys.readouterr()
    _assert_reported(captured.err, res, reasons)
    if argv[0] == "leaderboard":
        assert "toy" in captured.out and ("3/3" in captured.out or ",3,3," in captured.out)  # the good records
    else:
        assert "wrote" in captured.out


def test_transfer_tables_report_corrupt_records_too(polluted: Polluted,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from bmad.cli import main

    res, reasons, _ = polluted
    assert main(["leaderboard", "--transfer", "--results", str(res)]) == 2  # no cross-bench runs in there
    captured = capsys.readouterr()
    _assert_reported(captured.err, res, reasons)
    assert "no cross-bench runs" in captured.err


def test_corrupt_records_through_the_real_cli(polluted: Polluted) -> None:
    res, reasons, _ = polluted
    out = run_bmad("leaderboard", "--results", str(res), "--stats", timeout=120)  # a FIFO must not hang it
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    _assert_reported(out.stderr, res, reasons)
    assert "| toy | 3/3 |" in out.stdout


def test_a_corrupt_record_is_rerun_by_the_sweep(harness: Harness, polluted: Polluted, tmp_path: Path) -> None:
    """The run whose record is bad counts as not done: the same command redoes it."""
    from bmad.records import is_done

    res, _, good = polluted
    for kind in ("truncated", "fifo", "huge", "symlink_loop"):
        assert not is_done(good.parent.parent / f"bad-{kind}" / "seed0.json")
    fresh = tmp_path / "res"
    target = fresh / good.relative_to(res)
    target.parent.mkdir(parents=True)
    os.mkfifo(target)  # the worst kind: blocks a reader that opens it blindly
    rec = read_record(good)
    code, out = harness.run(["run", "--algo", "toy", "--bench", rec["run"]["bench"], "--results", str(fresh),
                             "--no-progress"], tmp_path / "log", timeout=120)
    assert code == 0, out
    assert read_record(target)["metrics"] == rec["metrics"]


def test_a_rounding_error_past_one_is_not_a_corrupt_record(tmp_path: Path) -> None:
    """AUPRO of perfect maps sums to 1.0000000000000002: such a record is valid (it was
    skipped by the leaderboard, and rerun by every sweep, before)."""
    from bmad.metrics import aupro
    from bmad.records import is_done, write_record

    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:5, 3:9] = masks[1, 8:12, 1:3] = masks[2, 0:2, 0:16] = True
    maps = masks + 0.4 * np.random.default_rng(1).random(masks.shape) * ~masks
    value = aupro(maps.astype(np.float32), masks)
    assert value == pytest.approx(1.0) and value <= 1.0  # the metric itself is clamped to a fraction
    rec = {"bench": "b", "algo": "a", "seed": 0, "shots": None, "config": {}, "config_hash": "abc", "status": "ok",
           "metrics": {"aupro": 1.0000000000000002, "image_auroc": 1.0}}
    write_record(tmp_path / "seed0.json", rec)
    assert read_record(tmp_path / "seed0.json")["metrics"]["aupro"] == 1.0000000000000002
    assert is_done(tmp_path / "seed0.json")
    write_record(tmp_path / "seed1.json", {**rec, "metrics": {"aupro": 1.001}})
    with pytest.raises(ValueError, match="not a fraction"):
        read_record(tmp_path / "seed1.json")


# ---------------------------------------------------------------------------------------
# a full disk: the previous state stays intact, the error is bmad's, not a traceback
# ---------------------------------------------------------------------------------------
def _limited(limit: int) -> Any:
    """A preexec_fn: files can grow to ``limit`` bytes; a write past it fails with EFBIG
    (SIGXFSZ ignored), as on a full disk."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _bmad_limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`bmad ARGS` in a fresh process whose files cannot grow past ``limit`` bytes."""
    return subprocess.run([sys.executable, "-m", "bmad.cli", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(limit))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_while_writing_a_record_keeps_the_old_one(harness: Harness, tmp_path: Path) -> None:
    bench = make_bench(tmp_path / "B")
    res, flag = tmp_path / "res", tmp_path / "oom"
    flag.touch()  # while it exists the toy's fit fails: the first run leaves a failed record
    argv = ["run", "--algo", "toy", "--bench", f"folder:{bench}", "--param", f"oom_flag={flag}", "--results", str(res),
            "--no-progress"]
    assert harness.run(argv, tmp_path / "log")[0] == 1
    (record,) = res.rglob("seed0.json")
    before = _files(res)
    assert read_record(record)["status"] == "failed"
    flag.unlink()  # the rerun succeeds, but its map sample and record (each > 1 KB) cannot be written
    code, out = harness.run(argv, tmp_path / "log", fsize=1024)
    assert code == 1 and "Traceback" not in out, out
    assert f"bmad: error: cannot write {record}: File too large" in out and "fix: free disk space" in out
    assert _files(res) == before  # the old record byte for byte; no temp file, no map sample
    code, out = harness.run(argv, tmp_path / "log")  # room again: the same command finishes the run
    assert code == 0, out
    assert read_record(record)["status"] == "ok"


def test_disk_full_while_preparing_keeps_the_old_bench(oct_raw: tuple[Path, Path, float], tmp_path: Path) -> None:
    """`bmad prepare --overwrite` with other options over a prepared bench, on a full disk:
    first no image fits, then the images fit but the journal does not; each time the old
    bench is untouched and no temp file is left. With room again, it resumes and finishes."""
    import shutil

    raw, reference, _ = oct_raw
    out = tmp_path / "data"
    shutil.copytree(reference, out / OCT_FOLDER)
    before = _files(out / OCT_FOLDER)
    args = _prepare_args(raw, out, "--split-seed", "1", "--overwrite")[3:]
    biggest = max(p.stat().st_size for p in reference.rglob("*.png"))
    for limit, full in ((4096, "/img/"), (biggest + 4096, "journal.jsonl")):
        failed = _bmad_limited(limit, *args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "bmad: error: cannot write " in failed.stderr and "File too large" in failed.stderr
        assert full in failed.stderr.split("cannot write ", 1)[1].split(":", 1)[0], failed.stderr
        assert _files(out / OCT_FOLDER) == before
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    resumed = subprocess.run(_prepare_args(raw, out, "--split-seed", "1", "--overwrite"), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stdout  # the images written before the journal filled up are kept
    assert _tree(out / OCT_FOLDER) != _tree(reference)  # the new split replaced the old bench, whole
    assert [p.name for p in out.iterdir()] == [OCT_FOLDER]


def test_a_torn_journal_line_is_cut_so_later_jobs_are_kept(tmp_path: Path) -> None:
    """A kill or a full disk can tear the journal's last line; the next line appended used
    to join it and be lost with it (its job redone on every later resume)."""
    from datasets_prep.common import JOURNAL, Job, Output, png_bytes, write_bench

    class Crash(BaseException):
        """Stands in for a kill."""

    def job_fn(calls: list[str], crash_after: int | None = None) -> Any:
        def fn(key: str) -> list[Output]:
            if crash_after is not None and len(calls) >= crash_after:
                raise Crash
            calls.append(key)
            return [Output("train", "good", f"{key}.png", png_bytes(np.full((4, 4), len(calls), np.uint8)))]
        return fn

    jobs = [Job(f"k{i}", f"k{i}.raw", f"k{i}") for i in range(8)]
    with pytest.raises(Crash):
        write_bench(tmp_path, "B", jobs, job_fn([], crash_after=3), fingerprint="f", progress=False)
    journal = tmp_path / ".B.partial" / JOURNAL
    journal.write_bytes(journal.read_bytes()[:-20])  # the third line torn
    calls: list[str] = []
    with pytest.raises(Crash):
        write_bench(tmp_path, "B", jobs, job_fn(calls, crash_after=3), fingerprint="f", progress=False)
    assert calls == ["k2", "k3", "k4"]
    summary = write_bench(tmp_path, "B", jobs, job_fn([]), fingerprint="f", progress=False)
    assert summary.reused == 5  # k0, k1 and the three of the second run


# ---------------------------------------------------------------------------------------
# untrusted checkpoints: a planted malicious pickle never runs
# ---------------------------------------------------------------------------------------
class Payload:
    """Unpickled by a plain unpickler, it creates the file ``marker`` (any code could run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.marker, "w")


def _evil_checkpoint(folder: Path, fmt: str, marker: Path) -> Path:
    """A checkpoint that holds real tensors and the payload, in format ``fmt``."""
    import pickle
    import zipfile

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    obj = {"state_dict": {"w": torch.zeros(3)}, "meta": Payload(marker)}
    if fmt == "torch_zip":
        torch.save(obj, folder / "evil.pt")
        return folder / "evil.pt"
    if fmt == "torch_legacy":
        torch.save(obj, folder / "evil.pth", _use_new_zipfile_serialization=False)
        return folder / "evil.pth"
    if fmt == "plain_pickle":
        (folder / "evil.bin").write_bytes(pickle.dumps(obj, protocol=2))
        return folder / "evil.bin"
    if fmt == "pickle_named_safetensors":
        (folder / "evil.safetensors").write_bytes(pickle.dumps(obj, protocol=2))
        return folder / "evil.safetensors"
    assert fmt == "torchscript_lookalike"  # a zip with TorchScript's code/ folder and the payload as its data
    with zipfile.ZipFile(folder / "evil.pt", "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(obj, protocol=2))
        zf.writestr("evil/code/__torch__/model.py", "def forward(self): pass\n")
        zf.writestr("evil/version", "3\n")
    return folder / "evil.pt"


FORMATS = ("torch_zip", "torch_legacy", "plain_pickle", "pickle_named_safetensors", "torchscript_lookalike")


def test_the_planted_pickle_is_live(tmp_path: Path) -> None:
    """The control: a plain unpickler runs the payload (so the refusals below mean something)."""
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def _load_timm(path: Path) -> None:
    from bmad.weights import create_timm_backbone

    create_timm_backbone("resnet18", pretrained=True, weights=path)


def _load_clip(path: Path) -> None:
    from algorithms.clip.models import TINY_CLIP, build_clip, load_clip_weights

    load_clip_weights(build_clip(TINY_CLIP, None), path)


def _load_clip_folder(path: Path) -> None:
    """A local-dir: CLIP whose weights file is the planted one."""
    import open_clip

    from algorithms.clip.models import TINY_CLIP, build_clip, register_tiny

    register_tiny()
    folder = path.parent / "clip_folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(TINY_CLIP)}))
    path.rename(folder / "open_clip_pytorch_model.bin")
    build_clip(f"local-dir:{folder}", "local")


def _load_checkpoint(path: Path) -> None:
    from bmad.weights import load_checkpoint

    load_checkpoint(path)


LOADERS = {"load_checkpoint": _load_checkpoint, "timm_backbone": _load_timm, "clip_weights": _load_clip,
           "clip_local_dir": _load_clip_folder}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_checkpoint_is_refused_by_every_loader(loader: str, fmt: str, tmp_path: Path) -> None:
    from bmad.errors import WeightsError

    marker = tmp_path / "code_ran"
    path = _evil_checkpoint(tmp_path / "ckpt", fmt, marker)
    with pytest.raises(WeightsError) as err:
        LOADERS[loader](path)
    assert "evil" in str(err.value) or "open_clip_pytorch_model.bin" in str(err.value)
    assert not marker.exists()


def test_malicious_weights_through_bmad_run_are_refused(harness: Harness, tmp_path: Path) -> None:
    """`bmad run --weights evil.pt` for a timm-backbone algorithm (CutPaste) and a CLIP one
    (WinCLIP): both runs are recorded as failed with the refusal; the code never ran."""
    import open_clip

    from algorithms.clip.models import TINY_CLIP, register_tiny

    marker = tmp_path / "code_ran"
    evil = _evil_checkpoint(tmp_path / "ckpt", "torch_zip", marker)
    register_tiny()
    clip = tmp_path / "clip"  # a local-dir: CLIP (the tiny one) whose weights are --weights
    clip.mkdir()
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(TINY_CLIP)}))
    bench = make_bench(tmp_path / "B", n_train=4, n_test=(2, 2), n_valid=(1, 1))
    res = tmp_path / "res"
    code, out = harness.run(["run", "--algo", "cutpaste,winclip", "--bench", f"folder:{bench}", "--weights",
                             str(evil), "--param", "cutpaste:input_size=32",
                             "--param", f"winclip:clip_model=local-dir:{clip}", "--param", "winclip:image_size=224",
                             "--results", str(res), "--no-progress"], tmp_path / "log")
    assert code == 1, out
    records = load_records(res).records
    assert sorted(r["algo"] for r in records) == ["cutpaste", "winclip"]
    for r in records:
        assert r["status"] == "failed" and f"refusing to load {evil}" in r["error"], r
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# untrusted paths: manifest entries and output names stay inside the bench folder
# ---------------------------------------------------------------------------------------
def _small_bench(out: Path, fingerprint: str = "fp") -> Path:
    from datasets_prep.common import Job, Output, mask_png, png_bytes, write_bench

    def fn(i: int) -> list[Output]:
        img = np.full((6, 6), 40 * i, np.uint8)
        if i % 2:
            return [Output("test", "Ungood", f"u{i}.png", png_bytes(img), mask_png(img > 0), source=f"u{i}.raw")]
        return [Output("train", "good", f"g{i}.png", png_bytes(img), source=f"g{i}.raw")]

    write_bench(out, "B", [Job(f"k{i}", f"k{i}.raw", i) for i in range(1, 5)], fn, fingerprint=fingerprint,
                progress=False)
    return out / "B"


@pytest.mark.parametrize("column", ["path", "mask"])
@pytest.mark.parametrize("where", ["../outside.png", "train/../../outside.png", "ABSOLUTE"])
def test_manifest_paths_outside_the_bench_are_refused(column: str, where: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A manifest (made consistent: its sha256 in prepare.json) whose path or mask points
    outside the bench at a file with the right sha256: the bench is not trusted, so it is
    neither kept as verified nor read through; --overwrite rebuilds it, the outside file untouched."""
    import csv
    import io

    from bmad.errors import UsageError
    from datasets_prep.common import STATE, manifest_text, verified_bench

    bench = _small_bench(tmp_path / "data")
    outside = tmp_path / "outside.png"
    outside.write_bytes((bench / "train/good/img/g2.png").read_bytes())
    target = str(outside) if where == "ABSOLUTE" else where
    rows = list(csv.DictReader(io.StringIO((bench / "manifest.csv").read_text())))
    row = next(r for r in rows if r["mask"])  # an Ungood row: it has both a path and a mask
    row[column] = target
    if column == "path":
        row["sha256"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    text = manifest_text(rows)
    (bench / "manifest.csv").write_text(text)
    state = json.loads((bench / STATE).read_text())
    state["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (bench / STATE).write_text(json.dumps(state))

    with caplog.at_level("WARNING"):
        assert verified_bench(bench, "fp") is None
    assert "not a relative path inside the bench folder" in caplog.text and target in caplog.text
    with pytest.raises(UsageError, match="already exists and differs"):
        _small_bench(tmp_path / "data")
    before = outside.read_bytes()
    from datasets_prep.common import Job, Output, png_bytes, write_bench

    write_bench(tmp_path / "data", "B", [Job("a", "a.raw")],
                lambda _: [Output("train", "good", "a.png", png_bytes(np.zeros((4, 4), np.uint8)))],
                fingerprint="other", overwrite=True, progress=False)
    assert outside.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "outside.png"]


@pytest.mark.parametrize(("split", "label", "name"), [
    ("train", "good", "../../../../../escaped.png"),
    ("train", "good", "sub/dir.png"),
    ("train", "good", "..\\escaped.png"),
    ("train", "good", ".hidden.png"),
    ("train", "good", ""),
    ("../../..", "good", "escaped.png"),
    ("ABSOLUTE", "good", "escaped.png"),
    ("train", "../../../x", "escaped.png"),
])
def test_output_names_cannot_leave_the_bench(split: str, label: str, name: str, tmp_path: Path) -> None:
    """Output names come from raw file names and CSV fields: one that would be written
    outside its folder is refused (skipped with the reason, or a DataError with --on-error fail)."""
    from bmad.errors import DataError
    from datasets_prep.common import Job, Output, png_bytes, write_bench

    pixels = png_bytes(np.zeros((4, 4), np.uint8))
    split = str(tmp_path / "abs") if split == "ABSOLUTE" else split

    def fn(key: str) -> list[Output]:
        if key == "bad":
            return [Output(split, label, name, pixels, source="bad.raw")]
        return [Output("train", "good", "fine.png", pixels, source="fine.raw")]

    jobs = [Job("bad", "bad.raw", "bad"), Job("fine", "fine.raw", "fine")]
    out = tmp_path / "deep" / "er" / "out"
    summary = write_bench(out, "B", jobs, fn, fingerprint="f", progress=False)
    assert [s for s, _ in summary.skipped] == ["bad.raw"]
    assert "is not" in summary.skipped[0][1]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["deep/er/out/B/manifest.csv", "deep/er/out/B/prepare.json", "deep/er/out/B/skipped.csv",
                       "deep/er/out/B/train/good/img/fine.png"]
    with pytest.raises(DataError, match="bad.raw"):
        write_bench(tmp_path / "again", "B", jobs, fn, fingerprint="f", on_error="fail", progress=False)


def test_nothing_extracts_archives() -> None:
    """No code in bmad, algorithms or datasets_prep extracts an archive (zip, tar), so no
    archive member can be written outside a folder; the one zip bmad opens (a CLIP
    checkpoint, to tell TorchScript apart) is only listed. Code that starts extracting
    must check every member's path (and test it) before this test is changed."""
    import ast

    found = []
    for path in sorted(p for pkg in ("bmad", "algorithms", "datasets_prep") for p in (REPO / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if node.func.attr in ("extract", "extractall", "extractfile", "unpack_archive") or owner == "tarfile":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{node.func.attr}()")
    assert not found, found


# ---------------------------------------------------------------------------------------
# a killed sweep's worker processes
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_workers_of_a_killed_sweep_exit(toy_plugin: Path, tmp_path: Path) -> None:
    import psutil

    bench = make_bench(tmp_path / "B", n_train=64)
    res = tmp_path / "res"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(toy_plugin), str(REPO)]))
    proc = subprocess.Popen([sys.executable, "-m", "bmad.cli", "run", "--algo", "toy", "--bench", f"folder:{bench}",
                             "--seeds", "40", "--workers", "2", "--param", "sleep=0.2", "--results", str(res),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not list(res.rglob("seed*.json")):  # the workers are up and running
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep did not start"
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children()
                   if any("spawn_main" in part for part in p.cmdline())]
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} worker(s) still running 10 s after their sweep was SIGKILLed"
    finally:
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
