"""The layout Kermany et al. (Cell 2018) released both of their sets in, OCT2017 and the
pediatric chest X-rays (ZhangLab): ``<root>/{train,test[,val]}/<CLASS>/<name>.jpeg``, with
the patient id in the file name. Finding the root, listing a split, and the job payload are
shared by :mod:`datasets_prep.oct2017` and :mod:`datasets_prep.zhanglab`."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from bmad.errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class Item:
    """One raw image: ``source`` relative to the raw root, its class folder, and the patient id
    and image number parsed from its name (patient = the file stem, number empty, for a name
    not in the set's form)."""

    path: Path
    source: str
    cls: str
    patient: str
    number: str


@dataclass(frozen=True)
class Payload:
    """What a job writes: one image to ``split/label/img/name``."""

    path: Path
    split: str
    label: str
    name: str
    patient: str
    source: str
    number: str


def visible_dirs(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` that are not hidden (``.x``, ``__MACOSX``), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def looks_like_root(folder: Path, classes: Collection[str]) -> bool:
    """``folder`` holds train/ and test/ with at least one of ``classes`` in either."""
    if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
        return False
    return any((folder / s / c).is_dir() for s in ("train", "test") for c in classes)


def candidate_roots(raw: Path, classes: Collection[str], depth: int = 3) -> list[Path]:
    """Folders below ``raw`` (at most ``depth`` levels) that look like a root holding ``classes``."""
    found, level = [], [raw]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                subs = visible_dirs(folder)
            except OSError:
                continue
            for sub in subs:
                (found if looks_like_root(sub, classes) else nxt).append(sub)
        level = nxt
    return found


def find_root(raw: Path, classes: Collection[str], what: str, where_from: str, quote: str = "") -> Path:
    """Check that ``raw`` holds ``train/`` and ``test/``; DataError with the fix otherwise, naming
    the folders below that hold ``classes`` when the user pointed one or more levels too high.
    ``what``: the set's folder as users call it; ``where_from``: which folder each download
    unpacks to; ``quote``: a remark added when candidates are named."""
    if not raw.is_dir():
        raise DataError(f"raw folder {raw} does not exist",
                        hint=f"pass --raw pointing at the {what} folder that contains train/ and test/")
    missing = [s for s in ("train", "test") if not (raw / s).is_dir()]
    if not missing:
        return raw
    candidates = candidate_roots(raw, classes)
    if candidates:
        names = " or ".join(repr(str(c)) for c in candidates[:3])
        hint = f"pass --raw {names}: the folder that contains train/ and test/{quote}"
    else:
        hint = f"pass --raw pointing at the folder that contains train/ and test/ ({where_from})"
    raise DataError(f"{raw} has no {' and no '.join(m + '/' for m in missing)} folder", hint=hint)


def scan_split(root: Path, split: str, *, known: Collection[str], wanted: Collection[str],
               parse_name: Callable[[str], tuple[str, str]], wrong_class: Callable[[Path], DataError],
               ignored: list[tuple[str, str]] | None = None) -> dict[str, list[Item]]:
    """The images of ``root/split/<CLASS>/`` for the classes in ``wanted``, sorted by name.

    Every visible sub-folder must be one of ``known`` (else ``wrong_class(folder)`` is raised).
    Files directly in ``split/`` and hidden files are ignored; other files that are not
    .jpeg/.jpg/.png are appended to ``ignored`` as (source, reason).
    """
    found: dict[str, list[Item]] = {}
    for sub in visible_dirs(root / split):
        if sub.name not in known:
            raise wrong_class(sub)
        if sub.name not in wanted:
            continue
        items = []
        for p in sorted(sub.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                if ignored is not None:
                    ignored.append((p.relative_to(root).as_posix(), "not a .jpeg/.jpg/.png image; ignored"))
                continue
            patient, number = parse_name(p.stem)
            items.append(Item(p, p.relative_to(root).as_posix(), sub.name, patient, number))
        found[sub.name] = items
    return found
