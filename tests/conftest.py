"""Shared fixtures: small generated benches, a toy plugin package, paths to ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "fixtures" / "real"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI runs them)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def real_fixture(*parts: str) -> Path:
    """Path under ../shared/fixtures/real, or skip when ../shared is absent (a user's clone)."""
    path = REAL.joinpath(*parts)
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real fixtures ship beside the repo in CI, not in a user's clone)")
    assert path.exists(), f"{path} is missing from the shared fixtures"
    return path


def _blob_image(rng: np.random.Generator, size: int, anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    base = 90 + 30 * np.sin(xx / size * np.pi) + rng.normal(0, 6, (size, size))
    mask = np.zeros((size, size), bool)
    if anomalous:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 10, size // 6)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        base[mask] += 110
    return np.clip(base, 0, 255).astype(np.uint8), mask


def make_bench(
    root: Path,
    *,
    n_train: int = 24,
    n_valid: tuple[int, int] = (3, 3),
    n_test: tuple[int, int] = (8, 8),
    size: int = 32,
    img_level: bool = True,
    mask_dir: str = "anomaly_mask",
    train_img_level: bool | None = None,
    seed: int = 0,
) -> Path:
    """Write a small bench in BMAD's layout: smooth background, bright disc anomalies."""
    rng = np.random.default_rng(seed)
    train_img_level = img_level if train_img_level is None else train_img_level

    def put(split: str, cls: str, i: int, anomalous: bool, level: bool) -> None:
        img, mask = _blob_image(rng, size, anomalous)
        d = root / split / cls / ("img" if level else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{split}_{cls}_{i:03d}.png")
        if anomalous:
            md = root / split / cls / mask_dir
            md.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(md / f"{split}_{cls}_{i:03d}.png")

    for i in range(n_train):
        put("train", "good", i, False, train_img_level)
    for split, (ng, nu) in (("valid", n_valid), ("test", n_test)):
        for i in range(ng):
            put(split, "good", i, False, img_level)
        for i in range(nu):
            put(split, "Ungood", i, True, img_level)
    return root


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    return make_bench(tmp_path / "Toy")


TOY_PLUGIN = '''
"""A toy bmad plugin: per-pixel z-score against the mean normal image."""
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from bmad.algorithm import Algorithm, Prediction, batch_images


class MeanDiff(Algorithm):
    """Distance to the mean training image (a toy)."""

    family = "toy"
    pixel_level = True
    channels = 1

    def __init__(self, sleep: float = 0.0, fail: bool = False, noise: float = 0.0, input_size=None,
                 oom_flag=None, kill_flag=None):
        self.sleep = sleep
        self.fail = fail
        self.oom_flag = oom_flag  # while this file exists, fit raises CUDA's out-of-memory error
        self.kill_flag = kill_flag  # if this file exists, fit deletes it and SIGKILLs its own process (once)
        self.noise = noise
        self.input_size = None if input_size is None else tuple(input_size)

    def fit(self, train, val=None):
        if self.fail:
            raise RuntimeError("toy failure on purpose")
        if self.oom_flag and Path(self.oom_flag).exists():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (toy)")
        if self.kill_flag and Path(self.kill_flag).exists():
            Path(self.kill_flag).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        total, n = None, 0
        for batch in train:
            x = batch_images(batch).float()
            total = x.sum(0) if total is None else total + x.sum(0)
            n += x.shape[0]
            time.sleep(self.sleep)
        self.mean = total / n
        self.history.append({"epoch": 0, "n": n})

    def predict_map(self, images):
        maps = (images - self.mean.to(images.device)).abs().mean(1)
        if self.noise:
            maps = maps + self.noise * torch.rand(maps.shape)
        scores = maps.flatten(1).topk(8, dim=1).values.mean(1)
        return Prediction(scores, maps)


'''


@pytest.fixture(scope="session")
def effnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random EfficientNet-B5 whose BatchNorm statistics are calibrated on normal noise
    (~ImageNet-normalised input): with torchvision's raw random init CS-Flow's features are
    ~1e-12 and every score ties; calibrated, they are of order 1 on the test images."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b5()
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
        if type(module).__name__ == "StochasticDepth":
            module.eval()
    with torch.no_grad():
        model.features(torch.randn(8, 3, 128, 128))
    path = tmp_path_factory.mktemp("weights") / "efficientnet_b5_calibrated.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def toy_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plugin package with a dist-info declaring entry points, importable via PYTHONPATH.

    Entry points: ``toy`` (a working algorithm) and ``toy_broken`` (a module that fails to import).
    """
    root = tmp_path_factory.mktemp("plugin")
    (root / "bmad_toy").mkdir()
    (root / "bmad_toy" / "__init__.py").write_text(textwrap.dedent(TOY_PLUGIN))
    dist = root / "bmad_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bmad-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[bmad.algorithms]\ntoy = bmad_toy:MeanDiff\ntoy_broken = bmad_toy_missing_module:Thing\n"
    )
    return root


def run_bmad(*args: str, plugin: Path | None = None, cwd: Path | None = None, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (optionally with the toy plugin on the path)."""
    e = dict(os.environ, **(env or {}))
    if plugin is not None:
        e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin), e.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "bmad.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=e
    )


def run_record(algo: str, bench: Path, results: Path, params: dict[str, Any], *, seed: int = 0,
               shots: int | None = None, weights: str | None = None) -> dict[str, Any]:
    """One run of ``algo`` on a folder bench through the runner (random init unless
    ``weights``); asserts it succeeded and returns its record."""
    import json

    import algorithms  # noqa: F401  (registers the built-in names)
    from bmad.runner import RunSpec, Sweep, SweepOptions

    opts = SweepOptions(results=results, random_init=weights is None, weights=weights, params=params,
                        progress=False, verbose=False)
    outcome = Sweep(opts).run_one(RunSpec(f"folder:{bench}", algo, seed, shots=shots))
    record = json.loads(outcome.path.read_text())
    assert record["status"] == "ok", record.get("traceback")
    return record


def same_record(first: dict[str, Any], again: dict[str, Any]) -> None:
    """Assert two runs of the same configuration gave the same record (metrics to the bit)."""
    assert again["config_hash"] == first["config_hash"]
    assert again["metrics"] == first["metrics"]
    assert again["history"] == first["history"]
