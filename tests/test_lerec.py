"""lerec, the BMAD thesis method: the Laplacian enhancement, the prompts and adapter, training,
and runs through the harness (tiny CLIP, random weights; the full-size count is slow)."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from algorithms.clip import TINY_CLIP, encode_text_embeddings, prompt_ids, tokenizer_for, with_context
from algorithms.lerec import Lerec, laplacian_enhance, low_frequency
from bmad import registry
from tests.conftest import make_bench, run_record, same_record

TINY = dict(clip_model=TINY_CLIP, image_size=224, layers=(1, 2, 3, 4), pretrained=False)
W5 = np.array([1, 4, 6, 4, 1]) / 16


# -- the Laplacian-pyramid enhancement ---------------------------------------------------------
def _reflect(i: int, n: int) -> int:
    i = -i if i < 0 else i
    return 2 * (n - 1) - i if i > n - 1 else i


def _blur_loops(a: np.ndarray, gain: float) -> np.ndarray:
    h, w = a.shape
    out = np.zeros_like(a)
    for i in range(h):
        for j in range(w):
            out[i, j] = gain * sum(W5[u] * W5[v] * a[_reflect(i + u - 2, h), _reflect(j + v - 2, w)]
                                   for u in range(5) for v in range(5))
    return out


def _structure_loops(a: np.ndarray, levels: int) -> np.ndarray:
    """S_K by the definition, with loops: blur + keep even samples K times; zeros in between + 4x blur back."""
    sizes = []
    for _ in range(levels):
        sizes.append(a.shape)
        a = _blur_loops(a, 1.0)[::2, ::2]
    for h, w in reversed(sizes):
        z = np.zeros((2 * a.shape[0], 2 * a.shape[1]))
        z[::2, ::2] = a
        a = _blur_loops(z, 4.0)[:h, :w]
    return a


@pytest.mark.parametrize("shape", [(12, 12), (13, 10)])
def test_enhancement_is_image_plus_structure_halved(shape):
    a = np.random.default_rng(0).random(shape)
    x = torch.tensor(a)[None, None]
    for levels in (1, 2):
        structure = _structure_loops(a, levels)
        np.testing.assert_allclose(low_frequency(x, levels)[0, 0].numpy(), structure, atol=1e-12)
        np.testing.assert_allclose(laplacian_enhance(x, levels)[0, 0].numpy(), (a + structure) / 2, atol=1e-12)
    # the same pyramid steps as OpenCV's pyrDown / pyrUp (Burt & Adelson), odd sizes included
    down = cv2.pyrDown(a)
    expected = cv2.pyrUp(down, dstsize=(shape[1], shape[0]))
    np.testing.assert_allclose(low_frequency(x, 1)[0, 0].numpy(), expected, atol=1e-12)
    # by hand: a constant image is its own structure, so the enhancement leaves it unchanged
    flat = torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)
    torch.testing.assert_close(laplacian_enhance(flat, 2), flat)
    assert torch.equal(laplacian_enhance(x, 0), x)
    with pytest.raises(ValueError, match="pyramid levels"):
        low_frequency(torch.zeros(1, 1, 8, 8), 3)


def test_enhancement_smooths_high_frequencies():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    checker = ((yy + xx) % 2).view(1, 1, 64, 64) * 0.5 + 0.25  # the highest frequency there is
    out = laplacian_enhance(checker, 2)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - out.mean()).abs().max() < 0.51 * (checker - checker.mean()).abs().max()


# -- the model ----------------------------------------------------------------------------------
def tiny(**params) -> Lerec:
    torch.manual_seed(0)
    algo = Lerec(**{**TINY, **params})
    algo.build()
    return algo


def test_defaults_and_registration():
    algo = registry.create("lerec", pretrained=False)
    cfg = algo.get_config()
    assert cfg["clip_model"] == "ViT-B-16-plus-240" and cfg["clip_weights"] == "laion400m_e31"
    assert cfg["image_size"] == 256 and algo.input_size == (256, 256)
    assert cfg["n_ctx"] == 16 and cfg["layers"] == (3, 6, 9, 12) and cfg["adapter_on"] == "text"
    assert cfg["adapter_reduction"] == 16 and cfg["lr"] == 1e-3 and cfg["epochs"] == 400
    assert cfg["pyramid_levels"] == 2 and cfg["enhance_at_test"] is True and cfg["text_layers"] is None
    assert algo.clip is None  # nothing built at construction
    with pytest.raises(ValueError, match="adapter_on"):
        Lerec(adapter_on="both", pretrained=False)
    with pytest.raises(ValueError, match="1-based blocks"):
        tiny(layers=(3, 6, 9, 12))  # the tiny vision tower has 4 blocks


def test_tiny_counts_and_shapes():
    algo = tiny()
    head = algo.head
    assert algo.grid == (7, 7) and head.ctx.shape == (49, 16, 64)
    assert head.token_ids.shape == (1, 18)  # [sot] X*16 [eot], cut after end-of-text
    adapter = 64 * 4 + 4 + 4 * 64 + 64
    assert algo.parameter_counts()["trainable"] == 49 * 16 * 64 + adapter == 50_756
    assert algo.parameter_counts()["total"] == 50_756 + sum(p.numel() for p in algo.clip.parameters())
    assert not any(p.requires_grad for p in algo.clip.parameters())


@pytest.mark.slow
def test_full_size_counts():
    t0 = time.perf_counter()
    algo = Lerec(pretrained=False)
    algo.build()
    assert algo.grid == (16, 16)
    prompts = 256 * 16 * 640
    adapter = 640 * 40 + 40 + 40 * 640 + 640
    counts = algo.parameter_counts()
    assert (prompts, adapter) == (2_621_440, 51_880)
    assert counts["trainable"] == prompts + adapter == 2_673_320
    assert counts["total"] - counts["trainable"] == 208_405_121  # ViT-B-16+ with the 257-row position table
    print(f"full-size lerec: {counts}, built in {time.perf_counter() - t0:.1f} s")


def test_cut_prompt_equals_the_full_context():
    algo = tiny()
    head, clip = algo.head, algo.clip
    ids, starts = prompt_ids(tokenizer_for(TINY_CLIP), [""], 16, [""])
    assert ids.shape[1] == 77
    n = head.ctx.shape[0]
    emb = with_context(clip.token_embedding(ids).expand(n, -1, -1), head.ctx, starts.expand(n))
    with torch.no_grad():
        full = encode_text_embeddings(clip, emb, ids.expand(n, -1))
        cut = head.text_features(clip)[0]
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def test_text_mode_conditions_prompts_on_the_image_and_image_mode_caches():
    x = torch.rand(2, 1, 224, 224)
    algo = tiny()
    with torch.no_grad():
        _, last = algo.head.image_features(algo.clip, algo.inputs(x, train=False))
        text = algo.head.text_features(algo.clip, algo.head.adapter(last))[0]
    assert text.shape == (2, 49, 64) and not torch.allclose(text[0], text[1])

    algo = tiny(adapter_on="image")
    pred = algo.predict_map(x)
    assert len(algo.text_cache) == 1 and pred.maps.shape == (2, 224, 224)
    np.testing.assert_allclose(algo.predict_map(x).maps, pred.maps, atol=1e-6)  # cached text, same maps
    algo.epochs = 1
    algo.fit([{"image": x}])  # new prompts: the cache is emptied
    assert len(algo.text_cache) == 0 and len(algo.history) == 1


@pytest.mark.parametrize("params", [{}, {"adapter_on": "image"}, {"layers": (2, 4), "text_layers": (1, 2)}],
                         ids=["text", "image", "per-layer-text"])
def test_loss_decreases(params):
    algo = tiny(**params, lr=1e-2)
    x = torch.rand(4, 1, 224, 224)
    optimizer = algo.make_optimizer()
    losses = [algo.training_step(x, optimizer) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert 0 < losses[0] <= 2 * len(algo.layers)  # a sum over layers of mean cosine distances


def test_map_is_the_sum_of_upsampled_layer_distances():
    algo = tiny(layers=(2, 4))
    x = torch.rand(3, 1, 224, 224)
    with torch.no_grad():
        distances = algo.head.distances(algo.clip, algo.inputs(x, train=False))
    pred = algo.predict_map(x)
    grids = [d.reshape(3, 1, 7, 7) for d in distances]
    expected = sum(torch.nn.functional.interpolate(g, size=(224, 224), mode="bilinear") for g in grids)[:, 0]
    np.testing.assert_allclose(pred.maps, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.scores, expected.flatten(1).amax(1).numpy(), atol=1e-5)
    small = algo.predict_map(torch.nn.functional.interpolate(x, size=(112, 112)))  # maps come at the input size
    assert small.maps.shape == (3, 112, 112)


# -- through the harness --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Brain", n_train=8, n_valid=(1, 1), n_test=(4, 4), size=64)


def run_lerec(bench: Path, results: Path, seed: int = 0) -> dict:
    params = dict(clip_model=TINY_CLIP, epochs=2, image_size=224, layers=[1, 2, 3, 4])
    return run_record("lerec", bench, results, params, seed=seed)


def test_trains_and_predicts_through_the_runner_and_repeats(toy_bench, tmp_path):
    first = run_lerec(toy_bench, tmp_path / "a")
    assert first["config"]["pretrained"] is False and first["sizes"]["input"] == [224, 224]
    assert first["sizes"]["batch_size"] == 8
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in first["history"])
    assert first["params"]["trainable"] == 50_756
    m = first["metrics"]
    assert m["pixel_auroc"] is not None and 0 <= m["pixel_auroc"] <= 1
    print(f"lerec tiny random-init, 2 epochs: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}")
    again = run_lerec(toy_bench, tmp_path / "b")
    same_record(first, again)
