"""Determinism of every registered algorithm on CPU: the same seed gives the same record.

For each built-in name in the registry (a newly registered one is picked up by itself and
fails until it is given a tiny configuration in :data:`TINY`), one tiny run in this process
(after the global random generators were moved on, as by an earlier run of a sweep) and one
``bmad run`` in a fresh subprocess (another hash seed; every selected algorithm one after the
other, as in a real sweep) must give:

- the same config hash, metrics (to the bit), training history, parameter counts, sizes
  and data facts;
- the same per-image scores and labels;
- the same saved map sample (``seed0.maps.npz``: indices, files, labels, scores, maps).

The subprocess also runs seed 1, whose per-image scores must differ from seed 0's (with
random initialisation the seed draws the weights of every method): the comparison can fail.

The in-process run also logs the aten operators it calls: those without a deterministic CUDA
kernel (PyTorch raises on them under ``torch.use_deterministic_algorithms(True)``) must be
the ones documented in :data:`NO_DETERMINISTIC_CUDA_KERNEL` (docs/reliability_determinism.md).

Sizes are tiny (32 px bench, 1 epoch, random initialisation, the tiny CLIP for the CLIP
methods); the costlier cases are marked slow (CI runs them).
"""

from __future__ import annotations

import collections
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import algorithms  # noqa: F401  (registers the built-in names)
from algorithms.clip import TINY_CLIP
from bmad import registry
from tests.conftest import make_bench, run_bmad, run_record, same_record


@dataclass(frozen=True)
class Tiny:
    """A tiny configuration of one registered name for the determinism runs."""

    params: dict[str, Any] = field(default_factory=dict)
    shots: int | None = None
    effnet: bool = False  # CS-Flow: calibrated random EfficientNet-B5 weights (see ``effnet_weights``)
    slow: bool = True


CLIP = dict(clip_model=TINY_CLIP)
R18 = dict(backbone="resnet18")
TINY: dict[str, Tiny] = {
    # anomalib memory banks: no training (the seed draws the random weights, PaDiM's feature subset
    # and PatchCore's coreset start)
    "padim": Tiny(dict(input_size=32)),
    "padim_r18": Tiny(dict(input_size=32)),
    "patchcore": Tiny(dict(input_size=32)),
    "patchcore_r18": Tiny(dict(input_size=32)),
    # anomalib, trained
    "cfa": Tiny(dict(R18, input_size=64, epochs=1, batch_size=4)),
    "cflow": Tiny(dict(R18, input_size=64, coupling_blocks=2, condition_vector=32, fiber_batch_size=16, epochs=1,
                       batch_size=4)),
    "csflow": Tiny(dict(cross_conv_hidden_channels=32, n_coupling_blocks=2, input_size=128, epochs=1, batch_size=4),
                   effnet=True),
    "draem": Tiny(dict(input_size=32, epochs=1, batch_size=4)),
    "ganomaly": Tiny(dict(n_features=16, latent_vec_size=16, input_size=32, epochs=1, batch_size=4)),
    "rd4ad": Tiny(dict(R18, input_size=64, epochs=1, batch_size=4)),
    "stfpm": Tiny(dict(input_size=32, epochs=1, batch_size=4)),
    "stfpm_r18": Tiny(dict(input_size=32, epochs=1, batch_size=4)),
    # native, trained
    "cutpaste": Tiny(dict(input_size=32, steps=2, freeze_steps=1, batch_size=4)),
    "deepsvdd": Tiny(dict(input_size=32, epochs=1, ae_epochs=1, batch_size=4, ae_batch_size=4), slow=False),
    "fanogan": Tiny(dict(input_size=32, latent_dim=16, dim=8, epochs=1, batch_size=4), slow=False),
    "mkd": Tiny(dict(input_size=32, epochs=1, batch_size=4)),
    "simplenet": Tiny(dict(R18, input_size=32, pretrain_embed_dimension=96, target_embed_dimension=64, dsc_hidden=32,
                           meta_epochs=1, gan_epochs=1, batch_size=4), slow=False),
    "utrad": Tiny(dict(R18, input_size=32, d_model=32, n_heads=2, ff_dim=64, n_layers=1, patch_sizes=[2, 2, 2],
                       bottleneck_dim=8, epochs=1, batch_size=4), slow=False),
    # CLIP methods on the tiny CLIP (random weights)
    "chexzero_zeroshot": Tiny(dict(CLIP), slow=False),
    "winclip": Tiny(dict(CLIP, image_size=224, k_shot=2)),  # the seed also draws the reference images
    "coop": Tiny(dict(CLIP, epochs=1)),
    "maple": Tiny(dict(CLIP, epochs=1), slow=False),
    "ppad": Tiny(dict(CLIP, epochs=1)),
    "lerec": Tiny(dict(CLIP, image_size=224, layers=[1, 2, 3, 4], epochs=1)),
    "mediclip": Tiny(dict(CLIP, layers=[1, 2, 3], epochs=1), shots=4),
    "mvfa": Tiny(dict(CLIP, layers=[1, 2, 3, 4], epochs=1), shots=4),
    "clap": Tiny(dict(CLIP, m2ib_layer=2, m2ib_steps=2, m2ib_copies=2, epochs=1, unet_widths=[8, 16], unet_size=32,
                      batch_size=4, anatomy="brain")),
}

