"""SimpleNet: the local aggregation of backbone features, the Gaussian anomaly-feature
generator, the truncated L1 loss, the map construction, training, and end-to-end runs
through the runner (random-init ResNet-18, small embeddings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from algorithms.simplenet import SimpleNet
from algorithms.simplenet.torch_model import PatchFeatures, anomalous_features, truncated_l1
from tests.conftest import make_bench, run_record, same_record

SMALL = dict(backbone="resnet18", input_size=32, pretrain_embed_dimension=96, target_embed_dimension=64,
             dsc_hidden=32)


class FixedMaps(nn.Module):
    """A stand-in backbone returning given feature maps."""

    def __init__(self, *maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.maps)


def test_each_feature_is_the_mean_of_one_row_of_a_channels_3x3_neighbourhood():
    torch.manual_seed(0)
    f = torch.randn(1, 4, 6, 6)
    feats, grid = PatchFeatures(FixedMaps(f), 3, pretrain_dim=12, target_dim=12)(torch.zeros(1))
    assert grid == (6, 6) and feats.shape == (36, 12)
    y, x = 2, 3
    expected = torch.stack([f[0, c, y + r - 1, x - 1:x + 2].mean() for c in range(4) for r in range(3)])
    torch.testing.assert_close(feats[y * 6 + x], expected)


def test_levels_pooled_then_upsampled_equal_the_official_upsample_then_pool():
    torch.manual_seed(0)
    l2, l3 = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    ours, _ = PatchFeatures(FixedMaps(l2, l3), 3, pretrain_dim=24, target_dim=20)(torch.zeros(1))
    levels = []
    for m in (l2, l3):  # the official order: unfold, upsample the C*9-channel map, then pool
        b, c, h, w = m.shape
        u = F.unfold(m, 3, padding=1).reshape(b, c * 9, h, w)
        u = F.interpolate(u, size=(8, 8), mode="bilinear", align_corners=False)
        levels.append(F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(-1, 1, c * 9), 24).squeeze(1))
    official = F.adaptive_avg_pool1d(torch.stack(levels, 1).reshape(-1, 1, 48), 20).squeeze(1)
    torch.testing.assert_close(ours, official)


def test_zero_padding_changes_only_the_border_features():
    feats, _ = PatchFeatures(FixedMaps(torch.ones(1, 3, 6, 6)), 3, 9, 9)(torch.zeros(1))
    grid = feats.reshape(6, 6, 9)
    interior = grid[1:-1, 1:-1].reshape(-1, 9)
    assert torch.equal(interior, interior[:1].expand_as(interior))
    assert not torch.equal(grid[0, 0], grid[2, 2]) and not torch.equal(grid[0, 3], grid[2, 2])


def test_anomaly_features_add_gaussian_noise_of_the_papers_std():
    assert SimpleNet(pretrained=False).noise_std == 0.015
    torch.manual_seed(0)
    q = torch.randn(4000, 64)
    noise = anomalous_features(q, 0.015) - q
    assert abs(noise.std().item() - 0.015) < 0.0002
    assert abs(noise.mean().item()) < 0.0002
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), q.flatten()]))[0, 1].item()) < 0.01


def test_truncated_l1_against_hand_values():
    true, fake = torch.tensor([0.7, 0.2]), torch.tensor([-0.9, 0.1])
    # normal: max(0, 0.5 - 0.7) = 0, max(0, 0.5 - 0.2) = 0.3; anomalous: max(0, -0.9 + 0.5) = 0, max(0, 0.1 + 0.5) = 0.6
    torch.testing.assert_close(truncated_l1(true, fake), torch.tensor(0.15 + 0.3))
    assert truncated_l1(torch.tensor([0.5, 2.0]), torch.tensor([-0.5, -3.0])).item() == 0.0
    assert truncated_l1(torch.zeros(5), torch.zeros(5)).item() == 1.0
    scores = torch.tensor([1.0, -1.0], requires_grad=True)  # both beyond their margins: no gradient
    truncated_l1(scores[:1], scores[1:]).backward()
    assert not scores.grad.any()


def test_map_is_smoothed_upsampled_patch_scores_and_score_their_raw_max():
    torch.manual_seed(0)
    algo = SimpleNet(**SMALL, pretrained=False)
    images = torch.rand(2, 3, 32, 32)
    patch = algo.patch_scores(images)
    assert patch.shape == (2, 4, 4)
    pred = algo.predict_map(images)
    up = F.interpolate(patch[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    expected = [gaussian_filter(m, sigma=4) for m in up]
    for got, want in zip(pred.maps, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))
    torch.testing.assert_close(torch.from_numpy(pred.scores).float(), patch.flatten(1).amax(1))
    again = algo.predict_map(images)  # no noise at inference
    assert (again.scores == pred.scores).all() and (again.maps == pred.maps).all()


def test_trainable_parameters_at_the_official_dimensions():
    counts = SimpleNet(backbone="resnet18", pretrained=False).parameter_counts()
    assert counts["trainable"] == (1536 * 1536 + 1536) + (1536 * 1024 + 1024 + 2 * 1024 + 1024)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    algo = SimpleNet(**SMALL, dsc_lr=1e-3, adaptor_lr=1e-3, pretrained=False)
    optimizers = algo.make_optimizers()
    images = torch.rand(4, 3, 32, 32)
    losses = [algo.training_step(images, optimizers) for _ in range(10)]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_defaults_and_checks():
    config = SimpleNet(pretrained=False).get_config()
    expected = dict(backbone="wide_resnet50_2.tv_in1k", layers=("layer2", "layer3"), input_size=(288, 288),
                    patchsize=3, pretrain_embed_dimension=1536, target_embed_dimension=1536, noise_std=0.015,
                    dsc_layers=2, dsc_hidden=1024, dsc_margin=0.5, dsc_lr=2e-4, dsc_weight_decay=1e-5,
                    adaptor_lr=1e-4, adaptor_weight_decay=0.01, meta_epochs=40, gan_epochs=4, batch_size=8,
                    sigma=4.0, selection="val_auroc")
    assert {k: config[k] for k in expected} == expected
    with pytest.raises(ValueError, match="layers"):
        SimpleNet(layers=("layer9",), pretrained=False)


# -- end to end --------------------------------------------------------------------------
E2E = dict(SMALL, meta_epochs=2, gan_epochs=2, batch_size=4)


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=8, n_valid=(2, 2), n_test=(6, 6), size=32)


def run(bench: Path, results: Path) -> dict[str, Any]:
    return run_record("simplenet", bench, results, E2E)


@pytest.fixture(scope="module")
def first(toy_bench, tmp_path_factory) -> dict[str, Any]:
    """The first run's record (made once per module, reused by the rerun test)."""
    return run(toy_bench, tmp_path_factory.mktemp("first"))


def test_runs_through_the_runner(first):
    epochs, selected = first["history"][:-1], first["history"][-1]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert all(0 <= h["val_image_auroc"] <= 1 for h in epochs)
    assert selected["val_image_auroc"] == max(h["val_image_auroc"] for h in epochs)
    assert first["metrics"]["image_auroc"] >= 0.8, first["metrics"]
    assert first["metrics"]["pixel_auroc"] is not None


@pytest.mark.slow
def test_same_seed_same_record(first, toy_bench, tmp_path):
    again = run(toy_bench, tmp_path)
    same_record(first, again)
