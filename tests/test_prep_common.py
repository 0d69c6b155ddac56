"""The shared bench writer: layout, resume after a crash, idempotent re-runs, --on-error."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bmad.errors import DataError, UsageError
from bmad.reorganizer import reorganizers
from datasets_prep.common import Job, Output, mask_png, png_bytes, proportional, share_quota, spread, write_bench


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing catches it."""


def _job_fn(calls: list[str], crash_after: int | None = None, bad: set[str] = frozenset()):
    def fn(payload: tuple[str, int]) -> list[Output]:
        key, value = payload
        if crash_after is not None and len(calls) >= crash_after:
            raise Crash
        calls.append(key)
        if key in bad:
            raise DataError(f"{key}.raw is corrupt", hint="re-download it")
        img = np.full((8, 8), value, np.uint8)
        split, label = ("train", "good") if value % 3 else ("test", "Ungood")
        mask = mask_png(img > 0) if label == "Ungood" else None
        return [Output(split, label, f"{key}.png", png_bytes(img), mask, patient=key, source=f"{key}.raw")]

    return fn


def _jobs(n: int = 9) -> list[Job]:
    return [Job(f"case{i}", f"case{i}.raw", (f"case{i}", 10 + i)) for i in range(n)]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_manifest_and_summary(tmp_path: Path) -> None:
    calls: list[str] = []
    s = write_bench(tmp_path, "B", _jobs(), _job_fn(calls), fingerprint="f1", workers=2, progress=False)
    root = tmp_path / "B"
    rows = list(csv.DictReader(open(root / "manifest.csv")))
    assert len(rows) == 9 and sorted(calls) == sorted(j.key for j in _jobs())
    for r in rows:
        assert hashlib.sha256((root / r["path"]).read_bytes()).hexdigest() == r["sha256"]
        assert bool(r["mask"]) == (r["label"] == "Ungood")
        assert r["path"].startswith(f"{r['split']}/{r['label']}/img/")
    assert s.counts == {("test", "Ungood"): 3, ("train", "good"): 6}
    assert "train: good 6" in s.text() and "test : Ungood 3" in s.text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging renamed away


