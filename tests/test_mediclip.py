"""MediCLIP and the shared focal / Dice losses.

Fast tests use the tiny CLIP (4 vision blocks, so ``layers=(1, 2, 3)`` stands for the full
model's (11, 17, 23): the last three blocks) with random weights; the full-size ViT-L/14
parameter count builds the 428M-parameter architecture and is marked slow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from algorithms.clip import TINY_CLIP, encode_image, tokenizer_for
from algorithms.clip.losses import dice_loss, focal_loss
from algorithms.mediclip import ABNORMAL_WORDS, NORMAL_WORDS, MediCLIP, MediCLIPHead
from algorithms.synthesis.rng import rng_for
from algorithms.synthesis.tasks import MediCLIPSynthesis
from bmad import registry
from bmad.runner import seed_everything
from tests.conftest import make_bench, run_record

TINY_LAYERS = (1, 2, 3)
FULL_TRAINABLE = 3 * (1024 * 768 + 768) + 21 * 8 * 768  # 2,490,624


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model's ops are small, and on a busy 2-core machine thread
    hand-offs made them 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**params: Any) -> MediCLIP:
    """A built tiny MediCLIP (seeded, random weights)."""
    seed_everything(0)
    params = {"clip_model": TINY_CLIP, "pretrained": False, "layers": TINY_LAYERS, **params}
    algo = MediCLIP(**params)
    algo.build()
    return algo


def bench_images(root: Path, split: str = "train", cls: str = "good") -> torch.Tensor:
    """The images of one split/class of a generated bench as [N, 1, H, W] in [0, 1]."""
    files = sorted((root / split / cls / "img").glob("*.png"))
    return torch.tensor(np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files]))[:, None]


# -- shared losses ---------------------------------------------------------------------------
def test_focal_loss_matches_hand_computed_values():
    # pixel 1: P=(0.8, 0.2), y=0; pixel 2: P=(0.3, 0.7), y=1
    probs = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]])
    target = torch.tensor([[[0.0, 1.0]]])
    e = 1e-5
    pt1 = 0.8 * (1 - e) + 0.2 * e + e
    pt2 = 0.3 * e + 0.7 * (1 - e) + e
    expected = (-(1 - pt1) ** 2 * math.log(pt1) - (1 - pt2) ** 2 * math.log(pt2)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_clamp_and_offset_details():
    # P(true class) = 0: the clamped one-hot gives 1e-5 * 1, plus the 1e-5 offset -> pt = 2e-5
    # (no clamp, or no offset, would give pt = 1e-5, loss 11.51 instead of 10.82)
    wrong = focal_loss(torch.tensor([[[[0.0]], [[1.0]]]]), torch.tensor([[[0.0]]]))
    pt = 2e-5
    assert wrong.item() == pytest.approx(-(1 - pt) ** 2 * math.log(pt), rel=1e-5)
    # P(true class) = 1: pt = (1 - 1e-5) + 1e-5 = 1, the loss vanishes
    right = focal_loss(torch.tensor([[[[1.0]], [[0.0]]]]), torch.tensor([[[0.0]]]))
    assert abs(right.item()) < 1e-8
    # the target is cast with .long(): 0.9 counts as class 0
    assert focal_loss(torch.tensor([[[[0.0]], [[1.0]]]]), torch.tensor([[[0.9]]])).item() == pytest.approx(wrong.item())


def test_dice_loss_matches_hand_computed_values():
    p1 = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.2, 0.2], [0.2, 0.2]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    d1 = (2 * 1.5 + 1) / (1.75 + 2 + 1)  # 4 / 4.75
    d2 = (0 + 1) / (0.8 + 0 + 1)  # empty mask: smoothing 1 keeps it finite
    assert dice_loss(p1, y).item() == pytest.approx(1 - (d1 + d2) / 2, rel=1e-6)
    assert dice_loss(y, y).item() == pytest.approx(1 - ((2 * 2 + 1) / (2 + 2 + 1) + 1) / 2, abs=1e-7)


# -- the model ------------------------------------------------------------------------------
def test_registered_with_the_papers_defaults():
    entry = registry.algorithms.get("mediclip")
    assert entry.cls is MediCLIP and MediCLIP.pixel_level
    algo = MediCLIP(pretrained=False)
    cfg = algo.get_config()
    assert cfg["clip_model"] == "ViT-L-14" and cfg["clip_weights"] == "openai" and cfg["image_size"] == 224
    assert cfg["layers"] == (11, 17, 23) and cfg["n_ctx"] == 8
    assert cfg["temperature"] == 0.07 and cfg["causal_mask"] is True
    assert cfg["lr"] == 1e-3 and cfg["betas"] == (0.5, 0.999) and cfg["batch_size"] == 8 and cfg["epochs"] == 200
    assert cfg["poisson"] is True and cfg["allow_torchscript"] is False
    assert len(NORMAL_WORDS) == 10 and len(ABNORMAL_WORDS) == 11
    assert MediCLIP(pretrained=False, layers="1, 2,3").layers == (1, 2, 3)  # as --param layers=1,2,3


def test_full_size_head_parameter_count():
    """The trainable parts for ViT-L/14's sizes (vision width 1024, embed 768, text width 768, 16x16 grid)."""
    head = MediCLIPHead(width=1024, embed_dim=768, text_width=768, grid=(16, 16), tokenizer=tokenizer_for("ViT-L-14"),
                        layers=(11, 17, 23))
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == FULL_TRAINABLE == 2_490_624
    assert sum(p.numel() for p in head.adapters.parameters()) == 2_361_600
    assert head.prompts.ctx.shape == (21, 8, 768)