# aten operators with no deterministic CUDA implementation: under torch.use_deterministic_algorithms(True)
# PyTorch raises on them (its documented list; names as the CPU dispatcher sees them)
CUDA_NONDETERMINISTIC_OPS = frozenset({
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward", "_upsample_bicubic2d_aa_backward",
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "adaptive_max_pool3d_backward", "avg_pool3d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d", "reflection_pad1d_backward",
    "reflection_pad2d_backward", "reflection_pad3d_backward", "nll_loss2d_forward", "nll_loss2d_backward",
    "_ctc_loss_backward", "_embedding_bag_backward", "put", "put_", "histc", "bincount", "median",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward",
})
# per algorithm, the operators of that list its training calls (docs/reliability_determinism.md explains each)
NO_DETERMINISTIC_CUDA_KERNEL: dict[str, set[str]] = {
    "csflow": {"upsample_bilinear2d_backward"},  # nn.Upsample(bilinear) in the cross-scale coupling subnets
    "draem": {"upsample_bilinear2d_backward", "reflection_pad2d_backward"},  # decoders' bilinear upsampling
    "mediclip": {"upsample_bilinear2d_backward"},  # the loss on bilinearly upsampled segmentation maps
    "mvfa": {"upsample_bilinear2d_backward"},  # the same
}


def builtin_names() -> list[str]:
    """Every built-in registered name (plugins installed beside bmad are theirs to test)."""
    return [n for n in registry.names() if registry.algorithms.get(n).source == "builtin"]


NAMES = builtin_names()


def test_every_registered_algorithm_has_a_tiny_config():
    missing = sorted(set(NAMES) - set(TINY))
    stale = sorted(set(TINY) - set(NAMES))
    assert not missing, f"add a tiny configuration for {missing} to TINY in {__file__}"
    assert not stale, f"TINY names algorithms that are no longer registered: {stale}"
    assert set(NO_DETERMINISTIC_CUDA_KERNEL) <= set(NAMES)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """4 normal training images (the few-shot methods draw all 4), 1 + 1 valid, 3 + 3 test, 32 px."""
    return make_bench(tmp_path_factory.mktemp("det") / "Toy", n_train=4, n_valid=(1, 1), n_test=(3, 3), size=32)


def selected_names(request: pytest.FixtureRequest) -> list[str]:
    """The names whose determinism test runs in this session (not deselected, not skipped as slow)."""
    return [item.callspec.params["name"] for item in request.session.items
            if getattr(item, "module", None) is request.module  # other files have tests of this name
            and getattr(item, "originalname", None) == "test_same_seed_same_record"
            and item.get_closest_marker("skip") is None and item.callspec.params["name"] in TINY]


