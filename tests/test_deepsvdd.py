"""Deep SVDD: the bias-free network, the centre rule, the objective, the preprocessing, training,
the runner end to end (image AUROC above chance on bright-disc anomalies) and determinism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from algorithms.deepsvdd import DeepSVDD, LeNetAutoencoder, LeNetEncoder, gcn_l1, init_center, svdd_scores
from bmad import registry
from tests.conftest import make_bench, run_record

FAST = dict(epochs=8, ae_epochs=4, ae_lr=1e-3, lr=1e-3, batch_size=8, ae_batch_size=8)


def smooth(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.3, 0.6, size).view(1, 1, 1, size)
    return (ramp + 0.03 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1).expand(-1, 3, -1, -1).clone()


# -- the network ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_networks_have_no_bias_and_no_affine_batchnorm(size):
    for net in (LeNetEncoder(3, size), LeNetAutoencoder(3, size)):
        names = [n for n, _ in net.named_parameters()]
        assert names and not any(n.endswith("bias") for n in names)
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(not m.affine and m.track_running_stats for m in bns)
        assert not any(getattr(m, "bias", None) is not None for m in net.modules())


def test_sizes_and_parameter_counts():
    phi, ae = LeNetEncoder(), LeNetAutoencoder()
    assert sum(p.numel() for p in phi.parameters()) == 520_544  # the official CIFAR-10 LeNet
    assert sum(p.numel() for p in ae.parameters()) == 804_544
    assert phi(torch.rand(2, 3, 32, 32)).shape == (2, 128)
    assert LeNetEncoder(1, (64, 48), rep_dim=32)(torch.rand(2, 1, 64, 48)).shape == (2, 32)
    with torch.no_grad():
        rec = LeNetAutoencoder(3, (64, 48)).eval()(torch.rand(2, 3, 64, 48))
    assert rec.shape == (2, 3, 64, 48) and float(rec.min()) > 0 and float(rec.max()) < 1
    with pytest.raises(ValueError, match="multiple of 8"):
        LeNetEncoder(3, (30, 32))


def test_autoencoder_encoder_loads_into_phi():
    ae, phi = LeNetAutoencoder(), LeNetEncoder()
    phi.load_state_dict(ae.encoder.state_dict())  # same names: conv weights, BN statistics, fc
    x = torch.rand(4, 3, 32, 32)
    ae.eval()
    phi.eval()
    torch.testing.assert_close(phi(x), ae.encoder(x))


# -- centre, objective, preprocessing ---------------------------------------------------------
def test_center_rule_on_a_hand_made_vector():
    feats = torch.tensor([[0.10, -0.02, 0.0, 0.6, -0.3, 0.09], [0.00, -0.06, 0.0, 0.4, -0.1, 0.13]])
    # means: 0.05, -0.04, 0, 0.5, -0.2, 0.11 -> the small ones pushed to +-0.1, exact zero kept
    expected = torch.tensor([0.1, -0.1, 0.0, 0.5, -0.2, 0.11])
    torch.testing.assert_close(init_center(feats, eps=0.1), expected)


def test_scores_are_squared_distances():
    f = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    c = torch.tensor([1.0, 1.0])
    torch.testing.assert_close(svdd_scores(f, c), torch.tensor([1.0, 2.0, 8.0]))


def test_gcn_l1():
    x = torch.rand(3, 3, 8, 8) * 0.5 + 0.2
    g = gcn_l1(x).flatten(1)
    torch.testing.assert_close(g.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(g.abs().mean(1), torch.ones(3))
    torch.testing.assert_close(gcn_l1(2 * x + 1), gcn_l1(x), atol=1e-5, rtol=1e-5)  # contrast- and shift-free
    assert torch.equal(gcn_l1(torch.full((1, 3, 4, 4), 0.5)), torch.zeros(1, 3, 4, 4))


# -- training -----------------------------------------------------------------------------------
def test_centre_comes_from_the_initial_forward_pass():
    torch.manual_seed(0)
    x = smooth(12)
    algo = DeepSVDD(pretrain=False, epochs=0)
    algo.fit([x[:6], x[6:]])
    expected = init_center(algo.embed(algo.preprocess(x)), 0.1)
    torch.testing.assert_close(algo.center, expected)
    nonzero = algo.center[algo.center != 0]
    assert bool((nonzero.abs() >= 0.1).all())


@pytest.mark.parametrize("normalize", ["gcn", "imagenet"])
def test_training_lowers_both_losses(normalize):
    torch.manual_seed(0)
    x = smooth(16)
    algo = DeepSVDD(normalize=normalize, **{**FAST, "epochs": 12, "ae_epochs": 12})
    algo.fit([x[:8], x[8:]])
    ae = [h["train_loss"] for h in algo.history if h["stage"] == "autoencoder"]
    svdd = [h["train_loss"] for h in algo.history if h["stage"] == "svdd"]
    assert len(ae) == 12 and len(svdd) == 12
    assert ae[-1] < ae[0] and svdd[-1] < 0.5 * svdd[0]
    scores = algo.predict_map(x).scores
    assert scores.shape == (16,) and np.all(scores >= 0)


def test_gcn_minmax_uses_the_training_range():
    torch.manual_seed(0)
    x = smooth(8)
    algo = DeepSVDD(pretrain=False, epochs=0)
    algo.fit([x])
    pre = algo.preprocess(x)
    assert float(pre.min()) == pytest.approx(0.0, abs=1e-6) and float(pre.max()) == pytest.approx(1.0, abs=1e-6)


# -- the runner -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("svdd") / "Toy", n_train=32, n_valid=(2, 2), n_test=(10, 10), size=32)


def run(bench: Path, results: Path, **params: Any) -> dict[str, Any]:
    return run_record("deepsvdd", bench, results, {**FAST, **params})


def test_runner_end_to_end_above_chance_and_deterministic(bench, tmp_path):
    record = run(bench, tmp_path / "a")
    assert record["sizes"]["input"] == [32, 32] and record["sizes"]["batch_size"] == 8
    assert record["metrics"]["pixel_auroc"] is None
    assert record["params"] == {"total": 520_544, "trainable": 520_544}
    print("deepsvdd toy image AUROC", record["metrics"]["image_auroc"])
    assert record["metrics"]["image_auroc"] >= 0.75
    again = run(bench, tmp_path / "b")
    assert again["metrics"] == record["metrics"] and again["history"] == record["history"]


def test_validation_selects_an_epoch(bench, tmp_path):
    record = run(bench, tmp_path, eval_every=4)
    validated = [h for h in record["history"] if "val_image_auroc" in h and "epoch" in h]
    assert [h["epoch"] for h in validated] == [4, 8]
    selected = record["history"][-1]
    assert selected["selected_epoch"] in (4, 8)
    assert selected["val_image_auroc"] == max(h["val_image_auroc"] for h in validated)


def test_defaults_and_registry():
    import algorithms.deepsvdd  # noqa: F401

    entry = registry.algorithms.get("deepsvdd")
    assert entry.cls is DeepSVDD and not DeepSVDD.pixel_level and DeepSVDD.family == "one-class"
    config = DeepSVDD().get_config()
    expected = dict(input_size=(32, 32), rep_dim=128, normalize="gcn", lr=1e-4, epochs=300, lr_milestones=(50,),
                    weight_decay=0.5e-6, batch_size=200, pretrain=True, ae_lr=1e-5, ae_epochs=300,
                    ae_lr_milestones=(250,), ae_weight_decay=0.5e-6, ae_batch_size=64, center_eps=0.1,
                    eval_every=None)
    assert config == expected
    with pytest.raises(ValueError, match="normalize"):
        DeepSVDD(normalize="zscore")