@pytest.mark.slow
def test_full_size_vit_l14_parameter_counts():
    seed_everything(0)
    algo = MediCLIP(pretrained=False)  # ViT-L-14, random weights
    algo.build()
    counts = algo.parameter_counts()
    assert counts["trainable"] == 2_490_624
    clip_params = sum(p.numel() for p in algo.clip.parameters())
    assert 427e6 < clip_params < 428.5e6 and counts["total"] == clip_params + 2_490_624


def test_tiny_parameter_count_and_bad_layers():
    algo = tiny()
    assert algo.parameter_counts()["trainable"] == 3 * (64 * 64 + 64) + 21 * 8 * 64
    with pytest.raises(ValueError, match="out of range"):
        tiny(layers=(1, 4))


def test_adapters_see_the_tokens_after_the_chosen_blocks():
    algo = tiny(layers=(0, 2, 3))
    x = torch.rand(2, 1, 224, 224)
    seen: list[torch.Tensor] = []
    hooks = [a.register_forward_hook(lambda m, inp, out: seen.append(inp[0])) for a in algo.head.adapters]
    with torch.no_grad():
        algo.probabilities(x)
        ref = encode_image(algo.clip, algo.prepare(x), keep=(0, 1, 2, 3)).intermediates
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for got, layer in zip(seen, (0, 2, 3)):
        tokens = ref[layer][:, 1:]  # class token dropped, (B, 49, 64) -> (B, 64, 7, 7)
        assert torch.equal(got, tokens.transpose(1, 2).reshape(2, 64, 7, 7))
    assert not torch.allclose(seen[0], ref[1][:, 1:].transpose(1, 2).reshape(2, 64, 7, 7))


def _pin_features(algo: MediCLIP, direction: torch.Tensor) -> None:
    """Make every adapter output ``direction`` at every position (zero weights, bias = direction)."""
    with torch.no_grad():
        for adapter in algo.head.adapters:
            adapter.weight.zero_()
            adapter.bias.copy_(direction)


def test_without_temperature_probabilities_are_confined():
    lo, hi = math.exp(-2) / (1 + math.exp(-2)), 1 / (1 + math.exp(-2))  # 0.1192, 0.8808
    algo = tiny(temperature=None)
    with torch.no_grad():
        probs = algo.probabilities(torch.rand(4, 1, 224, 224), algo.head.text_features(algo.clip))
    assert probs.min() >= lo - 1e-6 and probs.max() <= hi + 1e-6
    assert torch.allclose(probs.sum(dim=1), torch.ones(1))
    # the bound is reached: features equal to T_normal = -T_abnormal give cos (1, -1)
    e = torch.zeros(64)
    e[0] = 1.0
    _pin_features(algo, e)
    text = torch.stack([e, -e], dim=1)  # (E, 2): normal, abnormal
    with torch.no_grad():
        p_anomaly = algo.probabilities(torch.rand(1, 1, 224, 224), text)[:, 1]
    assert torch.allclose(p_anomaly, torch.full_like(p_anomaly, lo), atol=1e-6)


def test_temperature_0_07_escapes_the_bound():
    algo = tiny(temperature=0.07)
    e = torch.zeros(64)
    e[5] = 1.0
    _pin_features(algo, e)
    text = torch.stack([-e, e], dim=1)  # features on T_abnormal = -T_normal
    with torch.no_grad():
        p_anomaly = algo.probabilities(torch.rand(1, 1, 224, 224), text)[:, 1]
    expected = 1 / (1 + math.exp(-2 / 0.07))
    assert torch.allclose(p_anomaly, torch.full_like(p_anomaly, expected), atol=1e-6) and p_anomaly.min() > 0.999


def test_text_features_and_the_causal_mask():
    algo = tiny()
    clip, prompts = algo.clip, algo.head.prompts
    with torch.no_grad():
        causal = algo.head.text_features(clip)
        algo.head.causal_mask = False
        open_mask = algo.head.text_features(clip)
        algo.head.causal_mask = True
        assert causal.shape == (64, 2) and torch.allclose(causal.norm(dim=0), torch.ones(2))
        assert not torch.allclose(causal, open_mask, atol=1e-3)
        # contexts set to the placeholder tokens' own embeddings: the causal features are
        # open_clip's encode_text of the prompts, averaged per class and normalised
        ids = prompts.token_ids
        rows = torch.arange(ids.shape[0]).view(-1, 1)
        cols = prompts.starts.view(-1, 1) + torch.arange(8)
        prompts.ctx.copy_(clip.token_embedding(ids)[rows, cols])
        ref = clip.encode_text(ids)
        ref = torch.stack([ref[:10].mean(0), ref[10:].mean(0)], dim=1)
        assert torch.allclose(algo.head.text_features(clip), ref / ref.norm(dim=0), atol=1e-5)
    assert ids.shape[0] == 21 and all(int(s) == 1 for s in prompts.starts)  # "[sot] X*8 {word}. [eot]"


