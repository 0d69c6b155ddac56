"""CLAP: M2IB saliency (tiny CLIP, sequence-first; a timm ViT tower, batch-first), the
contrastive mask, mosaic obfuscation, MSGMS, the U-Net, training and the runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.clap import Clap
from algorithms.clap.prompts import PROMPTS, prompts_for
from algorithms.clap.saliency import (
    InformationBottleneck,
    capacity,
    clap_attention,
    clap_mask,
    m2ib_saliency,
    vision_blocks,
)
from algorithms.clap.torch_model import UNet, mean_filter, mosaic, msgms_loss, msgms_map, obfuscate
from algorithms.clip import TINY_CLIP, batch_first, build_clip, freeze, tokenizer_for
from bmad import registry
from bmad.errors import WeightsError
from tests.conftest import make_bench, run_record, same_record

TINY = dict(clip_model=TINY_CLIP, pretrained=False, m2ib_layer=2, unet_widths=(8, 16), unet_size=32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = freeze(build_clip(TINY_CLIP, None))
    text = model.encode_text(tokenizer_for(TINY_CLIP)(["Glioma, Astrocytoma", "Normal, Healthy"])).detach()
    return model, text


@pytest.fixture(scope="module")
def timm_clip(tmp_path_factory):
    """A CLIP whose vision tower is a timm ViT inside open_clip's TimmModel (as BiomedCLIP's)."""
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                          "timm_pool": "", "timm_proj": "linear", "image_size": 224},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("cfg") / "bmad-test-timm-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = freeze(open_clip.create_model("bmad-test-timm-clip"))
    text = model.encode_text(open_clip.get_tokenizer("bmad-test-timm-clip")(["lesion", "normal"])).detach()
    return model, text


def _images(n: int, side: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# -- M2IB -------------------------------------------------------------------------------
def _check_hook_formula(model: torch.nn.Module, layer: int) -> None:
    """The output of block ``layer`` becomes lambda*x + (1-lambda)*eps, copied per (prompt, copy)."""
    blocks, bf = vision_blocks(model)
    seen: dict[str, torch.Tensor] = {}

    def record_out(module, inputs, output):
        seen["x"] = (output if bf else output.transpose(0, 1)).detach().clone()

    def record_next(module, inputs):
        seen["z"] = (inputs[0] if bf else inputs[0].transpose(0, 1)).detach().clone()

    images, units, copies, init = _images(2), 3, 4, 1.5
    h1 = blocks[layer].register_forward_hook(record_out)
    h2 = blocks[layer + 1].register_forward_pre_hook(record_next)
    try:
        with InformationBottleneck(blocks[layer], batch_first=bf, units=units, copies=copies, alpha_init=init,
                                   generator=torch.Generator().manual_seed(7)) as ib:
            emb = model.encode_image(images)
    finally:
        h1.remove()
        h2.remove()
    x, z = seen["x"], seen["z"]
    assert emb.shape[0] == 2 * units * copies
    assert ib.alpha.shape == (2 * units, *x.shape[1:]) and torch.all(ib.alpha == init)
    lam = torch.sigmoid(torch.tensor(init))
    x_rep = x.repeat_interleave(units * copies, dim=0)  # image-major, then unit, then copy
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, lam * x_rep + (1 - lam) * eps, rtol=1e-5, atol=1e-5)
    assert not blocks[layer]._forward_hooks  # the hook is gone after the context


def test_bottleneck_hook_on_a_sequence_first_open_clip_tower(tiny):
    model, _ = tiny
    blocks, bf = vision_blocks(model)
    assert blocks[0] is model.visual.transformer.resblocks[0]
    assert bf == batch_first(model.visual.transformer)
    _check_hook_formula(model, layer=1)


def test_bottleneck_hook_on_a_batch_first_timm_tower(timm_clip):
    model, text = timm_clip
    blocks, bf = vision_blocks(model)
    assert bf and blocks[-1] is model.visual.trunk.blocks[-1]
    _check_hook_formula(model, layer=10)
    sal = m2ib_saliency(model, _images(1), text, layer=10, steps=2, copies=2, out_size=(20, 20),
                        generator=torch.Generator().manual_seed(0))
    assert sal.shape == (1, 2, 20, 20)
    assert torch.allclose(sal.flatten(2).amin(-1), torch.zeros(1, 2)) and torch.allclose(
        sal.flatten(2).amax(-1), torch.ones(1, 2))


def test_capacity_is_the_kl_to_a_standard_normal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 2
    alpha = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 3
    lam = 1 / (1 + np.exp(-alpha.numpy()))
    mu, sd = lam * x.numpy(), 1 - lam
    # KL(N(mu, sd^2) || N(0, 1)) = -log(sd) + (sd^2 + mu^2) / 2 - 1/2
    hand = -np.log(sd) + (sd**2 + mu**2) / 2 - 0.5
    np.testing.assert_allclose(capacity(x, alpha).numpy(), hand, rtol=1e-10, atol=1e-12)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(torch.from_numpy(mu), torch.from_numpy(sd)),
                                            torch.distributions.Normal(0.0, 1.0))
    np.testing.assert_allclose(capacity(x, alpha).numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_saliency_shape_range_and_seeded_determinism(tiny):
    model, text = tiny
    images = _images(2)
    kw = dict(layer=2, steps=3, copies=3, out_size=(40, 30))
    a = m2ib_saliency(model, images, text, generator=torch.Generator().manual_seed(1), **kw)
    b = m2ib_saliency(model, images, text, generator=torch.Generator().manual_seed(1), **kw)
    c = m2ib_saliency(model, images, text, generator=torch.Generator().manual_seed(2), **kw)
    assert a.shape == (2, 2, 40, 30)
    assert torch.allclose(a.flatten(2).amin(-1), torch.zeros(2, 2))
    assert torch.allclose(a.flatten(2).amax(-1), torch.ones(2, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():  # the runner predicts under no_grad: M2IB turns gradients back on
        d = m2ib_saliency(model, images, text, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, d)


def test_alpha_is_not_carried_from_one_image_to_the_next(tiny):
    model, text = tiny
    kw = dict(layer=2, steps=3, copies=2)
    first, second = _images(1, seed=3), _images(1, seed=4)
    m2ib_saliency(model, first, text, generator=torch.Generator().manual_seed(0), **kw)
    after = m2ib_saliency(model, second, text, generator=torch.Generator().manual_seed(5), **kw)
    fresh = m2ib_saliency(model, second, text, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(after, fresh)
    assert all(not b._forward_hooks for b in vision_blocks(model)[0])


def test_optimisation_moves_alpha_with_lr_one(tiny):
    """One Adam step at lr 1 moves every alpha by ~1 (Adam's first step is lr * sign(grad))."""
    model, text = tiny
    blocks, bf = vision_blocks(model)
    with InformationBottleneck(blocks[2], batch_first=bf, units=2, copies=2,
                               generator=torch.Generator().manual_seed(0)) as ib:
        emb = torch.nn.functional.normalize(model.encode_image(_images(1)), dim=-1).view(1, 2, 2, -1)
        fit = (emb * torch.nn.functional.normalize(text, dim=-1).view(1, 2, 1, -1)).sum(-1).mean(-1)
        loss = (0.1 * ib.capacity.flatten(1).mean(-1) - fit.view(-1)).sum()
        opt = torch.optim.Adam([ib.alpha], lr=1.0)
        loss.backward()
        opt.step()
    moved = (ib.alpha.detach() - 5.0).abs()
    assert float(moved.max()) <= 1 + 1e-4 and float(moved.median()) == pytest.approx(1.0, abs=1e-3)


def test_layer_out_of_range_is_a_clear_error(tiny):
    model, text = tiny
    with pytest.raises(ValueError, match="outside the vision tower's 4 blocks"):
        m2ib_saliency(model, _images(1), text, layer=7)


# -- CLAP mask, mosaic ---------------------------------------------------------------------
def test_mask_is_above_mean_plus_0674_std():
    attn = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = attn.numpy()
    expected = a > a.mean(axis=(1, 2), keepdims=True) + 0.674 * a.std(axis=(1, 2), keepdims=True)
    assert np.array_equal(clap_mask(attn).numpy(), expected)
    small = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # mean .25, std .433: threshold .542
    assert clap_mask(small).tolist() == [[[False, False], [False, True]]]
    sal = torch.stack([torch.full((1, 2, 2), 0.9), small], dim=1)  # A = A_pos - A_neg
    torch.testing.assert_close(clap_attention(sal), 0.9 - small)


def test_mosaic_is_block_averages():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6)
    m = mosaic(x, 2)
    for c in range(2):
        for i in range(0, 5, 2):
            for j in range(0, 6, 2):
                block = x[0, c, i : i + 2, j : j + 2]  # the bottom row of blocks is 1 pixel high
                assert torch.all(m[0, c, i : i + 2, j : j + 2] == block.mean())
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    mask[0, 1:3, 2:5] = True
    out = obfuscate(x, mask, 2)
    assert torch.equal(out[:, :, ~mask[0]], x[:, :, ~mask[0]])
    assert torch.equal(out[:, :, mask[0]], m[:, :, mask[0]])