def cli_sweep(names: list[str], bench: Path, results: Path, weights: Path | None, shots: int | None) -> str:
    """One ``bmad run`` of ``names`` over seeds 0 and 1 in a fresh process; its output.
    Failed runs are recorded (and reported by each name's test)."""
    args = ["run", "--algo", ",".join(names), "--bench", f"folder:{bench}", "--seeds", "2", "--results", str(results),
            "--no-progress"]
    args += ["--weights", str(weights)] if weights else ["--random-init"]
    args += ["--shots", str(shots)] if shots else []
    for name in names:
        for key, value in TINY[name].params.items():
            args += ["--param", f"{name}:{key}={json.dumps(value)}"]
    # this process's thread count (CPU records repeat to the bit at a fixed count), another hash seed
    proc = run_bmad(*args, env={"OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONHASHSEED": "random"})
    return f"$ bmad {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def swept(request, bench, tmp_path_factory) -> Path:
    """The results folder of the fresh-process sweeps over every selected name (one ``bmad run``
    per kind of weights and shots: ``--weights`` and ``--shots`` are sweep-wide)."""
    results = tmp_path_factory.mktemp("swept")
    groups: dict[tuple[bool, int | None], list[str]] = {}
    for name in selected_names(request):
        groups.setdefault((TINY[name].effnet, TINY[name].shots), []).append(name)
    for (effnet, shots), group in groups.items():
        weights = request.getfixturevalue("effnet_weights") if effnet else None
        (results / f"{'-'.join(group)}.log").write_text(cli_sweep(group, bench, results, weights, shots))
    return results


def swept_record(results: Path, name: str, seed: int) -> tuple[dict[str, Any], Path]:
    """The fresh-process record of ``name`` and ``seed`` (it must be ``ok``) and its path."""
    paths = list(results.glob(f"runs/*/{name}/*/seed{seed}.json"))
    if len(paths) != 1:
        logs = "\n".join(p.read_text()[-3000:] for p in results.glob("*.log"))
        pytest.fail(f"{name} seed {seed}: {len(paths)} records from the subprocess sweep:\n{logs}")
    record = json.loads(paths[0].read_text())
    assert record["status"] == "ok", record.get("traceback")
    return record, paths[0]


