"""Benches: a named, prepared split folder plus its facts.

A bench is found under the data root (``--data-root`` / ``$BMAD_DATA`` / ``./data``)
by its BMAD folder name (e.g. ``Brain``) or by its key (``brats2021``). ``folder:PATH``
names any folder in BMAD's layout; ``demo`` is generated on first use.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from bmad.errors import DataError, UsageError
from bmad.fsutil import sha256_file


@dataclass(frozen=True)
class BenchSpec:
    """Facts of a bench. ``eval_size`` (H, W): the size maps and masks are evaluated at
    (None: the size of the first test image). ``channels``: of the stored images."""

    name: str
    folder: str
    domain: str
    pixel_masks: bool
    channels: int = 1
    eval_size: tuple[int, int] | None = None
    reorganizer: str | None = None
    description: str = ""
    suite: str = "bmad"
    """``bmad``: one of BMAD's six benches; ``clip``: a bench of the CLIP papers (PPAD, MediCLIP)."""


BENCHES: dict[str, BenchSpec] = {
    s.name: s
    for s in [
        BenchSpec("brats2021", "Brain", "brain MRI (FLAIR)", True, 1, (240, 240), "brats2021",
                  "BraTS2021 FLAIR axial slices"),
        BenchSpec("liver", "Liver", "liver CT", True, 1, (512, 512), "liver",
                  "BTCV (train) + LiTS (valid/test), liver ROI"),
        BenchSpec("resc", "Retina_RESC", "retinal OCT", True, 1, None, "resc", "RESC retinal OCT B-scans"),
        BenchSpec("oct2017", "Retina_OCT2017", "retinal OCT", False, 1, None, "oct2017", "Kermany OCT2017"),
        BenchSpec("rsna", "Chest", "chest X-ray", False, 1, None, "rsna", "RSNA Pneumonia (DICOM)"),
        BenchSpec("camelyon16", "Histopathology", "histopathology", False, 3, None, "camelyon16",
                  "Camelyon16 256x256 level-0 patches"),
        BenchSpec("zhanglab", "ZhangLab", "chest X-ray", False, 1, None, "zhanglab",
                  "Kermany pediatric chest X-rays, SQUID/PPAD protocol", "clip"),
        BenchSpec("chexpert", "CheXpert", "chest X-ray", False, 1, None, "chexpert",
                  "CheXpert frontal PA, SQUID/PPAD/MediCLIP protocol", "clip"),
        BenchSpec("brainmri", "BrainMRI", "brain MRI", False, 1, None, "brainmri",
                  "Kaggle Brain MRI tumour yes/no slices, MediCLIP protocol", "clip"),
        BenchSpec("vindr", "VinDr", "chest X-ray", False, 1, None, "vindr",
                  "VinDr-CXR (VinBigData train DICOMs), DDAD's split as PPAD used it", "clip"),
        BenchSpec("busi", "BUSI", "breast ultrasound", True, 1, None, "busi",
                  "BUSI breast ultrasound with lesion masks, MediCLIP protocol", "clip"),
        BenchSpec("demo", "demo/Brain", "synthetic brain MRI", True, 1, None, "brats2021",
                  "small synthetic BraTS-like set, generated on first use"),
    ]
}


@dataclass(frozen=True)
class Bench:
    """A bench resolved to its folder on disk."""

    spec: BenchSpec
    root: Path

    @property
    def name(self) -> str:
        return self.spec.name

    def manifest_sha256(self) -> str:
        """sha256 of manifest.csv; without one, of the sorted relative paths and sizes."""
        manifest = self.root / "manifest.csv"
        if manifest.is_file():
            return sha256_file(manifest)
        h = hashlib.sha256()
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                h.update(f"{p.relative_to(self.root).as_posix()}\t{p.stat().st_size}\n".encode())
        return h.hexdigest()


def default_data_root() -> Path:
    """``$BMAD_DATA`` or ``./data``."""
    return Path(os.environ.get("BMAD_DATA", "data"))


SUITES = {"all": "bmad", "clip": "clip"}
"""Group names ``--bench`` accepts, and the suite each selects."""


def parse_bench_list(text: str) -> list[str]:
    """``a,b``, ``all`` (BMAD's six benches) or ``clip`` (the five of the CLIP papers) -> list of
    bench keys, validated; a
    ``folder:PATH`` key gets an absolute path (records keep it, for retries from anywhere)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError("--bench is empty", hint="give a bench name, a comma list, `all` or `clip`")
    out: list[str] = []
    for item in items:
        if item in SUITES:
            out += [k for k, spec in BENCHES.items() if spec.suite == SUITES[item] and k != "demo"]
        elif item.startswith("folder:"):
            out.append("folder:" + str(Path(item[len("folder:"):]).expanduser().absolute()))
        elif item in BENCHES:
            out.append(item)
        else:
            import difflib

            close = difflib.get_close_matches(item, list(BENCHES), n=3)
            raise UsageError(
                f"unknown bench {item!r}",
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + f"known benches: {', '.join(BENCHES)}; `all` (BMAD's six), `clip` (the CLIP papers' five); or folder:PATH for any folder in BMAD's layout",
            )
    return list(dict.fromkeys(out))


def resolve_bench(key: str, data_root: Path | None = None) -> Bench:
    """Find bench ``key`` on disk (generating the demo bench if needed)."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    if key.startswith("folder:"):
        root = Path(key[len("folder:"):]).expanduser()
        if not root.is_dir():
            raise DataError(f"bench folder {root} does not exist", hint="give folder:PATH to a folder in BMAD's layout")
        spec = BenchSpec(folder_bench_key(root), str(root), "folder", _has_masks(root))
        return Bench(spec, root)
    spec = BENCHES[key] if key in BENCHES else None
    if spec is None:
        parse_bench_list(key)  # raises the helpful error
        raise AssertionError
    if key == "demo":
        from bmad.demo import ensure_demo_data

        root = ensure_demo_data(data_root)
        return Bench(spec, root)
    for candidate in (data_root / spec.folder, data_root / spec.name):
        if candidate.is_dir():
            return Bench(replace(spec), candidate)
    prep = f"bmad prepare {spec.reorganizer} --raw RAW_DIR --out {data_root}"
    raise DataError(
        f"bench {key!r} not found: expected the folder {data_root / spec.folder}",
        hint=f"prepare it with `{prep}`, or point --data-root / BMAD_DATA at the folder that holds {spec.folder}/",
    )


def folder_bench_key(root: Path) -> str:
    """Record key of a ``folder:`` bench: ``folder-<name>``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(root).resolve().name)
    return f"folder-{name}"


def _has_masks(root: Path) -> bool:
    return any((root / s / "Ungood" / m).is_dir() for s in ("test", "valid") for m in ("anomaly_mask", "label"))
