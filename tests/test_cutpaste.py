"""CutPaste: the augmentations (size kept, only the pasted region changes, the paper's geometry),
the 3-way / binary views and labels, the Gaussian density against sklearn, the frozen trunk and
the cosine schedule, training lowering the loss, patch-level maps, the runner end to end (image
AUROC above chance on bright-disc anomalies) and determinism. Random-init ResNet-18, small inputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from algorithms.cutpaste import (
    CutPaste,
    GaussianDensity,
    color_jitter,
    cutpaste_normal,
    cutpaste_scar,
    make_views,
    patch_positions,
    receptive_field_upsample,
)
from bmad import registry
from tests.conftest import make_bench, run_record

FAST = dict(input_size=64, steps=6, freeze_steps=2, batch_size=8, lr=0.01)


def smooth(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.4 + 0.2 * torch.sin(3 * xx + 2 * yy)
    return (base + 0.05 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1).expand(-1, 3, -1, -1).clone()


def bounding_box(mask: torch.Tensor) -> tuple[int, int]:
    rows, cols = torch.where(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


# -- augmentations ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_cutpaste_normal_changes_one_rectangle_of_the_papers_size(seed):
    rng = np.random.default_rng(seed)
    img = torch.rand(3, 64, 80)
    out, mask = cutpaste_normal(img, rng)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert torch.equal(out[:, ~mask], img[:, ~mask])  # nothing changes outside the pasted box
    assert bool((out != img).any())
    h, w = bounding_box(mask)
    assert int(mask.sum()) == h * w  # one axis-aligned rectangle
    area = 64 * 80
    # w = round(sqrt(A r)), h = round(sqrt(A / r)): rounding moves the area by at most (w + h) / 2 + 1/4
    slack = (w + h) / 2 + 0.25
    assert 0.02 * area - slack <= h * w <= 0.15 * area + slack
    assert 0.3 - 1.0 / min(h, w) <= w / h <= 1 / 0.3 + 1.0 / min(h, w)


@pytest.mark.parametrize("seed", range(20))
def test_cutpaste_scar_changes_only_a_thin_rotated_strip(seed):
    rng = np.random.default_rng(seed)
    img = torch.rand(3, 64, 64)
    out, mask = cutpaste_scar(img, rng)
    assert out.shape == img.shape
    assert torch.equal(out[:, ~mask], img[:, ~mask])
    n = int(mask.sum())
    assert 0 < n <= 16 * 25 * 1.1  # nearest-neighbour rotation of a 2-16 x 10-25 px strip
    h, w = bounding_box(mask)
    diagonal = math.ceil(math.hypot(16, 25)) + 1
    assert h <= diagonal and w <= diagonal


def test_color_jitter_is_bounded_and_zero_strength_is_identity():
    rng = np.random.default_rng(0)
    img = torch.rand(3, 16, 16)
    assert torch.allclose(color_jitter(img, rng, strength=0.0), img, atol=1e-6)
    out = color_jitter(img, rng)
    assert out.shape == img.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out, img)


@pytest.mark.parametrize("variant,groups", [("3way", 3), ("normal", 2), ("scar", 2), ("union", 2)])
def test_views_and_labels(variant, groups):
    images = smooth(5, 48)
    views, labels = make_views(images, variant, np.random.default_rng(0))
    assert views.shape == (groups * 5, 3, 48, 48)
    assert labels.tolist() == [k for k in range(groups) for _ in range(5)]
    originals = views[:5]
    for k in range(1, groups):  # each augmented view differs from its own original in a small region only
        changed = (views[5 * k : 5 * (k + 1)] != originals).any(1)
        assert bool(changed.flatten(1).any(1).all())
        assert float(changed.float().mean((1, 2)).max()) <= 0.15 + 0.02
    if variant == "3way":
        scar_changed = (views[10:] != originals).any(1).flatten(1).sum(1)
        assert int(scar_changed.max()) <= 16 * 25 * 1.1  # the third view is the scar


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        CutPaste(variant="4way", pretrained=False)
    with pytest.raises(ValueError, match="variant"):
        make_views(torch.rand(1, 3, 8, 8), "4way", np.random.default_rng(0))


# -- density ----------------------------------------------------------------------------------
def test_gaussian_density_matches_sklearn_ledoit_wolf():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train = torch.tensor(rng.normal(size=(200, 16)) + 2.0)
    test = torch.tensor(rng.normal(size=(20, 16)))
    gde = GaussianDensity().fit(train)
    normed = train / train.norm(dim=1, keepdim=True)
    lw = LedoitWolf().fit(normed.numpy())
    test_normed = (test / test.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(gde(test).numpy() ** 2, lw.mahalanobis(test_normed), rtol=1e-8)
    # embeddings are L2-normalised first (scale-free); training d^2 averages at most the dimension
    torch.testing.assert_close(gde(3 * test), gde(test))
    assert float((gde(train) ** 2).mean()) <= 16 + 1e-6
    with pytest.raises(RuntimeError, match="fit"):
        GaussianDensity()(test)


# -- training ---------------------------------------------------------------------------------------
def test_trunk_is_frozen_for_the_first_steps_and_lr_follows_one_cosine():
    torch.manual_seed(0)
    algo = CutPaste(pretrained=False, **{**FAST, "steps": 2, "freeze_steps": 2})
    trunk0 = {k: v.clone() for k, v in algo.build().backbone.named_parameters()}
    head0 = {k: v.clone() for k, v in algo.net.head.named_parameters()}
    bn0 = algo.net.backbone.bn1.running_mean.clone()
    algo.fit([smooth(8)])
    assert all(torch.equal(v, trunk0[k]) for k, v in algo.net.backbone.named_parameters())
    assert not torch.equal(algo.net.backbone.bn1.running_mean, bn0)  # train mode: BN statistics still move
    assert any(not torch.equal(v, head0[k]) for k, v in algo.net.head.named_parameters())
    assert all(p.requires_grad for p in algo.net.parameters())

    torch.manual_seed(0)
    algo = CutPaste(pretrained=False, **{**FAST, "steps": 4, "freeze_steps": 2})
    algo.fit([smooth(8)])
    assert any(not torch.equal(v, trunk0[k]) for k, v in algo.net.backbone.named_parameters())
    lrs = [h["lr"] for h in algo.history]
    expected = [0.5 * FAST["lr"] * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)


def ramps(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Vertical intensity ramps (+ a little noise): a pasted patch leaves a visible step."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0.05, 0.95, size).view(1, 1, size, 1)
    return (yy + 0.02 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1).expand(-1, 3, -1, -1).clone()


def test_training_lowers_the_classification_loss():
    torch.manual_seed(0)
    algo = CutPaste(pretrained=False, variant="normal", input_size=32, steps=30, freeze_steps=0, batch_size=16)
    algo.fit([ramps(16)])
    losses = [h["train_loss"] for h in algo.history]
    assert len(losses) == 30 and losses[0] > 0.6  # ~ln 2 at the start
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    scores = algo.predict_map(ramps(4, seed=1)).scores
    assert scores.shape == (4,) and np.all(np.isfinite(scores))


def test_fixed_size_batches_cycle_a_small_training_set():
    torch.manual_seed(0)
    algo = CutPaste(pretrained=False, **{**FAST, "steps": 3, "batch_size": 6})
    seen = []
    original = algo._normalize

    def spy(x):
        seen.append(x.shape[0])
        return original(x)

    algo._normalize = spy
    algo.fit([smooth(4)])  # 4 images, batches of 6: the stream wraps around
    assert seen[:3] == [18, 18, 18]


# -- patch level --------------------------------------------------------------------------------------
def test_patch_grid_and_receptive_field_upsampling():
    assert patch_positions(64, 16, 8) == [0, 8, 16, 24, 32, 40, 48]
    assert patch_positions(30, 16, 8) == [0, 8, 14]  # the last patch is added so every pixel is covered
    ys = xs = patch_positions(32, 16, 8)
    const = receptive_field_upsample(torch.full((2, 3, 3), 2.5), ys, xs, 16, (32, 32), sigma=4)
    torch.testing.assert_close(const, torch.full((2, 32, 32), 2.5))
    one = torch.zeros(1, 3, 3)
    one[0, 0, 2] = 1.0  # the top-right patch: rows 0-15, columns 16-31
    m = receptive_field_upsample(one, ys, xs, 16, (32, 32), sigma=4)[0]
    assert float(m[16:, :].abs().max()) == 0 and float(m[:, :16].abs().max()) == 0  # outside that patch
    assert float(m[:16, 16:].min()) > 0
    torch.testing.assert_close(m[:8, 24:], torch.ones(8, 8))  # pixels covered by that patch alone


def test_patch_level_gives_maps_and_an_honest_flag():
    torch.manual_seed(0)
    algo = CutPaste(pretrained=False, patch_size=32, patch_stride=16, **{**FAST, "steps": 2})
    assert algo.pixel_level and not CutPaste.pixel_level
    algo.fit([smooth(4)])
    pred = algo.predict_map(smooth(2, seed=3))
    assert pred.maps is not None and pred.maps.shape == (2, 64, 64)
    assert np.all(pred.scores >= pred.maps.reshape(2, -1).max(1) - 1e-4)  # the map averages patch scores
    assert CutPaste(pretrained=False).pixel_level is False


# -- runner ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("cutpaste") / "Toy", n_train=16, n_valid=(2, 2), n_test=(8, 8),
                      size=64)


def run(bench: Path, results: Path, **params: Any) -> dict[str, Any]:
    return run_record("cutpaste", bench, results, {**FAST, **params})


def test_runner_end_to_end_above_chance_and_deterministic(bench, tmp_path):
    record = run(bench, tmp_path / "a")
    assert record["sizes"]["input"] == [64, 64] and record["sizes"]["batch_size"] == 8
    assert record["metrics"]["pixel_auroc"] is None
    assert record["params"]["total"] == 11_770_179 and record["config"]["pretrained"] is False
    assert [h["step"] for h in record["history"]] == list(range(1, 7))
    print("cutpaste toy image AUROC", record["metrics"]["image_auroc"])
    assert record["metrics"]["image_auroc"] >= 0.75
    again = run(bench, tmp_path / "b")
    assert again["metrics"] == record["metrics"] and again["history"] == record["history"]


@pytest.mark.slow
def test_runner_patch_level_and_validation(bench, tmp_path):
    record = run(bench, tmp_path, patch_size=32, patch_stride=8, steps=12, eval_every=6)
    assert record["metrics"]["pixel_auroc"] is not None
    print("cutpaste patch-level toy image / pixel AUROC", record["metrics"]["image_auroc"],
          record["metrics"]["pixel_auroc"])
    assert record["metrics"]["pixel_auroc"] > 0.6
    validated = [h for h in record["history"] if "val_image_auroc" in h and "step" in h]
    assert [h["step"] for h in validated] == [6, 12]
    assert record["history"][-1]["selected_step"] in (6, 12)


def test_defaults_and_registry():
    import algorithms.cutpaste  # noqa: F401

    assert registry.algorithms.get("cutpaste").cls is CutPaste
    assert CutPaste.family == "self-supervised" and not CutPaste.pixel_level
    config = CutPaste(pretrained=False).get_config()
    expected = dict(backbone="resnet18.tv_in1k", variant="3way", head_layers=2, input_size=(256, 256), steps=256,
                    freeze_steps=20, lr=0.03, momentum=0.9, weight_decay=3e-5, batch_size=64, patch_size=None,
                    patch_stride=4, smoothing_sigma=None, density_patches=16, eval_every=None, pretrained=False,
                    weights=None)
    assert config == expected


def test_missing_pretrained_weights_fail_at_construction(tmp_path):
    from bmad.errors import WeightsError

    with pytest.raises(WeightsError, match="resnet18.tv_in1k"):
        CutPaste(pretrained=True, weights=str(tmp_path))  # an empty weights folder
