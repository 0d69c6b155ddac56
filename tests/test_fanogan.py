"""f-AnoGAN: network shapes and sizes, the WGAN-GP gradient penalty against hand computations,
the izi_f loss and the score's decomposition, stage 2 leaving G and D untouched, training lowering
the encoder loss, the optional residual map, the runner end to end (image AUROC above chance on
bright-disc anomalies) and determinism. Tiny networks (dim 8) at 32 x 32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from algorithms.fanogan import (
    FAnoGAN,
    anomaly_score,
    build_networks,
    gradient_penalty,
    izif_loss,
    izif_terms,
)
from bmad import registry
from tests.conftest import make_bench, run_record

TINY = dict(input_size=32, latent_dim=16, dim=8, epochs=3, batch_size=8)


def smooth(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.3, 0.6, size).view(1, 1, 1, size)
    return (ramp + 0.03 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1).expand(-1, 3, -1, -1).clone()


# -- networks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", [("resnet", 32), ("resnet", 64), ("dcgan", 32), ("dcgan", 64)])
def test_shapes(arch, size):
    g, d, e = build_networks(arch, 16, 3, size, dim=8)
    g.eval()
    with torch.no_grad():
        x = g(torch.randn(4, 16))
    assert x.shape == (4, 3, size, size) and float(x.abs().max()) <= 1
    n_feat = 8 * 8 * (size // 16) ** 2 if arch == "resnet" else 128 * (size // 16) ** 2
    assert d.features(x).shape == (4, n_feat) and d(x).shape == (4,)
    with torch.no_grad():
        z = e(x)
    assert z.shape == (4, 16) and float(z.abs().max()) <= 1  # tanh, as in the paper


def test_parameter_counts_at_full_size():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    g, d, e = build_networks("dcgan", 100, 3, 224)
    assert (count(g), count(d), count(e)) == (40_765_955, 122_977, 2_606_788)  # BMAD's networks at 224
    g, d, e = build_networks("dcgan", 100, 3, 64)
    assert (count(g), count(d), count(e)) == (3_533_315, 99_937, 302_788)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_networks("resnet", 100, 3, 40)
    with pytest.raises(ValueError, match="architecture"):
        build_networks("vae", 100, 3, 64)


def test_resnet_critic_has_no_batch_statistics():
    _, d, e = build_networks("resnet", 16, 3, 32, dim=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())  # per-sample GP needs per-sample norms
    assert any(isinstance(m, nn.BatchNorm2d) for m in e.modules())
    d.train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(d(x)[:1], d(x[:1]))  # a sample's value does not depend on the batch


# -- the gradient penalty ---------------------------------------------------------------------------
class LinearCritic(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.flatten()


class QuadraticCritic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x**2).flatten(1).sum(1)  # gradient = x


def test_gradient_penalty_of_a_linear_critic_is_the_weight_norm_gap():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    critic = LinearCritic(w)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    expected = (w.norm() - 1) ** 2  # the gradient is w everywhere, whatever alpha
    for alpha in (None, torch.rand(5, 1, 1, 1), torch.zeros(5, 1, 1, 1)):
        torch.testing.assert_close(gradient_penalty(critic, real, fake, alpha), expected)


def test_gradient_penalty_by_hand_for_a_quadratic_critic():
    torch.manual_seed(1)
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    alpha = torch.rand(6, 1, 1, 1)
    x_hat = alpha * real + (1 - alpha) * fake
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(gradient_penalty(QuadraticCritic(), real, fake, alpha), expected)


def test_gradient_penalty_is_differentiable_in_the_critic():
    critic = LinearCritic(torch.full((1, 2, 2), 1.0))  # ||w|| = 2: penalty 1, d/dw = 2 (||w|| - 1) w / ||w||
    gp = gradient_penalty(critic, torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2))
    gp.backward()
    torch.testing.assert_close(critic.w.grad, torch.full((1, 2, 2), 1.0))


# -- izi_f loss and score -------------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * x


class StubCritic(nn.Module):
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.flatten(1), 2 * x.flatten(1)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).sum(1)


def test_izif_loss_and_score_by_hand():
    # E = identity, G = 0.5 x: G(E(x)) = x / 2, residual x / 2; features (x, 2x): residual (x/2, x)
    x = torch.randn(3, 1, 4, 4)
    gen, critic, enc = Scale(0.5), StubCritic(), Scale(1.0)
    img = ((x / 2) ** 2).flatten(1).mean(1)
    feat = torch.cat([(x / 2) ** 2, x**2], 1).flatten(1).mean(1)
    terms = izif_terms(gen, critic, enc, x)
    torch.testing.assert_close(terms[0], img)
    torch.testing.assert_close(terms[1], feat)
    torch.testing.assert_close(izif_loss(gen, critic, enc, x, kappa=2.0), img.mean() + 2.0 * feat.mean())
    score, residual = anomaly_score(gen, critic, enc, x, kappa=2.0)
    torch.testing.assert_close(score, img + 2.0 * feat)
    torch.testing.assert_close(residual, (x / 2).abs())


def test_score_minus_image_term_is_kappa_times_feature_term():
    torch.manual_seed(0)
    g, d, e = (m.eval() for m in build_networks("resnet", 16, 3, 32, dim=8))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        img, feat, _ = izif_terms(g, d, e, x)
        score, _ = anomaly_score(g, d, e, x, kappa=1.0)
    torch.testing.assert_close(score - img, feat)


# -- training ----------------------------------------------------------------------------------------------
class Snapshot(FAnoGAN):
    """Keeps G's and D's state as stage 1 left it."""

    def _train_encoder(self, train, val):  # noqa: ANN001
        self.after_gan = {k: v.clone() for k, v in {**_prefixed("g", self.generator), **_prefixed("d", self.critic)}.items()}
        super()._train_encoder(train, val)


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet", "dcgan"])
def test_two_stages_freeze_g_and_d_and_lower_the_encoder_loss(arch):
    torch.manual_seed(0)
    x = smooth(16)
    gan_epochs = 3 if arch == "resnet" else 1
    algo = Snapshot(architecture=arch, **{**TINY, "epochs": gan_epochs, "encoder_epochs": 8 if arch == "resnet" else 2})
    algo.fit([x[:8], x[8:]])
    after = {**_prefixed("g", algo.generator), **_prefixed("d", algo.critic)}
    assert after.keys() == algo.after_gan.keys()
    assert all(torch.equal(after[k], algo.after_gan[k]) for k in after)  # weights and BN buffers untouched
    gan = [h for h in algo.history if h["stage"] == "wgan_gp"]
    enc = [h["train_loss"] for h in algo.history if h["stage"] == "encoder"]
    assert [h["epoch"] for h in gan] == list(range(1, gan_epochs + 1)) and len(enc) == (8 if arch == "resnet" else 2)
    assert all(np.isfinite(h["train_loss"]) and h["gp"] >= 0 and np.isfinite(h["g_loss"]) for h in gan)
    assert all(p.requires_grad for net in (algo.generator, algo.critic, algo.encoder) for p in net.parameters())
    if arch == "resnet":  # BMAD's DCGAN generator (BN eps 0.8) gives a near-constant G(z) this early
        assert enc[-1] < 0.9 * enc[0]
        w = [h["wasserstein"] for h in gan]  # the critic learns to tell real from generated
        assert w[-1] > w[0] and w[-1] > 0


def test_generator_steps_every_n_critic_batches():
    torch.manual_seed(0)
    algo = FAnoGAN(**{**TINY, "epochs": 1, "encoder_epochs": 0, "n_critic": 3})
    steps = []
    original = torch.optim.Adam.step

    def count(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        steps.append(len(self.param_groups[0]["params"]))
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = count
    try:
        algo.fit([smooth(2, seed=i) for i in range(7)])
    finally:
        torch.optim.Adam.step = original
    n_g = len(list(build_networks("resnet", 16, 3, 32, 8)[0].parameters()))
    n_d = len(list(build_networks("resnet", 16, 3, 32, 8)[1].parameters()))
    assert steps.count(n_d) == 7 and steps.count(n_g) == 3  # batches 0, 3, 6


def test_residual_map_option_is_honest():
    assert not FAnoGAN.pixel_level and not FAnoGAN().pixel_level
    torch.manual_seed(0)
    algo = FAnoGAN(residual_map=True, **{**TINY, "epochs": 1})
    assert algo.pixel_level
    x = smooth(4)
    algo.fit([x])
    pred = algo.predict_map(x)
    assert pred.maps is not None and pred.maps.shape == (4, 32, 32)
    with torch.no_grad():
        score, residual = anomaly_score(algo.generator, algo.critic, algo.encoder, x * 2 - 1, 1.0)
    np.testing.assert_allclose(pred.maps, residual.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(pred.scores, score.numpy(), rtol=1e-6)


# -- the runner ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("fanogan") / "Toy", n_train=32, n_valid=(2, 2), n_test=(10, 10), size=32)


def run(bench: Path, results: Path, **params: Any) -> dict[str, Any]:
    return run_record("fanogan", bench, results, {**TINY, **params})


def test_runner_end_to_end_above_chance_and_deterministic(bench, tmp_path):
    # BMAD's DCGAN networks: cheap enough for the default selection (the paper's: slow test below)
    record = run(bench, tmp_path / "a", architecture="dcgan")
    assert record["sizes"]["input"] == [32, 32] and record["sizes"]["batch_size"] == 8
    assert record["metrics"]["pixel_auroc"] is None
    assert [h["stage"] for h in record["history"]] == ["wgan_gp"] * 3 + ["encoder"] * 3
    print("fanogan (dcgan) toy image AUROC", record["metrics"]["image_auroc"])
    assert record["metrics"]["image_auroc"] >= 0.75
    again = run(bench, tmp_path / "b", architecture="dcgan")
    assert again["metrics"] == record["metrics"] and again["history"] == record["history"]


@pytest.mark.slow
def test_runner_paper_architecture_residual_map_and_validation(bench, tmp_path):
    # the paper's residual WGAN-GP needs a few hundred generator steps on this toy set
    # (240 here: n_critic 1); before that its critic features rank bright discs as "closer"
    record = run(bench, tmp_path, residual_map=True, epochs=60, n_critic=1, encoder_epochs=10, eval_every=5)
    metrics = record["metrics"]
    print("fanogan (resnet) toy image / pixel AUROC", metrics["image_auroc"], metrics["pixel_auroc"])
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.8
    validated = [h for h in record["history"] if "val_image_auroc" in h and "epoch" in h]
    assert [h["epoch"] for h in validated] == [5, 10] and all(h["stage"] == "encoder" for h in validated)
    assert record["history"][-1]["selected_epoch"] in (5, 10)


def test_defaults_and_registry():
    import algorithms.fanogan  # noqa: F401

    assert registry.algorithms.get("fanogan").cls is FAnoGAN
    assert FAnoGAN.family == "reconstruction (GAN)" and FAnoGAN.square and FAnoGAN.size_multiple == 16
    expected = dict(architecture="resnet", input_size=(64, 64), latent_dim=100, dim=64, epochs=200,
                    encoder_epochs=None, batch_size=32, lr=2e-4, betas=(0.5, 0.999), n_critic=5, lambda_gp=10.0,
                    kappa=1.0, residual_map=False, eval_every=None)
    assert FAnoGAN().get_config() == expected
    with pytest.raises(ValueError, match="architecture"):
        FAnoGAN(architecture="vae")
