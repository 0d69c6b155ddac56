"""MVFA (normal-only variant).

Fast tests use the tiny CLIP (4 vision blocks, width = embed = 64, 7 x 7 patches at 240) with
random weights, so ``layers=(1, 2, 3, 4)`` stands for the full model's (6, 12, 18, 24); the
full-size ViT-L/14@336 architecture is built in a slow test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from algorithms.clip import TINY_CLIP, encode_image, tokenizer_for
from algorithms.clip.losses import dice_loss, focal_loss
from algorithms.mvfa import (
    MVFA,
    RESIDUAL,
    Adapter,
    MVFAAdapters,
    augment_views,
    bench_key,
    prompt_texts,
    text_features,
    use_plain_gelu,
)
from algorithms.mvfa import algorithm as mvfa_algorithm
from algorithms.synthesis.rng import rng_for
from algorithms.synthesis.tasks import MediCLIPSynthesis
from bmad import registry
from bmad.runner import seed_everything
from tests.conftest import make_bench

TINY_LAYERS = (1, 2, 3, 4)
FULL_TRAINABLE = 8 * (1024 * 768 + 768 * 1024)  # 12,582,912


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine, thread hand-offs make the tiny model's ops far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**params: Any) -> MVFA:
    """A built tiny MVFA (seeded, random weights)."""
    seed_everything(0)
    algo = MVFA(**{"clip_model": TINY_CLIP, "pretrained": False, "layers": TINY_LAYERS, **params})
    algo.build()
    return algo


def bench_images(root: Path, split: str = "train", cls: str = "good") -> torch.Tensor:
    """The images of one split/class of a generated bench as [N, 1, H, W] in [0, 1]."""
    files = sorted((root / split / cls / "img").glob("*.png"))
    return torch.tensor(np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files]))[:, None]


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=6, n_valid=(1, 1), n_test=(4, 4), size=32)


# -- configuration --------------------------------------------------------------------------
def test_registered_with_the_defaults():
    assert registry.algorithms.get("mvfa").cls is MVFA and MVFA.pixel_level
    cfg = MVFA(pretrained=False).get_config()
    assert cfg["clip_model"] == "ViT-L-14-336" and cfg["clip_weights"] == "openai" and cfg["image_size"] == 240
    assert cfg["layers"] == (6, 12, 18, 24) and cfg["class_name"] == "auto" and cfg["image_score"] == "auto"
    assert cfg["zero_shot_weight"] == 0.5 and cfg["logit_scale"] == 100.0
    assert cfg["lr"] == 1e-3 and cfg["betas"] == (0.5, 0.999) and cfg["batch_size"] == 16 and cfg["epochs"] == 50
    assert cfg["augment"] is True and cfg["poisson"] is True and cfg["bce_with_logits"] is False
    assert cfg["official_gelu"] is False and cfg["normalize_input"] is True
    assert MVFA(pretrained=False, layers="4, 2,3").layers == (2, 3, 4)  # as --param layers=4,2,3
    with pytest.raises(ValueError, match="image_score"):
        MVFA(pretrained=False, image_score="max")
    with pytest.raises(ValueError, match="out of range"):
        tiny(layers=(0, 4))
    with pytest.raises(ValueError, match="out of range"):
        tiny(layers=(1, 5))


def test_bench_folder_picks_the_prompt_word_and_the_score_head():
    assert bench_key("/data/Retina_OCT2017/test/Ungood/img/x.png") == "retina_oct2017"
    assert bench_key("x.png") is None
    algo = MVFA(pretrained=False)
    for folder, word, head in (("Retina_OCT2017", "retinal OCT", "det"), ("Retina_RESC", "retinal OCT", "seg"),
                               ("BraTS2021", "Brain", "seg"), ("camelyon16", "histopathological image", "det"),
                               ("Toy", "object", "seg")):
        algo._resolve([f"/d/{folder}/train/good/img/a.png"])
        assert (algo.prompt_class, algo.score_head) == (word, head)
    fixed = MVFA(pretrained=False, class_name="Liver", image_score="det")
    fixed._resolve(["/d/Brain/train/good/img/a.png"])
    assert (fixed.prompt_class, fixed.score_head) == ("Liver", "det")


# -- the adapters ---------------------------------------------------------------------------
def test_adapter_shapes_and_full_size_parameter_count():
    hidden, out = Adapter(64, 48)(torch.randn(2, 50, 64))
    assert hidden.shape == (2, 50, 48) and out.shape == (2, 50, 64)
    full = MVFAAdapters(width=1024, embed_dim=768, layers=(6, 12, 18, 24))
    assert sum(p.numel() for p in full.parameters()) == FULL_TRAINABLE == 12_582_912
    assert all(m.bias is None for m in full.modules() if isinstance(m, torch.nn.Linear))
    assert tiny().parameter_counts()["trainable"] == 8 * 2 * 64 * 64


@pytest.mark.slow
def test_full_size_architecture_parameter_counts():
    seed_everything(0)
    algo = MVFA(pretrained=False)  # ViT-L-14-336 at 240, random weights
    algo.build()
    counts = algo.parameter_counts()
    assert counts["trainable"] == FULL_TRAINABLE
    assert algo.clip.visual.grid_size == (17, 17)
    clip_params = sum(p.numel() for p in algo.clip.parameters())
    assert 427e6 < clip_params < 429e6 and counts["total"] == clip_params + FULL_TRAINABLE


def test_residual_mix_on_crafted_tensors():
    adapters = MVFAAdapters(width=4, embed_dim=4, layers=(1,))
    eye = torch.eye(4)
    with torch.no_grad():
        adapters.seg[0].down.weight.copy_(eye)
        adapters.seg[0].up.weight.copy_(2 * eye)  # seg output 2x on positive tokens
        adapters.det[0].down.weight.copy_(eye)
        adapters.det[0].up.weight.copy_(-eye)  # det output LeakyReLU(-x) = -0.01x
    x = torch.rand(3, 5, 4) + 0.1
    mixed, seg_hidden, det_hidden = adapters.mix(0, x)
    assert RESIDUAL == (0.8, 0.1, 0.1)
    assert torch.allclose(mixed, 0.8 * x + 0.1 * 2 * x + 0.1 * (-0.01 * x), atol=1e-6)  # = 0.999 x
    assert torch.allclose(seg_hidden, x) and torch.allclose(det_hidden, x)


def test_adapters_sit_in_the_residual_stream_after_the_chosen_blocks():
    """With the up-projections zeroed, each adapted block's output is scaled by 0.8 before the next block,
    and the hidden features are LeakyReLU(W_down x) of the tokens after that block."""
    algo = tiny(layers=(2, 4))
    with torch.no_grad():
        for adapter in (*algo.adapters.seg, *algo.adapters.det):
            adapter.up.weight.zero_()
    x = torch.rand(2, 1, 240, 240)
    with torch.no_grad():
        feats = algo.features(x)
        scaled = encode_image(algo.clip, algo.prepare(x), before_block=lambda i, t: 0.8 * t if i == 2 else t,
                              keep=(1, 3)).intermediates
        plain = encode_image(algo.clip, algo.prepare(x), keep=(3,)).intermediates
    for j, block in enumerate((1, 3)):  # 0-based indices of blocks 2 and 4
        tokens = scaled[block][:, 1:]
        assert torch.allclose(feats.seg[j], F.leaky_relu(tokens @ algo.adapters.seg[j].down.weight.T), atol=1e-5)
        assert torch.allclose(feats.det[j], F.leaky_relu(tokens @ algo.adapters.det[j].down.weight.T), atol=1e-5)
    assert feats.seg[1].shape == (2, 49, 64)
    assert not torch.allclose(scaled[3], plain[3], atol=1e-4)  # the 0.8 mix after block 2 reached block 4


# -- text, branches, fusion ------------------------------------------------------------------
def test_text_features_are_the_official_prompt_ensemble():
    normal, abnormal = prompt_texts("Brain")
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert normal[0] == "a bad photo of a Brain." and "there is a damaged Brain in the scene." in abnormal
    assert "this is one Brain without defect in the scene." in normal
    algo = tiny()
    tokenizer = tokenizer_for(TINY_CLIP)
    text = text_features(algo.clip, tokenizer, "Brain")
    assert text.shape == (64, 2) and torch.allclose(text.norm(dim=0), torch.ones(2))
    with torch.no_grad():
        ref = F.normalize(F.normalize(algo.clip.encode_text(tokenizer(abnormal)), dim=-1).mean(0), dim=0)
    assert torch.allclose(text[:, 1], ref, atol=1e-6)
    assert not torch.allclose(text_features(algo.clip, tokenizer, "Liver"), text)


def fitted(images: torch.Tensor, **params: Any) -> MVFA:
    """A tiny MVFA fitted on ``images`` without training (epochs 0): the memory bank only."""
    algo = tiny(epochs=0, **params)
    algo.fit([{"image": images, "path": [f"/d/Toy/train/good/img/{i}.png" for i in range(len(images))]}])
    return algo


def test_memory_bank_gives_zero_for_a_training_images_own_patches(toy_bench):
    train = bench_images(toy_bench)[:3]
    algo = fitted(train, augment=False)
    assert [b.shape for b in algo.banks["seg"]] == [(3 * 49, 64)] * 4 and "det" not in algo.banks
    with torch.no_grad():
        own = algo.memory_map(algo.features(train[1:2]).seg, algo.banks["seg"])
        other = algo.memory_map(algo.features(bench_images(toy_bench, "test", "Ungood")[:1]).seg, algo.banks["seg"])
    assert own.shape == (1, 240, 240) and own.abs().max() < 1e-5
    assert other.max() > 1e-3
    augmented = fitted(train)  # the official augmentation: 11 views per image in the bank
    assert [b.shape for b in augmented.banks["seg"]] == [(33 * 49, 64)] * 4
    assert augmented.history[0] == {"epoch": 0, "class_name": "object", "image_score": "seg", "views": 33}


def test_fusion_weights_and_scores(toy_bench):
    train, native = bench_images(toy_bench)[:3], bench_images(toy_bench, "test", "Ungood")[:2]
    test = F.interpolate(native, size=(240, 240), mode="bilinear")
    algo = fitted(train)
    with torch.no_grad():
        feats = algo.features(test)
        zero, memory = algo.zero_shot_map(feats.seg), algo.memory_map(feats.seg, algo.banks["seg"])
    pred = algo.predict_map(test)
    assert zero.shape == memory.shape == (2, 240, 240) and 0 <= zero.min() and zero.max() <= len(TINY_LAYERS)
    assert np.allclose(pred.maps, (0.5 * zero + 0.5 * memory).numpy(), atol=1e-6)
    assert np.allclose(pred.scores, pred.maps.reshape(2, -1).max(1), atol=1e-6)
    assert len(algo._text) == 1  # text features cached
    algo.zero_shot_weight = 1.0
    assert np.allclose(algo.predict_map(test).maps, zero.numpy(), atol=1e-6)
    algo.zero_shot_weight = 0.0
    assert np.allclose(algo.predict_map(test).maps, memory.numpy(), atol=1e-6)
    # maps come back at the input size
    small = algo.predict_map(native)
    assert small.maps.shape == (2, 32, 32) and small.maps.dtype == np.float32


def test_detection_head_score(toy_bench):
    train, test = bench_images(toy_bench)[:3], bench_images(toy_bench, "test", "Ungood")[:2]
    algo = fitted(train, image_score="det")
    assert len(algo.banks["det"]) == 4
    with torch.no_grad():
        feats, text = algo.features(test), algo.text()
        zero = sum(F.softmax(100 * F.normalize(f, dim=-1) @ text, dim=-1)[..., 1].mean(1) for f in feats.det)
        memory = algo.memory_map(feats.det, algo.banks["det"]).flatten(1).mean(1)
    pred = algo.predict_map(test)
    assert np.allclose(pred.scores, (0.5 * zero + 0.5 * memory).numpy(), atol=1e-6)
    seg_maps = fitted(train).predict_map(test).maps
    assert np.allclose(pred.maps, seg_maps, atol=1e-6)  # the map stays the segmentation one


def test_predict_before_fit_fails():
    with pytest.raises(RuntimeError, match="fit first"):
        tiny().predict_map(torch.rand(1, 1, 240, 240))


def test_a_full_training_set_is_refused_when_the_bank_is_too_big(toy_bench, monkeypatch):
    monkeypatch.setattr(mvfa_algorithm, "MAX_BANK_BYTES", 1000)
    with pytest.raises(ValueError, match="--shots"):
        fitted(bench_images(toy_bench)[:2])


# -- official switches -------------------------------------------------------------------------
def test_official_gelu_and_no_input_normalisation():
    x = torch.rand(2, 1, 240, 240)
    algo = tiny()
    assert torch.allclose(algo.prepare(x)[:, 0], (x[:, 0] - 0.48145466) / 0.26862954, atol=1e-6)
    raw = tiny(normalize_input=False)
    assert torch.equal(raw.prepare(x), x.expand(-1, 3, -1, -1))
    gelu = tiny(official_gelu=True)
    acts = [type(m.mlp.gelu) for m in gelu.clip.modules() if hasattr(m, "mlp")]
    assert acts == [torch.nn.GELU] * 6  # 4 vision + 2 text blocks
    assert use_plain_gelu(gelu.clip) == 0  # nothing left to swap
    with torch.no_grad():
        assert not torch.allclose(gelu.features(x).seg[0], algo.features(x).seg[0], atol=1e-4)


def test_augmentation_views():
    x = torch.rand(2, 1, 24, 24)
    views = augment_views(x)
    assert views.shape == (22, 1, 24, 24)
    assert torch.equal(views[:2], x) and torch.equal(views[18:20], x.flip(-1)) and torch.equal(views[20:], x.flip(-2))
    flat = augment_views(torch.full((1, 3, 16, 16), 0.3))
    assert torch.allclose(flat, torch.full_like(flat, 0.3), atol=1e-6)  # reflected borders: no black corners
    assert not torch.allclose(views[2:4], x, atol=1e-2)  # rotated


# -- training ---------------------------------------------------------------------------------
def test_loss_is_focal_dice_per_block_plus_bce_on_the_mean_patch_probability():
    algo = tiny()
    x = torch.rand(2, 1, 240, 240)
    y = torch.zeros(2, 240, 240)
    y[0, 40:120, 60:150] = 1  # image 0 anomalous, image 1 normal
    with torch.no_grad():
        total, seg, det = algo.loss(x, y)
        feats, text = algo.features(x), algo.text()
        probs = [F.interpolate((100 * F.normalize(f, dim=-1) @ text).transpose(1, 2).reshape(2, 2, 7, 7), size=240,
                               mode="bilinear", align_corners=True).softmax(1) for f in feats.seg]
        ref_seg = sum(focal_loss(p, y) + dice_loss(p[:, 1], y) for p in probs)
        means = [F.softmax(100 * F.normalize(f, dim=-1) @ text, dim=-1)[..., 1].mean(1) for f in feats.det]
        labels = torch.tensor([1.0, 0.0])
        ref_det = sum(F.binary_cross_entropy(m, labels) for m in means)
        logits_det = sum(F.binary_cross_entropy_with_logits(m, labels) for m in means)
        algo.bce_with_logits = True
        official = algo.loss(x, y)[2]
    assert torch.allclose(seg, ref_seg, rtol=1e-5) and torch.allclose(det, ref_det, rtol=1e-5)
    assert torch.allclose(total, seg + det) and torch.allclose(official, logits_det, rtol=1e-5)
    assert not math.isclose(official.item(), det.item(), rel_tol=1e-3)


def test_synthesis_draws_from_seed_epoch_index_with_the_other_images_as_support(toy_bench):
    algo = tiny()
    images, _ = algo._collect([bench_images(toy_bench)[:3]])
    assert images.shape == (3, 1, 240, 240)  # grayscale kept as one channel, at image_size
    floats, origin = algo._views(images)
    views = algo._uint8(floats)
    assert len(views) == 33 and origin[:6] == [0, 1, 2, 0, 1, 2]
    assert views[0].dtype == np.uint8 and views[0].shape == (240, 240)
    synthesis = MediCLIPSynthesis(probabilities={"cut_paste": 1.0})
    x, y = algo._synthesise(views, origin, [4, 30], synthesis, seed=7, epoch=3)
    for row, i in enumerate((4, 30)):
        support = [v for j, v in enumerate(views) if origin[j] != origin[i]]
        assert len(support) == 22
        image, mask = synthesis(views[i], support, rng_for(7, 3, i))
        assert torch.equal(x[row, 0], torch.from_numpy(image).float() / 255) and torch.equal(y[row], torch.from_numpy(mask))
        assert mask.any()


def test_a_few_steps_lower_the_loss(toy_bench):
    algo = tiny()
    images, _ = algo._collect([bench_images(toy_bench)])
    floats, origin = algo._views(images)
    views = algo._uint8(floats)
    x, y = algo._synthesise(views, origin, range(0, 66, 8), MediCLIPSynthesis(), seed=3, epoch=0)
    assert y.any()
    optimizer = torch.optim.Adam(algo.adapters.parameters(), lr=algo.lr, betas=algo.betas)
    losses = []
    for _ in range(8):
        loss = algo.loss(x, y)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def run_tiny(bench: Path, **params: Any) -> dict[str, Any]:
    """One 4-shot run of the tiny MVFA in-process through the runner's ``_execute`` (random init, seed 0)."""
    from bmad.benches import resolve_bench
    from bmad.runner import RunSpec, SweepOptions, _execute, build_algorithm

    opts = SweepOptions(random_init=True, progress=False, verbose=False,
                        params={"clip_model": TINY_CLIP, "layers": "1,2,3,4", **params})
    algo = build_algorithm("mvfa", opts)
    result, _ = _execute(algo, resolve_bench(f"folder:{bench}"), RunSpec(f"folder:{bench}", "mvfa", 0, shots=4), opts)
    return {"config": algo.get_config(), **result}