# -- MSGMS, U-Net -------------------------------------------------------------------------
def _gms_by_hand(x: np.ndarray, y: np.ndarray, c: float = 0.0026) -> np.ndarray:
    def grad(img: np.ndarray) -> np.ndarray:
        p = np.pad(img, 1, mode="edge")
        h, w = img.shape
        out = np.zeros_like(img)
        for i in range(h):
            for j in range(w):
                win = p[i : i + 3, j : j + 3]
                gx = (win[:, 2].sum() - win[:, 0].sum()) / 3
                gy = (win[2, :].sum() - win[0, :].sum()) / 3
                out[i, j] = np.hypot(gx, gy)
        return out

    gx, gy = grad(x), grad(y)
    return (2 * gx * gy + c) / (gx**2 + gy**2 + c)


def test_msgms_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64)
    y = torch.rand(1, 2, 6, 7, generator=g, dtype=torch.float64)
    hand = np.mean([1 - _gms_by_hand(x[0, k].numpy(), y[0, k].numpy()) for k in range(2)], axis=0)
    np.testing.assert_allclose(msgms_map(x, y, scales=(1,))[0].numpy(), hand, rtol=1e-6, atol=1e-9)
    both = msgms_map(x, y, scales=(1, 2))
    torch.testing.assert_close(both, (msgms_map(x, y, scales=(1,)) + msgms_map(x, y, scales=(2,))) / 2)
    assert float(msgms_loss(x, y, scales=(1,))) == pytest.approx(float(np.mean(hand)), rel=1e-6)


