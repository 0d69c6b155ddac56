"""What the reorganizers' tests read back from a prepared bench."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from bmad.reorganizer import MANIFEST_COLUMNS


def read_table(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the CSV file ``path``, after checking that its columns are ``columns``."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == columns
        return list(reader)


def read_manifest(bench: Path) -> list[dict[str, str]]:
    """The rows of ``bench/manifest.csv``, after checking its columns."""
    return read_table(bench / "manifest.csv", MANIFEST_COLUMNS)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def decoded(path: Path) -> np.ndarray:
    """What a Pillow reader of the source sees, in 8-bit gray."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def png(path: Path) -> np.ndarray:
    """The pixels of an 8-bit gray PNG written by a reorganizer (asserting that it is one)."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L", (path, im.format, im.mode)
        return np.asarray(im)
