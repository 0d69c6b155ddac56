"""Run records: one JSON file per (bench, algo, config, seed), written atomically.

Path: ``<results>/runs/<bench>/<algo>/<config_hash>/seed<k>.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmad.fsutil import write_json_atomic

SCHEMA_VERSION = 1
METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "best_dice")
REQUIRED_KEYS = ("bench", "algo", "seed", "shots", "config", "config_hash", "status", "metrics")
MAX_RECORD_BYTES = 64 * 2**20
"""Larger files are not read as records (one with the per-image scores of RSNA's 17,194 test images is ~1 MB)."""
ROUNDING = 1e-9
"""How far past [0, 1] a metric may be from floating-point rounding alone."""
_OBJECT_KEYS = ("config", "metrics", "run", "sweep", "data", "env", "sizes", "timing", "memory", "params",
                "per_image", "map_sample")
_NUMBER_GROUPS = ("timing", "memory", "params")


def config_hash(algo: str, config: dict[str, Any], shots: int | None, train_bench: str | None = None) -> str:
    """12 hex digits identifying (algorithm, resolved hyper-parameters, shots, and the
    training bench of a cross-bench run)."""
    key: dict[str, Any] = {"algo": algo, "config": config, "shots": shots}
    if train_bench is not None:
        key["train_bench"] = train_bench
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_path(results: Path, bench: str, algo: str, chash: str, seed: int) -> Path:
    """Where the record of one run lives."""
    return Path(results) / "runs" / bench / algo / chash / f"seed{seed}.json"


def read_record(path: Path) -> dict[str, Any]:
    """Parse and validate one record; ValueError with the reason if it is not a valid record.

    Only a regular file of at most :data:`MAX_RECORD_BYTES` is read (a FIFO, a device or a
    symlink loop is refused without blocking); every key the leaderboards, statistics and
    figures use must have its type, and the names that make up record paths must be plain
    file names."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"unreadable: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > MAX_RECORD_BYTES:
            raise ValueError(f"{st.st_size:,} bytes, larger than any run record "
                             f"(at most {MAX_RECORD_BYTES // 2**20} MiB)")
        try:
            raw = fh.read(MAX_RECORD_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"unreadable: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than any run record (at most {MAX_RECORD_BYTES // 2**20} MiB)")
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSON and Unicode errors are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ValueError(f"unreadable JSON: {reason}") from None
    _validate(rec)
    return rec


def _validate(rec: Any) -> None:
    """ValueError naming the first key of ``rec`` that is missing or of the wrong type."""
    if not isinstance(rec, dict):
        raise ValueError(f"not a JSON object (a JSON {_kind(rec)})")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ValueError(f"missing keys {missing}")
    schema = rec.get("schema", SCHEMA_VERSION)
    if not _is_int(schema) or schema != SCHEMA_VERSION:
        why = ("written by a newer bmad: upgrade bmad to read it" if _is_int(schema) and schema > SCHEMA_VERSION
               else "not written by this bmad: rerun the run to record it again")
        raise ValueError(f"schema version {schema!r}, this bmad reads version {SCHEMA_VERSION} ({why})")
    for key in ("bench", "algo", "config_hash"):
        if not _plain_name(rec[key]):
            raise ValueError(f"{key} {rec[key]!r} is not a plain name (a string that can be a folder name)")
    if not (_is_int(rec["seed"]) and 0 <= rec["seed"] < 2**32):
        raise ValueError(f"seed {rec['seed']!r} is not an integer in [0, 2^32)")
    if rec["shots"] is not None and not (_is_int(rec["shots"]) and rec["shots"] >= 1):
        raise ValueError(f"shots {rec['shots']!r} is neither null nor a positive integer")
    if rec["status"] not in ("ok", "failed"):
        raise ValueError(f"status {rec['status']!r}")
    if rec.get("train_bench") is not None and not _plain_name(rec["train_bench"]):
        raise ValueError(f"train_bench {rec['train_bench']!r} is neither null nor a plain name")
    for key in _OBJECT_KEYS:
        if key in rec and not isinstance(rec[key], dict):
            raise ValueError(f"{key} is a JSON {_kind(rec[key])}, not an object")
    for k in METRIC_KEYS:
        v = rec["metrics"].get(k)
        # a sum of fractions can end up a rounding error past 1 (AUPRO of perfect maps: 1.0000000000000002)
        if v is not None and not (_is_number(v) and -ROUNDING <= v <= 1.0 + ROUNDING):
            raise ValueError(f"metric {k}={v!r} is not a fraction in [0, 1]")
    for group in _NUMBER_GROUPS:
        for k, v in rec.get(group, {}).items():
            if v is not None and not _is_finite(v):
                raise ValueError(f"{group}.{k}={v!r} is not a number")
    seeds = rec.get("sweep", {}).get("seeds", 1)
    if not (_is_int(seeds) and seeds >= 1):
        raise ValueError(f"sweep.seeds={seeds!r} is not a positive integer")
    if not isinstance(rec.get("run", {}).get("bench", ""), str):
        raise ValueError("run.bench is not a string")
    if "history" in rec and not isinstance(rec["history"], list):
        raise ValueError(f"history is a JSON {_kind(rec['history'])}, not an array")
    if "per_image" in rec:
        _check_per_image(rec["per_image"])
    if "map_sample" in rec and not (_plain_name(rec["map_sample"].get("file"))
                                    and rec["map_sample"]["file"].endswith(".npz")):
        raise ValueError(f"map_sample.file {rec['map_sample'].get('file')!r} is not a .npz file name")


def _check_per_image(per: dict[str, Any]) -> None:
    scores, labels = per.get("scores"), per.get("labels")
    if not (isinstance(scores, list) and isinstance(labels, list) and len(scores) == len(labels)):
        raise ValueError("per_image needs arrays scores and labels of the same length")
    if not all(_is_finite(v) for v in scores):
        raise ValueError("per_image.scores holds a value that is not a finite number")
    if not all(_is_int(v) for v in labels) or set(labels) != {0, 1}:
        raise ValueError("per_image.labels must be 0/1 with both classes present (as every scored test set has)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    """A number a float holds: not NaN or infinite, and no integer past float's range (JSON
    allows any; the leaderboards average them as floats)."""
    try:
        return _is_number(v) and math.isfinite(v)
    except OverflowError:
        return False


def _plain_name(v: Any) -> bool:
    """A non-empty string usable as one path component: no separator, not "." or ".."."""
    return (isinstance(v, str) and 0 < len(v) <= 255 and v not in (".", "..")
            and not any(c in v for c in "/\\\0"))


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def is_done(path: Path) -> bool:
    """True when a valid ``ok`` record exists at ``path``."""
    try:
        return read_record(path)["status"] == "ok"
    except ValueError:
        return False


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically (temp file, fsync, rename)."""
    write_json_atomic(path, {"schema": SCHEMA_VERSION, **record})


def clean_stale_temps(record: Path) -> None:
    """Remove the temp files a killed writer of this run left beside ``record`` (its record
    and its map sample). Only this run writes them; the other seeds of the same
    configuration, in the same folder, may be running in other workers right now, so their
    temp files are left alone."""
    stem = record.name[: -len(".json")] if record.name.endswith(".json") else record.name
    if record.parent.is_dir():
        for pattern in (f".{record.name}.*.tmp", f".{stem}.maps.npz.*.tmp"):
            for p in record.parent.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)


@dataclass
class Loaded:
    """Records read from a results folder, and the files that were skipped with why."""

    records: list[dict[str, Any]]
    skipped: list[tuple[Path, str]]


def load_records(results: Path) -> Loaded:
    """Every valid record under ``results/runs``; invalid files are reported, not fatal."""
    records, skipped = [], []
    runs = Path(results) / "runs"
    if runs.is_dir():
        for p in sorted(runs.rglob("seed*.json")):
            try:
                records.append(read_record(p))
            except ValueError as exc:
                skipped.append((p, str(exc)))
    return Loaded(records, skipped)
