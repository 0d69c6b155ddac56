"""UTRAD: feature tokens, the U-shaped transformer's windows, levels and skip connections,
the frozen positional tables and detached scale head, the multi-scale map, training, and
end-to-end runs through the runner (random-init ResNet-18, tiny transformer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algorithms.utrad import Utrad
from algorithms.utrad.torch_model import FeatureTokens, UTransformer, anomaly_map, merge, partition, utrad_loss
from bmad.errors import WeightsError
from bmad.weights import create_timm_backbone
from tests.conftest import make_bench, run_record, same_record

TINY = dict(d_model=32, n_heads=2, ff_dim=64, n_layers=1, patch_sizes=(2, 2, 2), bottleneck_dim=8)
SMALL = dict(backbone="resnet18", input_size=32, **TINY)


def test_tokens_are_layer1_with_layer2_and_layer3_repeated():
    torch.manual_seed(0)
    cnn = create_timm_backbone("resnet18", False, features_only=True, out_indices=(1, 2, 3))
    x = torch.randn(2, 3, 64, 64)
    tokens = FeatureTokens(cnn)(x)
    l1, l2, l3 = cnn(x)
    expected = torch.cat([l1, l2.repeat_interleave(2, -1).repeat_interleave(2, -2),
                          l3.repeat_interleave(4, -1).repeat_interleave(4, -2)], dim=1)
    assert tokens.shape == (2, 64 + 128 + 256, 16, 16)
    assert torch.equal(tokens, expected)


def test_partition_cuts_contiguous_windows_and_merge_inverts_it():
    b, h, w, p = 2, 8, 12, 4
    grid = torch.arange(b * h * w, dtype=torch.float32).reshape(b, h, w, 1)
    windows = partition(grid, p)
    assert windows.shape == (b * (h // p) * (w // p), p * p, 1)
    for bi in range(b):
        for ph in range(h // p):
            for pw in range(w // p):
                n = (bi * (h // p) + ph) * (w // p) + pw
                block = grid[bi, ph * p:(ph + 1) * p, pw * p:(pw + 1) * p, 0].reshape(-1)
                assert torch.equal(windows[n, :, 0], block)
    assert torch.equal(merge(windows, b, h, w, p), grid)


def test_u_shape_levels_and_skip_connections():
    torch.manual_seed(0)
    b, c, d = 2, 24, TINY["d_model"]
    model = UTransformer(c, (16, 16), d, 2, 64, 0.1, 1, (2, 2, 2), 8).eval()
    seen: dict[str, Any] = {}
    for i in range(3):
        model.encoders[i].register_forward_hook(lambda m, a, o, i=i: seen.update({f"enc{i}": (a[0], o)}))
        model.bottlenecks[i].register_forward_hook(lambda m, a, o, i=i: seen.update({f"neck{i}": o}))
        model.decoders[i].register_forward_hook(lambda m, a, o, i=i: seen.update({f"dec{i}": (a[0], a[1], o)}))
    with torch.no_grad():
        recon, scale = model(torch.randn(b, c, 16, 16))
    assert recon.shape == (b, c, 16, 16) and scale.shape == (b, 1, 16, 16)
    # down: 8x8, 4x4, 2x2 windows of 2x2 tokens per image, each behind a zero summary token
    for level, n_windows in enumerate((64, 16, 4)):
        src, out = seen[f"enc{level}"]
        assert src.shape == out.shape == (b * n_windows, 5, d)
        assert torch.equal(src[:, 0], torch.zeros_like(src[:, 0]))
        if level < 2:  # the next level's tokens are this level's summaries (+ its positional table)
            side = int(n_windows ** 0.5)
            summaries = out[:, 0].reshape(b, side, side, d)
            nxt = seen[f"enc{level + 1}"][0][:, 1:] - model.pos_levels[level + 1]
            torch.testing.assert_close(nxt, partition(summaries, 2))
    # up: each decoder reads [the coarser level's token for the window, the window's skip latents]
    for level, n_windows in enumerate((64, 16, 4)):
        queries, memory, out = seen[f"dec{level}"]
        assert queries.shape == out.shape == (b * n_windows, 4, d)
        assert memory.shape == (b * n_windows, 5, d)
        assert torch.equal(memory[:, 1:], seen[f"neck{level}"])
        assert torch.equal(queries[0], model.queries[level].weight)
        if level == 2:
            assert torch.equal(memory[:, 0], seen["enc2"][1][:, 0])
        else:
            side = int((b * n_windows // b) ** 0.5)
            coarser = merge(seen[f"dec{level + 1}"][2], b, side, side, 2)
            assert torch.equal(memory[:, 0], coarser.reshape(-1, d))


def test_full_size_matches_the_official_parameter_count():
    model = UTransformer(448, (64, 64))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the official module has 91,719,744: the same plus its 512-entry all-zero summary-token parameter
    assert total == 91_719_744 - 512
    assert total - trainable == 512 * 64 * 64 + 3 * 16 * 512  # the untrained positional tables


def test_positional_tables_get_no_gradient_and_the_scale_head_is_detached():
    torch.manual_seed(0)
    model = UTransformer(24, (16, 16), 32, 2, 64, 0.1, 1, (2, 2, 2), 8).train()
    feats = torch.randn(2, 24, 16, 16)
    recon, scale = model(feats)
    F.mse_loss(scale, torch.ones_like(scale)).backward()
    body = [p for n, p in model.named_parameters() if not n.startswith("scale_head")]
    assert all(p.grad is None or not p.grad.any() for p in body)
    assert all(p.grad is not None and p.grad.any() for n, p in model.named_parameters()
               if n.startswith("scale_head.0"))
    model.zero_grad()
    utrad_loss(feats, *model(feats)).backward()
    assert model.pos_global.grad is None and all(p.grad is None for p in model.pos_levels)
    assert model.pre_conv.weight.grad.any()
    trained = UTransformer(24, (16, 16), 32, 2, 64, 0.1, 1, (2, 2, 2), 8, train_positions=True)
    utrad_loss(feats, *trained(feats)).backward()
    assert trained.pos_global.grad is not None and trained.pos_global.grad.any()


def test_map_is_the_mean_over_pooling_scales_of_the_scaled_error():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 8, 8)
    error = torch.rand(2, 1, 8, 8) + 0.5
    direction = F.normalize(torch.randn(2, 5, 8, 8), dim=1)
    recon = feats + error * direction  # ||recon - feats|| = error
    scale = torch.full((2, 1, 8, 8), -2.0)  # |scale| = 2
    d = error / 2
    pooled = [d] + [d.reshape(2, 1, 8 // k, k, 8 // k, k).mean((3, 5)) for k in (2, 8)]
    expected = sum(F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in pooled) / 3
    torch.testing.assert_close(anomaly_map(feats, recon, scale, (1, 2, 8), (8, 8)), expected[:, 0])
    torch.testing.assert_close(anomaly_map(feats, recon, None, (1, 2, 8), (8, 8)), 2 * expected[:, 0])
    constant = anomaly_map(feats, feats + 3 * direction, scale, (1, 2, 8), (32, 32))
    torch.testing.assert_close(constant, torch.full((2, 32, 32), 1.5))


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    algo = Utrad(**SMALL, lr=1e-3, pretrained=False)
    optimizer = algo.make_optimizer()
    images = torch.rand(4, 3, 32, 32)
    losses = [algo.training_step(images, optimizer) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_defaults_and_checks():
    config = Utrad(pretrained=False).get_config()
    expected = dict(backbone="resnet18.tv_in1k", input_size=(256, 256), d_model=512, n_heads=8, ff_dim=2048,
                    dropout=0.1, n_layers=4, patch_sizes=(4, 4, 4), bottleneck_dim=128, train_positions=False,
                    scale_normalize=True, lr=1e-4, betas=(0.5, 0.999), epochs=150, batch_size=8, selection="train_loss")
    assert {k: config[k] for k in expected} == expected
    with pytest.raises(ValueError, match="divisible by 64"):
        Utrad(input_size=128, pretrained=False)
    with pytest.raises(ValueError, match="selection"):
        Utrad(selection="test_auroc", pretrained=False)


def test_missing_pretrained_weights_fail_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("BMAD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match="resnet18.tv_in1k"):
        Utrad(weights=str(tmp_path))


# -- end to end --------------------------------------------------------------------------
E2E = dict(SMALL, epochs=3, batch_size=4)


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=8, n_valid=(2, 2), n_test=(6, 6), size=32)


def run(bench: Path, results: Path) -> dict[str, Any]:
    return run_record("utrad", bench, results, E2E)


@pytest.fixture(scope="module")
def first(toy_bench, tmp_path_factory) -> dict[str, Any]:
    """The first run's record (made once per module, reused by the rerun test)."""
    return run(toy_bench, tmp_path_factory.mktemp("first"))


def test_runs_through_the_runner(first):
    epochs, selected = first["history"][:-1], first["history"][-1]
    losses = [h["train_loss"] for h in epochs]
    assert [h["epoch"] for h in epochs] == [1, 2, 3]
    assert selected == {"selected_epoch": int(np.argmin(losses)) + 1, "selection": "train_loss"}
    assert first["sizes"]["input"] == [32, 32] and first["sizes"]["batch_size"] == 4
    assert first["metrics"]["image_auroc"] >= 0.8, first["metrics"]
    assert first["metrics"]["pixel_auroc"] is not None
    assert 0 < first["params"]["trainable"] < first["params"]["total"]


@pytest.mark.slow
def test_same_seed_same_record(first, toy_bench, tmp_path):
    again = run(toy_bench, tmp_path)
    same_record(first, again)
