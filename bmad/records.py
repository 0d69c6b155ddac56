"""Run records: one JSON file per (bench, algo, config, seed), written atomically.

Path: ``<results>/runs/<bench>/<algo>/<config_hash>/seed<k>.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmad.fsutil import write_json_atomic

SCHEMA_VERSION = 1
METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "best_dice")
REQUIRED_KEYS = ("bench", "algo", "seed", "shots", "config", "config_hash", "status", "metrics")


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
    """Parse and validate one record; ValueError with the reason if it is not a valid record."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if rec.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ValueError(f"schema version {rec.get('schema')} (this bmad reads {SCHEMA_VERSION})")
    if rec["status"] not in ("ok", "failed"):
        raise ValueError(f"status {rec['status']!r}")
    if not isinstance(rec["metrics"], dict):
        raise ValueError("metrics is not an object")
    for k in METRIC_KEYS:
        v = rec["metrics"].get(k)
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"metric {k}={v!r} is not a fraction in [0, 1]")
    return rec


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