def test_msgms_is_zero_for_identical_images():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(msgms_map(x, x), torch.zeros(2, 32, 32), atol=1e-6)
    assert float(msgms_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(msgms_map(x, x.flip(-1)).mean()) > 0.1


def test_mean_filter_is_a_box_filter():
    maps = torch.zeros(1, 9, 9)
    maps[0, 4, 4] = 9.0
    out = mean_filter(maps, 3)
    assert out.shape == maps.shape
    assert torch.allclose(out[0, 3:6, 3:6], torch.ones(3, 3)) and float(out.sum()) == pytest.approx(9.0)


def test_unet_parameter_count_at_default_widths():
    def conv(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout  # 3x3 conv without bias + BatchNorm

    w = [64, 128, 256, 512]
    expected, cin = 0, 3
    for c in w:
        expected += conv(cin, c) + conv(c, c)
        cin = c
    for c in reversed(w[:-1]):
        expected += conv(cin, c) + conv(2 * c, c) + conv(c, c)
        cin = c
    expected += 64 * 3 + 3  # 1x1 head
    net = UNet()
    assert sum(p.numel() for p in net.parameters()) == expected == 8_560_899
    with torch.no_grad():
        out = net.eval()(torch.rand(1, 3, 40, 24))  # any size: the decoder upsamples to each skip's size
    assert out.shape == (1, 3, 40, 24) and 0 <= float(out.min()) and float(out.max()) <= 1


# -- the algorithm --------------------------------------------------------------------------
def test_prompts_per_anatomy():
    assert prompts_for("brain").positive == "Glioma, Astrocytoma, Oligodendroglioma"
    assert prompts_for("RSNA") == PROMPTS["chest"] and prompts_for("camelyon16") == PROMPTS["histopathology"]
    assert prompts_for("resc") == prompts_for("oct2017") == PROMPTS["retina"]
    with pytest.raises(ValueError, match="unknown CLAP anatomy"):
        Clap(anatomy="knee", **TINY)
    algo = Clap(anatomy="liver", negative_prompt="Healthy liver", **TINY)
    assert algo.prompts() == ("Malignant cells, Dysplasia, Hyperplasia", "Healthy liver")


def test_defaults_and_config_round_trip():
    algo = registry.create("clap")
    cfg = algo.get_config()
    assert cfg["clip_model"] == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert {k: cfg[k] for k in ("m2ib_layer", "m2ib_beta", "m2ib_steps", "m2ib_lr", "m2ib_copies",
                                "m2ib_alpha_init", "q3_factor", "mosaic_block", "unet_widths", "lr",
                                "batch_size", "epochs", "samples_per_epoch", "msgms_scales", "gms_c",
                                "smooth_kernel", "obfuscate_at_test", "image_size", "unet_size")} == dict(
        m2ib_layer=7, m2ib_beta=0.1, m2ib_steps=10, m2ib_lr=1.0, m2ib_copies=10, m2ib_alpha_init=5.0,
        q3_factor=0.674, mosaic_block=8, unet_widths=(64, 128, 256, 512), lr=1e-4, batch_size=16, epochs=20,
        samples_per_epoch=3000, msgms_scales=(1, 2, 4), gms_c=0.0026, smooth_kernel=21, obfuscate_at_test=True,
        image_size=224, unet_size=256)
    assert algo.input_size == (256, 256) and Clap.pixel_level
    assert registry.create("clap", **cfg).get_config() == cfg


def test_biomedclip_without_cache_fails_with_the_offline_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="cannot build hf-hub:microsoft/BiomedCLIP.* offline"):
        Clap().build()
    with pytest.raises(WeightsError, match="--random-init"):
        Clap(pretrained=False).build()
    with pytest.raises(ValueError, match="give an open_clip tag"):
        Clap(clip_model=TINY_CLIP)


def _batches(n: int, side: int, bs: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    base = 0.4 + 0.2 * torch.sin(xx / side * np.pi)
    imgs = (base + 0.03 * torch.randn(n, 1, side, side, generator=g)).clamp(0, 1).expand(-1, 3, -1, -1)
    return [{"image": imgs[i : i + bs], "path": [f"img{j}" for j in range(i, min(i + bs, n))]}
            for i in range(0, n, bs)]


def test_fit_lowers_the_loss_and_computes_each_mask_once(monkeypatch):
    torch.manual_seed(0)
    algo = Clap(epochs=6, lr=1e-3, m2ib_steps=2, m2ib_copies=2, samples_per_epoch=None, **TINY)
    algo.to("cpu")
    calls = []
    original = Clap.masks
    monkeypatch.setattr(Clap, "masks", lambda self, x, g=None: calls.append(len(x)) or original(self, x, g))
    train = _batches(8, 32, 4)
    algo.fit(train)
    assert calls == [4, 4] and len(algo._masks) == 8  # once per image, at fit start
    losses = [h["train_loss"] for h in algo.history]
    assert [h["epoch"] for h in algo.history] == list(range(1, 7)) and losses[-1] < losses[0]
    assert [k for k, v in vars(algo).items() if isinstance(v, torch.Tensor)] == ["_text"]  # no alpha kept
    counts = algo.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for p in algo.unet.parameters()) < counts["total"]
    pred = algo.predict_map(train[0]["image"][:, :1])  # grayscale input is replicated
    assert pred.maps.shape == (4, 32, 32) and np.all(np.isfinite(pred.scores))
    np.testing.assert_allclose(pred.scores, pred.maps.reshape(4, -1).max(1), rtol=1e-6)


def test_samples_per_epoch_caps_each_epoch():
    torch.manual_seed(0)
    algo = Clap(epochs=2, m2ib_steps=1, m2ib_copies=1, samples_per_epoch=3, **TINY)
    algo.to("cpu")
    algo.fit(_batches(6, 32, 2))
    assert [h["samples"] for h in algo.history] == [3, 3]


def test_without_obfuscation_at_test_the_image_itself_is_reconstructed(monkeypatch):
    torch.manual_seed(0)
    algo = Clap(epochs=1, m2ib_steps=1, m2ib_copies=1, obfuscate_at_test=False, **TINY)
    algo.to("cpu")
    algo.fit(_batches(2, 32, 2))
    monkeypatch.setattr(Clap, "masks", lambda *a, **k: pytest.fail("no masks at test without obfuscation"))
    assert algo.predict_map(_batches(2, 32, 2)[0]["image"]).maps.shape == (2, 32, 32)


# -- through the runner --------------------------------------------------------------------
E2E = dict(clip_model=TINY_CLIP, m2ib_layer=2, m2ib_steps=3, m2ib_copies=3, epochs=2, unet_widths=[8, 16],
           unet_size=32, batch_size=4, anatomy="brain")


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=4, n_valid=(1, 1), n_test=(3, 3), size=32)