def test_trains_and_predicts_through_the_runner(toy_bench):
    rec, again = run_tiny(toy_bench, epochs=2), run_tiny(toy_bench, epochs=2)
    assert rec["config"]["layers"] == (1, 2, 3, 4) and rec["config"]["pretrained"] is False
    assert rec["sizes"]["input"] == [240, 240] and rec["sizes"]["batch_size"] == 16
    assert rec["data"]["n_train"] == 4 and rec["params"]["trainable"] == 65_536
    assert [h["epoch"] for h in rec["history"]] == [0, 1, 2] and rec["history"][0]["views"] == 44
    assert all(np.isfinite(h["train_loss"]) for h in rec["history"][1:])
    assert again["metrics"] == rec["metrics"] and again["history"] == rec["history"]  # same seed, same record
    untrained = run_tiny(toy_bench, epochs=0)
    pixel, pixel0 = rec["metrics"]["pixel_auroc"], untrained["metrics"]["pixel_auroc"]
    print(f"tiny random CLIP, 4 shots: pixel AUROC {pixel:.3f} after 2 epochs, {pixel0:.3f} untrained; "
          f"image AUROC {rec['metrics']['image_auroc']:.3f} / {untrained['metrics']['image_auroc']:.3f}")
    assert pixel > 0.85 and pixel > pixel0 + 0.1
