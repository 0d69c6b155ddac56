"""The reorganizer contract: raw dataset files in, a bench folder + manifest out.

A reorganizer lives in ``datasets_prep`` (or a plugin) and is registered with
``@register_reorganizer("key")``. ``bmad prepare <key>`` builds its command-line
options from :meth:`Reorganizer.add_arguments` and calls :meth:`Reorganizer.prepare`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bmad.errors import UsageError
from bmad.registry import Registry

MANIFEST_COLUMNS = ("path", "split", "label", "mask", "patient", "source", "slice", "sha256")
"""Columns of ``manifest.csv``: one row per written file (images and masks).

``path``/``mask``: paths relative to the bench folder (``mask`` empty when none);
``split``: train|valid|test; ``label``: good|Ungood; ``patient``: the subject id
the split was made on; ``source``: the raw file the row came from (relative to the
raw root); ``slice``: slice index or patch coordinates, empty when not applicable;
``sha256``: of the image file at ``path``.
"""


@dataclass
class Summary:
    """What a preparation wrote and skipped."""

    folder: Path
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0
    kept: bool = False

    def text(self) -> str:
        """Counts per split and label, then skipped inputs with reasons."""
        lines = [f"{self.folder}: " + ("already prepared and verified, kept" if self.kept else "prepared")]
        for split in ("train", "valid", "test"):
            parts = [f"{label} {n}" for (s, label), n in sorted(self.counts.items()) if s == split]
            if parts:
                lines.append(f"  {split:5s}: " + ", ".join(parts))
        if self.reused:
            lines.append(f"  resumed: {self.reused} inputs were already written and verified")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} input(s) (listed in skipped.csv):")
            lines += [f"    {src}: {why}" for src, why in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"    ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


class Reorganizer:
    """Base class of the dataset reorganizers.

    ``bench``: the bench key the output serves (e.g. "brats2021");
    ``folder``: the bench folder name written under ``--out`` (BMAD's name, e.g. "Brain");
    ``raw_layout``: the raw files it expects, as the publisher distributes them
    (shown by ``bmad prepare --list``).

    Every reorganizer's constructor accepts ``workers``, ``on_error`` ("skip" | "fail")
    and ``overwrite``; the CLI adds ``--workers``, ``--on-error``, ``--overwrite`` and
    ``--out`` for all of them.
    """

    name: ClassVar[str] = ""
    bench: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    description: ClassVar[str] = ""
    raw_layout: ClassVar[str] = ""

    ON_ERROR: ClassVar[tuple[str, ...]] = ("skip", "fail")

    def set_run_options(self, workers: int | None, on_error: str, overwrite: bool) -> None:
        """Check and keep the options every reorganizer takes: ``workers`` (at least 1),
        ``on_error`` ("skip" | "fail") and ``overwrite``."""
        if on_error not in self.ON_ERROR:
            raise UsageError(f"--on-error must be one of {', '.join(self.ON_ERROR)}, got {on_error!r}")
        self.workers = max(1, int(workers or 1))
        self.on_error = on_error
        self.overwrite = bool(overwrite)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this dataset's options, e.g. ``--raw`` (``--out`` is added by the CLI)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reorganizer:
        """Build from parsed options: every constructor argument found in ``args``."""
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        return cls(**{p: getattr(args, p) for p in params if hasattr(args, p)})

    def prepare(self, out: Path, *, progress: bool = True) -> Summary:
        """Write ``out/<folder>/`` (splits + manifest.csv) and say what was written.

        Must be atomic at the bench level (``datasets_prep.common.write_bench`` does it):
        an interrupted run leaves no half-written bench and resumes when run again.
        """
        raise NotImplementedError

    @classmethod
    def synthesize(cls, raw: Path, *, n: int, seed: int = 0, **kwargs: Any) -> Path:
        """Write a synthetic raw set of ``n`` units (cases, images, slides) in this dataset's raw
        layout at the real image sizes (tests, demo, benchmarks/prepare.py); return ``raw``."""
        raise NotImplementedError(f"{cls.__name__} has no synthetic raw generator")

    @classmethod
    def synthetic_options(cls, raw: Path) -> dict[str, Any]:
        """Constructor keyword arguments (where the inputs are included) that prepare the
        set :meth:`synthesize` wrote under ``raw``."""
        return {"raw": Path(raw)}


reorganizers: Registry[Reorganizer] = Registry("bmad.reorganizers", "dataset")
register_reorganizer = reorganizers.register
