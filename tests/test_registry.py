"""The registry: registration, named configs, lookup errors, plugins via entry points."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bmad.algorithm import Algorithm, Prediction
from bmad.errors import UsageError
from bmad.registry import Registry
from tests.conftest import run_bmad


class Dummy(Algorithm):
    family = "test"
    pixel_level = False

    def __init__(self, k: int = 3, backbone: str = "resnet18") -> None:
        self.k = k
        self.backbone = backbone


def test_register_create_and_named_configs() -> None:
    reg: Registry = Registry("bmad.test-none", "algo")
    reg.register("dummy")(Dummy)
    reg.register("dummy_big", backbone="wide_resnet50_2")(Dummy)
    assert reg.names() == ["dummy", "dummy_big"]
    assert reg.names(pixel_level=False) == ["dummy", "dummy_big"]
    assert reg.names(pixel_level=True) == []
    a = reg.create("dummy_big", k=5)
    assert a.get_config() == {"k": 5, "backbone": "wide_resnet50_2"}
    assert reg.create("dummy").get_config() == {"k": 3, "backbone": "resnet18"}
    with pytest.raises(UsageError, match="(?s)unknown algo 'dumy'.*did you mean dummy"):
        reg.create("dumy")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("dummy")(type("Other", (Dummy,), {}))


def test_prediction_validates_shapes() -> None:
    import numpy as np

    p = Prediction(np.zeros(2), np.zeros((2, 1, 4, 4)))
    assert p.maps.shape == (2, 4, 4) and p.maps.dtype == np.float32
    with pytest.raises(ValueError, match="must be \\[B, H, W\\]"):
        Prediction(np.zeros(3), np.zeros((2, 4, 4)))


def test_parameter_counts_count_shared_modules_once() -> None:
    import torch

    a = Dummy()
    a.net = torch.nn.Linear(3, 2)
    a.alias = a.net
    a.frozen = torch.nn.Linear(2, 1).requires_grad_(False)
    assert a.parameter_counts() == {"total": 8 + 3, "trainable": 8}


def test_plugin_listed_and_broken_plugin_reported(toy_plugin: Path) -> None:
    out = run_bmad("list", "algos", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    toy = [ln for ln in lines if ln.startswith("toy ")]
    assert toy and "plugin bmad-toy" in toy[0] and " yes " in toy[0]
    assert "1 plugin(s) failed to load" in out.stdout
    assert "toy_broken" in out.stdout and "bmad_toy_missing_module" in out.stdout


def test_plugin_runs_through_bmad_run(toy_plugin: Path, bench_dir: Path, tmp_path: Path) -> None:
    res = tmp_path / "res"
    out = run_bmad("run", "--algo", "toy", "--bench", f"folder:{bench_dir}", "--seeds", "2",
                   "--results", str(res), "--no-progress", plugin=toy_plugin)
    assert out.returncode == 0, out.stderr
    recs = sorted(res.rglob("seed*.json"))
    assert [p.name for p in recs] == ["seed0.json", "seed1.json"]
    import json

    rec = json.loads(recs[0].read_text())
    assert rec["status"] == "ok" and rec["algo"] == "toy"
    assert rec["metrics"]["image_auroc"] > 0.9  # bright discs are easy for the toy
    assert rec["metrics"]["pixel_auroc"] > 0.9


def test_import_bmad_cli_does_not_import_heavy_libraries() -> None:
    import subprocess

    code = "import bmad.cli, sys; print(sorted(m for m in ('anomalib', 'lightning', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unpackaged_plugin_modules_from_bmad_plugins(tmp_path: Path) -> None:
    (tmp_path / "my_algos.py").write_text(textwrap.dedent('''
        from bmad.algorithm import Algorithm
        from bmad.registry import register

        @register("my_sleeper")
        class Sleeper(Algorithm):
            family = "test"
    '''))
    env = {"PYTHONPATH": str(tmp_path), "BMAD_PLUGINS": "my_algos, no_such_module"}
    out = run_bmad("list", "algos", env=env)
    assert out.returncode == 0, out.stderr
    assert "my_sleeper" in out.stdout
    assert "no_such_module" in out.stdout + out.stderr  # the broken one is reported, the rest still listed