class OpLog(TorchDispatchMode):
    """Counts the aten operators called (backward ones included) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def in_process_record(name: str, tiny: Tiny, bench: Path, results: Path, weights: Path | None
                      ) -> tuple[dict[str, Any], Path, set[str]]:
    """A run in this process, after the global generators were moved on (a run must reseed
    them itself); its record, its path and the aten operators it called."""
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    torch.rand(17)
    with OpLog() as log:
        record = run_record(name, bench, results, dict(tiny.params), shots=tiny.shots,
                            weights=str(weights) if weights else None)
    (path,) = results.glob(f"runs/*/{name}/*/seed0.json")
    return record, path, set(log.seen)


def load_maps(record: dict[str, Any], path: Path) -> dict[str, np.ndarray] | None:
    if "map_sample" not in record:
        return None
    with np.load(path.with_name(record["map_sample"]["file"])) as npz:
        return {k: npz[k] for k in npz.files}


def assert_same_run(a: dict[str, Any], a_path: Path, b: dict[str, Any], b_path: Path) -> None:
    """Two records of one configuration and seed agree on everything but timings and memory,
    and their saved map samples are equal array for array."""
    same_record(a, b)
    for key in ("status", "config", "per_image", "params", "sizes", "data", "map_sample"):
        assert a.get(key) == b.get(key), key
    assert a["env"]["deterministic"] is True and b["env"]["deterministic"] is True
    assert a["env"]["threads"] == b["env"]["threads"]
    maps_a, maps_b = load_maps(a, a_path), load_maps(b, b_path)
    assert (maps_a is None) == (maps_b is None)
    assert maps_a is not None or not registry.algorithms.get(a["algo"]).cls.pixel_level, "no map sample saved"
    if maps_a is not None:
        assert maps_a.keys() == maps_b.keys()
        for k in maps_a:
            np.testing.assert_array_equal(maps_a[k], maps_b[k], err_msg=k)


def test_the_comparison_sees_one_ulp(tmp_path):
    """assert_same_run fails on a per-image score or a saved map value moved by one float step."""
    maps = np.linspace(0, 1, 2 * 4 * 4, dtype=np.float16).reshape(2, 4, 4)
    record = {"algo": "padim", "config_hash": "h", "config": {}, "status": "ok", "history": [],
              "metrics": {"image_auroc": 0.75}, "per_image": {"scores": [0.25, 0.5], "labels": [0, 1]},
              "params": {}, "sizes": {}, "data": {}, "env": {"deterministic": True, "threads": 1},
              "map_sample": {"file": "seed0.maps.npz", "n": 2, "size": [4, 4]}}
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
        np.savez(tmp_path / d / "seed0.maps.npz", maps=maps)
    a, b = tmp_path / "a" / "seed0.json", tmp_path / "b" / "seed0.json"
    assert_same_run(record, a, json.loads(json.dumps(record)), b)
    moved = json.loads(json.dumps(record))
    moved["per_image"]["scores"][1] = float(np.nextafter(0.5, 1.0))
    with pytest.raises(AssertionError, match="per_image"):
        assert_same_run(record, a, moved, b)
    bumped = maps.copy()
    bumped[1, 2, 3] = np.nextafter(bumped[1, 2, 3], np.float16(2))
    np.savez(tmp_path / "c" / "seed0.maps.npz", maps=bumped)
    with pytest.raises(AssertionError, match="maps"):
        assert_same_run(record, a, record, tmp_path / "c" / "seed0.json")


@pytest.mark.parametrize("scale", [1.0, 1e5, 1e-7])
def test_the_saved_map_sample_holds_raw_maps_of_any_scale(tmp_path, scale):
    """float16 where the maps fit it; float32 for UTRAD-like raw maps (~1e5, inf in float16)
    and for maps below float16's normal range (flushed towards zero)."""
    from bmad.runner import write_map_sample

    maps = (scale * np.linspace(0.5, 1.5, 2 * 8 * 8)).reshape(2, 8, 8).astype(np.float32)
    write_map_sample(tmp_path / "seed0.json", {"index": np.arange(2), "maps": maps})
    with np.load(tmp_path / "seed0.maps.npz") as npz:
        saved = npz["maps"]
    assert saved.dtype == (np.float16 if scale == 1.0 else np.float32)
    np.testing.assert_allclose(saved, maps, rtol=1e-3)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TINY and TINY[n].slow else n
                                  for n in NAMES])
def test_same_seed_same_record(name, bench, swept, tmp_path, request):
    """Seed 0 in this process == seed 0 in a fresh ``bmad run``, to the bit; seed 1 differs;
    the operators without a deterministic CUDA kernel are the documented ones."""
    assert name in TINY, f"add a tiny configuration for {name!r} to TINY in {__file__}"
    tiny = TINY[name]
    weights = request.getfixturevalue("effnet_weights") if tiny.effnet else None
    first, first_path, ops = in_process_record(name, tiny, bench, tmp_path, weights)
    (again, again_path), (other, _) = swept_record(swept, name, 0), swept_record(swept, name, 1)
    assert_same_run(first, first_path, again, again_path)
    print(f"{name}: {first['finished'] - first['started']:.2f} s here, {again['finished'] - again['started']:.2f} s "
          f"and {other['finished'] - other['started']:.2f} s (seed 1) in the sweep; image AUROC "
          f"{first['metrics']['image_auroc']:.3f}, seed 1: {other['metrics']['image_auroc']:.3f}")
    assert other["config_hash"] == first["config_hash"]
    assert other["per_image"]["scores"] != first["per_image"]["scores"], "seed 1 gave seed 0's scores"
    assert ops & CUDA_NONDETERMINISTIC_OPS == NO_DETERMINISTIC_CUDA_KERNEL.get(name, set()), (
        "update NO_DETERMINISTIC_CUDA_KERNEL and docs/reliability_determinism.md")