def test_gradients_reach_adapters_and_contexts_and_text_is_cached_at_inference():
    algo = tiny()
    x = torch.rand(2, 1, 224, 224)
    y = torch.zeros(2, 224, 224)
    y[:, 50:120, 60:140] = 1
    algo.loss(x, y).backward()
    assert algo.head.prompts.ctx.grad.abs().sum() > 0
    assert all(a.weight.grad.abs().sum() > 0 for a in algo.head.adapters)
    first = algo.predict_map(x).scores
    assert len(algo._text) == 1
    with torch.no_grad():
        algo.head.prompts.ctx.add_(1.0)  # the cached text features are reused ...
    assert np.array_equal(algo.predict_map(x).scores, first)
    algo._text.clear()  # ... until the cache is cleared (fit does it)
    assert not np.array_equal(algo.predict_map(x).scores, first)


def test_maps_have_the_input_size_and_score_is_the_max():
    algo = tiny()
    pred = algo.predict_map(torch.rand(3, 3, 224, 224))
    assert pred.maps.shape == (3, 224, 224) and pred.maps.dtype == np.float32
    assert np.allclose(pred.scores, pred.maps.reshape(3, -1).max(1), atol=1e-6)
    assert algo.predict_map(torch.rand(2, 1, 64, 64)).maps.shape == (2, 64, 64)


# -- training -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=6, n_valid=(1, 1), n_test=(4, 4), size=32)


def test_synthesis_draws_from_seed_epoch_index_with_the_other_images_as_support(toy_bench):
    algo = tiny()
    images = algo._keep_uint8([bench_images(toy_bench)])
    synthesis = MediCLIPSynthesis(probabilities={"cut_paste": 1.0})
    x, y = algo._synthesise(images, [4, 1], synthesis, seed=7, epoch=3)
    for row, i in enumerate((4, 1)):
        others = [im for j, im in enumerate(images) if j != i]
        image, mask = synthesis(images[i], others, rng_for(7, 3, i))
        assert torch.equal(x[row, 0], torch.from_numpy(image).float() / 255) and torch.equal(y[row], torch.from_numpy(mask))
        assert mask.any() and not np.array_equal(image, images[i])
    same_draw_with_self = synthesis(images[4], images, rng_for(7, 3, 4))[0]
    assert not torch.equal(x[0, 0], torch.from_numpy(same_draw_with_self).float() / 255)  # the support differs


def test_a_few_steps_lower_the_loss(toy_bench):
    algo = tiny()
    images = algo._keep_uint8([bench_images(toy_bench)])
    assert images[0].shape == (224, 224) and images[0].dtype == np.uint8  # grayscale kept as one channel
    x, y = algo._synthesise(images, range(6), MediCLIPSynthesis(), seed=3, epoch=0)
    assert y.any()  # at least one synthetic anomaly in the batch
    optimizer = torch.optim.Adam(algo.head.parameters(), lr=algo.lr, betas=algo.betas)
    losses = []
    for _ in range(8):
        loss = algo.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses


def run_tiny(bench: Path, results: Path, **params: Any) -> dict[str, Any]:
    """One 4-shot run of the tiny MediCLIP through the harness (random init, seed 0)."""
    params = {"clip_model": TINY_CLIP, "layers": [1, 2, 3], **params}
    return run_record("mediclip", bench, results, params, shots=4)


def test_trains_and_predicts_through_the_runner(toy_bench, tmp_path):
    rec, again = (run_tiny(toy_bench, tmp_path / name, epochs=2) for name in ("a", "b"))
    assert rec["config"]["layers"] == [1, 2, 3] and rec["config"]["pretrained"] is False
    assert rec["sizes"]["input"] == [224, 224] and rec["sizes"]["batch_size"] == 8
    assert rec["data"]["n_train"] == 4 and rec["params"]["trainable"] == 23_232
    assert [h["epoch"] for h in rec["history"]] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in rec["history"])
    assert again["metrics"] == rec["metrics"] and again["history"] == rec["history"]  # same seed, same record
    # synthetic intensity anomalies teach the (random) tiny CLIP the bench's bright discs
    untrained = run_tiny(toy_bench, tmp_path / "untrained", epochs=0)
    pixel, pixel0 = rec["metrics"]["pixel_auroc"], untrained["metrics"]["pixel_auroc"]
    print(f"tiny random CLIP, 4 shots: pixel AUROC {pixel:.3f} after 2 epochs, {pixel0:.3f} untrained; "
          f"image AUROC {rec['metrics']['image_auroc']:.3f} / {untrained['metrics']['image_auroc']:.3f}")
    assert pixel > 0.8 and pixel > pixel0 + 0.1