def test_resume_after_crash_gives_identical_bench(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    write_bench(ref, "B", _jobs(), _job_fn([]), fingerprint="f1", progress=False)
    out = tmp_path / "out"
    with pytest.raises(Crash):
        write_bench(out, "B", _jobs(), _job_fn([], crash_after=4), fingerprint="f1", progress=False)
    assert not (out / "B").exists() and (out / ".B.partial").is_dir()
    calls: list[str] = []
    s = write_bench(out, "B", _jobs(), _job_fn(calls), fingerprint="f1", progress=False)
    assert s.reused == 4 and len(calls) == 5
    assert _tree(out / "B") == _tree(ref / "B")


def test_tampered_staged_file_is_redone(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        write_bench(tmp_path, "B", _jobs(), _job_fn([], crash_after=3), fingerprint="f1", progress=False)
    victim = next((tmp_path / ".B.partial").rglob("case0.png"))
    victim.write_bytes(b"garbage")
    calls: list[str] = []
    write_bench(tmp_path, "B", _jobs(), _job_fn(calls), fingerprint="f1", progress=False)
    assert "case0" in calls and len(calls) == 7


def test_tampered_staged_mask_is_redone_and_files_are_world_readable(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        write_bench(tmp_path, "B", _jobs(), _job_fn([], crash_after=4), fingerprint="f1", progress=False)
    victim = next((tmp_path / ".B.partial").rglob("anomaly_mask/case2.png"))  # value 12: an Ungood job
    victim.write_bytes(b"")
    calls: list[str] = []
    write_bench(tmp_path, "B", _jobs(), _job_fn(calls), fingerprint="f1", progress=False)
    assert victim.stem in calls
    for p in (tmp_path / "B").rglob("*.png"):
        assert p.stat().st_mode & 0o044 == 0o044, f"{p} is not readable by group/others"


def test_rerun_is_idempotent_and_changes_need_overwrite(tmp_path: Path) -> None:
    write_bench(tmp_path, "B", _jobs(), _job_fn([]), fingerprint="f1", progress=False)
    before = _tree(tmp_path / "B")
    calls: list[str] = []
    s = write_bench(tmp_path, "B", _jobs(), _job_fn(calls), fingerprint="f1", progress=False)
    assert s.kept and calls == [] and _tree(tmp_path / "B") == before
    with pytest.raises(UsageError, match="differs"):
        write_bench(tmp_path, "B", _jobs(5), _job_fn([]), fingerprint="f2", progress=False)
    s = write_bench(tmp_path, "B", _jobs(5), _job_fn([]), fingerprint="f2", overwrite=True, progress=False)
    assert sum(s.counts.values()) == 5
    # a damaged file in a finished bench is detected: the bench no longer verifies
    next((tmp_path / "B").rglob("case1.png")).write_bytes(b"x")
    with pytest.raises(UsageError):
        write_bench(tmp_path, "B", _jobs(5), _job_fn([]), fingerprint="f2", progress=False)


def test_on_error_skip_and_fail(tmp_path: Path) -> None:
    s = write_bench(tmp_path / "a", "B", _jobs(), _job_fn([], bad={"case2"}), fingerprint="f", progress=False)
    assert s.skipped == [("case2.raw", "case2.raw is corrupt\n  fix: re-download it".replace("\n", " "))]
    rows = list(csv.DictReader(open(tmp_path / "a" / "B" / "skipped.csv")))
    assert rows == [{"source": "case2.raw", "reason": s.skipped[0][1]}]
    assert "case2.raw: case2.raw is corrupt" in s.text()
    with pytest.raises(DataError, match="case2.raw is corrupt"):
        write_bench(tmp_path / "b", "B", _jobs(), _job_fn([], bad={"case2"}), fingerprint="f", on_error="fail",
                    progress=False)
    assert not (tmp_path / "b" / "B").exists()
    with pytest.raises(DataError, match="every input was skipped"):
        write_bench(tmp_path / "c", "B", _jobs(2), _job_fn([], bad={"case0", "case1"}), fingerprint="f",
                    progress=False)


def test_proportional_sizes() -> None:
    assert proportional([424, 39, 11, 162, 615], 1251, 1251) == [424, 39, 11, 162, 615]
    small = proportional([424, 39, 11, 162, 615], 1251, 60)
    assert sum(small) == 60 and min(small) >= 1
    assert proportional([8000, 745, 745], 9490, 949) == [800, 75, 74]  # ties: largest remainder, lower index
    with pytest.raises(DataError, match="too few"):
        proportional([10, 10, 10], 30, 2)


def test_share_quota_is_even_and_respects_capacity_and_spread_is_centred() -> None:
    assert share_quota(10, [5, 5, 5]) == [4, 3, 3]
    assert share_quota(10, [1, 20, 20]) == [1, 5, 4]
    assert share_quota(10, [2, 2]) == [2, 2]
    assert share_quota(5088, [100] * 160) == [32] * 128 + [31] * 32
    assert spread([1, 2, 3, 4, 5, 6, 7, 8], 2) == [3, 7] and spread([1, 2], 5) == [1, 2]


@pytest.mark.parametrize("key", reorganizers.names())
def test_every_reorganizer_checks_the_common_options(key: str, tmp_path: Path) -> None:
    """``--on-error`` is checked when the reorganizer is built (before any file is read);
    ``--workers`` 0 or none means one worker."""
    cls = reorganizers.get(key).cls
    raw = {"raw": tmp_path}  # no reorganizer reads its raw folder before prepare()
    with pytest.raises(UsageError, match="--on-error must be one of skip, fail, got 'ignore'"):
        cls(**raw, on_error="ignore")
    made = cls(**raw, workers=0, on_error="fail", overwrite=1)
    assert (made.workers, made.on_error, made.overwrite) == (1, "fail", True)


def test_the_cli_and_the_reorganizers_load_without_torch() -> None:
    """``bmad --help`` and ``bmad prepare`` build every reorganizer's options; none of that
    imports torch (about 2 s of start-up, paid by every ``bmad prepare``)."""
    code = ("import sys, bmad.cli\n"
            "bmad.cli.build_parser()\n"
            "from bmad.reorganizer import reorganizers\n"
            "assert len(reorganizers.names()) == 11, reorganizers.names()\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'anomalib', 'timm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
