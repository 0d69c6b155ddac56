"""The reorganizer contract: raw dataset files in, a bench folder + manifest out.

A reorganizer lives in ``datasets_prep`` (or a plugin) and is registered with
``@register_reorganizer("key")``. ``bmad prepare <key>`` builds its command-line
options from :meth:`Reorganizer.add_arguments` and calls :meth:`Reorganizer.prepare`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

from bmad.registry import Registry

MANIFEST_COLUMNS = ("path", "split", "label", "mask", "patient", "source", "slice", "sha256")
"""Columns of ``manifest.csv``: one row per written file (images and masks).

``path``/``mask``: paths relative to the bench folder (``mask`` empty when none);
``split``: train|valid|test; ``label``: good|Ungood; ``patient``: the subject id
the split was made on; ``source``: the raw file the row came from (relative to the
raw root); ``slice``: slice index or patch coordinates, empty when not applicable;
``sha256``: of the image file at ``path``.
"""


class Reorganizer:
    """Base class of the dataset reorganizers.

    ``bench``: the bench key the output serves (e.g. "brats2021");
    ``folder``: the bench folder name written under ``--out`` (BMAD's name, e.g. "Brain").
    """

    name: ClassVar[str] = ""
    bench: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this dataset's options, e.g. ``--raw`` (``--out`` is added by the CLI)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reorganizer:
        """Build from parsed options: every constructor argument found in ``args``."""
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        return cls(**{p: getattr(args, p) for p in params if hasattr(args, p)})

    def prepare(self, out: Path, *, progress: bool = True) -> Path:
        """Write ``out/<folder>/`` (splits + manifest.csv) and return that folder.

        Must be atomic at the bench level: build in a temp folder beside it and
        rename into place, so an interrupted run leaves no half-written bench.
        """
        raise NotImplementedError

    @classmethod
    def synthesize(cls, raw: Path, *, n_cases: int, seed: int = 0, **kwargs: Any) -> Path:
        """Write a small synthetic raw set in this dataset's raw layout (tests, demo)."""
        raise NotImplementedError(f"{cls.__name__} has no synthetic raw generator")

    @classmethod
    def synthetic_options(cls) -> dict[str, Any]:
        """Constructor options (besides ``raw``) that prepare what :meth:`synthesize` writes."""
        return {}


reorganizers: Registry[Reorganizer] = Registry("bmad.reorganizers", "dataset")
register_reorganizer = reorganizers.register