def _run(bench: Path, results: Path, params: dict) -> dict:
    return run_record("clap", bench, results, params)


def test_trains_and_predicts_through_the_runner_same_seed_same_record(toy_bench, tmp_path):
    first = _run(toy_bench, tmp_path / "a", E2E)
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    assert first["sizes"]["input"] == [32, 32] and first["sizes"]["batch_size"] == 4
    assert first["params"]["trainable"] == sum(p.numel() for p in UNet(3, (8, 16)).parameters())
    assert first["metrics"]["pixel_auroc"] is not None and first["config"]["anatomy"] == "brain"
    again = _run(toy_bench, tmp_path / "b", E2E)
    same_record(first, again)


@pytest.mark.slow
def test_pixel_auroc_on_bright_discs(tmp_path):
    bench = make_bench(tmp_path / "Discs", n_train=16, n_valid=(1, 1), n_test=(6, 6), size=64)
    params = dict(E2E, epochs=20, unet_size=64, unet_widths=[16, 32, 64], lr=1e-3, smooth_kernel=5)
    record = _run(bench, tmp_path / "r", params)
    m = record["metrics"]
    print(f"clap on bright discs: pixel AUROC {m['pixel_auroc']:.3f}, image AUROC {m['image_auroc']:.3f}")
    assert m["pixel_auroc"] > 0.6
