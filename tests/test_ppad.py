"""PPAD on the tiny CLIP (random weights): views, prompt injection, text prompts, score rule,
training, determinism, the runner, parameter counts at full size, and CheXzero weights.

Everything runs offline: the tiny CLIP (``bmad-tiny-clip``: ViT 4 x 64, patch 32 at 224,
text 2 x 64) with random weights, except the parameter count, which builds a random
ViT-B-32 (about 3 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.clip import TINY_CLIP, build_clip, tokenizer_for
from algorithms.ppad import CHEXZERO_FILE, PPAD, VIEW_NAMES, PositionPrompts, combine_views, get_view
from bmad import registry
from bmad.errors import WeightsError
from tests.conftest import make_bench, run_record

SIZE, PATCH = 224, 32


def tiny_ppad(**kw) -> PPAD:
    torch.manual_seed(0)
    algo = PPAD(clip_model=TINY_CLIP, pretrained=False, **kw)
    algo.build()
    return algo


@pytest.fixture(scope="module")
def ppad() -> PPAD:
    return tiny_ppad()


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth grayscale [0, 1] images at 224 with a little noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, SIZE).view(1, 1, 1, SIZE)
    return (ramp + 0.05 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1)


# -- views ------------------------------------------------------------------------------
def expected_keep(rows: tuple[int, int], cols: tuple[int, int], size: int, patch: int) -> set[tuple[int, int]]:
    """The rule, written out: patch (r, c) is kept iff its pixel span meets the region's span."""
    grid = size // patch

    def meets(i: int, lo: int, hi: int) -> bool:
        return i * patch <= hi and (i + 1) * patch - 1 >= lo

    return {(r, c) for r in range(grid) for c in range(grid) if meets(r, *rows) and meets(c, *cols)}


REGIONS = {  # inclusive pixel ranges (rows, cols) at 224, as documented
    "": ((0, 223), (0, 223)),
    "left lung": ((0, 223), (0, 111)),
    "right lung": ((0, 223), (112, 223)),
    "upper lung": ((0, 119), (0, 223)),
    "lower lung": ((120, 223), (0, 223)),
}


def kept(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask))}


@pytest.mark.parametrize("words", VIEW_NAMES)
def test_view_regions_and_kept_patches_follow_the_documented_rule(words):
    view = get_view(words)
    (r0, r1), (c0, c1) = REGIONS[words]
    region = view.region(SIZE)
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (r0, r1, c0, c1)
    assert region.sum() == (r1 - r0 + 1) * (c1 - c0 + 1)
    assert kept(view.patch_keep(SIZE, PATCH)) == expected_keep((r0, r1), (c0, c1), SIZE, PATCH)
    assert kept(view.patch_keep(SIZE, 16)) == expected_keep((r0, r1), (c0, c1), SIZE, 16)


def test_halves_share_the_boundary_patch_at_patch_32_and_not_at_patch_16():
    def columns(words, patch):
        return sorted({c for _, c in kept(get_view(words).patch_keep(SIZE, patch))})

    def rows(words, patch):
        return sorted({r for r, _ in kept(get_view(words).patch_keep(SIZE, patch))})

    assert columns("left lung", 32) == [0, 1, 2, 3] and columns("right lung", 32) == [3, 4, 5, 6]
    assert rows("upper lung", 32) == [0, 1, 2, 3] and rows("lower lung", 32) == [3, 4, 5, 6]
    assert columns("left lung", 16) == list(range(7)) and columns("right lung", 16) == list(range(7, 14))
    assert rows("upper lung", 16) == list(range(8)) and rows("lower lung", 16) == list(range(7, 14))
    assert len(kept(get_view("").patch_keep(SIZE, 32))) == 49


def test_the_prompt_module_holds_the_views_keep_masks(ppad):
    keep = ppad.prompts.keep.cpu().numpy().reshape(len(VIEW_NAMES), 7, 7)
    for v, words in enumerate(VIEW_NAMES):
        assert kept(keep[v] > 0) == kept(get_view(words).patch_keep(SIZE, PATCH))


def test_unknown_view_is_refused():
    with pytest.raises(ValueError, match="unknown PPAD view"):
        PPAD(clip_model=TINY_CLIP, pretrained=False, views=("left lungs",))


# -- the image prompt -------------------------------------------------------------------
def test_patch_fn_replaces_exactly_the_masked_patches(ppad):
    prompt = ppad.prompts.image_prompt.detach()
    assert prompt.shape == (49, 64)
    emb = torch.randn(len(VIEW_NAMES), 49, 64)
    views = torch.arange(len(VIEW_NAMES))
    out = ppad.prompts.patch_fn(views)(emb)
    for v, words in enumerate(VIEW_NAMES):
        keep = torch.from_numpy(get_view(words).patch_keep(SIZE, PATCH).reshape(-1))
        assert torch.equal(out[v, keep], emb[v, keep])
        assert torch.equal(out[v, ~keep], prompt[~keep])
    assert not torch.equal(out[1], emb[1])  # the left-lung view did replace patches


def test_a_view_ignores_pixels_in_its_masked_patches(ppad):
    clip = ppad.clip
    x = ppad.prepare(images(2))
    changed = x.clone()
    changed[..., 128:] += 1.0  # patch columns 4-6: masked by the left-lung view only
    left, whole = VIEW_NAMES.index("left lung"), VIEW_NAMES.index("")
    with torch.no_grad():
        for v, same in ((left, True), (whole, False)):
            views = torch.full((2,), v)
            a, b = ppad.image_features(x, views), ppad.image_features(changed, views)
            assert torch.allclose(a, b, atol=1e-6) is same
        # the whole-image view is plain CLIP: the prompt never enters
        assert torch.allclose(ppad.image_features(x, torch.full((2,), whole)), clip.encode_image(x), atol=1e-5)


# -- the text prompts -------------------------------------------------------------------
def test_text_prompts_are_position_words_context_class(ppad):
    tok = tokenizer_for(TINY_CLIP)
    texts = [tok.decode([int(i) for i in row if i > 0]).strip() for row in ppad.prompts.token_ids.cpu()]
    ctx = " ".join(["x"] * 16)  # the placeholders the context vectors replace
    assert texts == [f"<start_of_text>{w + ' ' if w else ''}{ctx} {c} . <end_of_text>"
                     for w in VIEW_NAMES for c in ("normal", "pneumonia")]
    starts = ppad.prompts.ctx_starts.cpu().tolist()
    assert starts == [1 + len(w.split()) for w in VIEW_NAMES for _ in range(2)]


def test_text_features_with_placeholder_context_equal_encode_text():
    algo = tiny_ppad()
    clip, prompts = algo.clip, algo.prompts
    x_id = prompts.token_ids[0, prompts.ctx_starts[0]]
    with torch.no_grad():
        prompts.ctx.copy_(clip.token_embedding(x_id.view(1)).expand(16, -1))
        ours = algo.text_features().reshape(-1, clip.text_projection.shape[1])
        ref = clip.encode_text(prompts.token_ids)
    assert torch.allclose(ours, ref, atol=1e-5)


# -- the score rule ---------------------------------------------------------------------
def test_score_is_the_max_above_the_threshold_else_the_mean(ppad, monkeypatch):
    probs = torch.tensor([
        [0.95, 0.10, 0.20, 0.30, 0.40],  # max 0.95 > 0.8 -> 0.95
        [0.80, 0.10, 0.10, 0.10, 0.10],  # max 0.80 is not > 0.8 -> mean 0.24
        [0.50, 0.60, 0.70, 0.20, 0.00],  # -> mean 0.40
        [0.10, 0.10, 0.10, 0.10, 0.81],  # -> 0.81
    ])
    expected = [0.95, 0.24, 0.40, 0.81]
    assert np.allclose(combine_views(probs, 0.8).numpy(), expected)
    monkeypatch.setattr(ppad, "view_probabilities", lambda imgs: probs)
    assert np.allclose(ppad.predict_map(images(4)).scores, expected)
    assert np.allclose(combine_views(probs, 0.5).numpy(), [0.95, 0.80, 0.70, 0.81])


def test_predict_gives_one_probability_per_image_and_no_map(ppad):
    pred = ppad.predict_map(images(3))
    assert pred.maps is None and PPAD.pixel_level is False
    assert pred.scores.shape == (3,) and np.all((pred.scores > 0) & (pred.scores < 1))
    probs = ppad.view_probabilities(images(3)).numpy()
    assert probs.shape == (3, 5)
    assert np.allclose(pred.scores, combine_views(torch.from_numpy(probs), 0.8).numpy())


# -- training ---------------------------------------------------------------------------
def test_synthesis_draws_repeat_and_follow_the_targets(ppad):
    x = images(16)
    a, va, ta = ppad.synthesise(x, seed=3, epoch=1, start=0)
    b, vb, tb = ppad.synthesise(x, seed=3, epoch=1, start=0)
    assert torch.equal(a, b) and torch.equal(va, vb) and torch.equal(ta, tb)
    c, _, _ = ppad.synthesise(x, seed=3, epoch=2, start=0)
    assert not torch.equal(a, c)
    plain = ppad.prepare(torch.from_numpy(np.rint(x.numpy() * 255) / 255).float())
    normal = ta[:, 0] == 1
    assert torch.equal(ta.sum(1), torch.ones(16)) and 0 < int(normal.sum()) < 16
    assert torch.allclose(a[normal], plain[normal], atol=1e-5)
    assert all(not torch.allclose(a[i], plain[i]) for i in np.flatnonzero(~normal.numpy()))
    assert a.shape == (16, 3, SIZE, SIZE) and set(va.tolist()) <= set(range(5))


def test_the_loss_falls_and_only_the_prompts_learn():
    algo = tiny_ppad()
    x = images(8, seed=1)
    opt = torch.optim.SGD(algo.trainable_parameters(), lr=0.02, momentum=0.9)
    start = [p.detach().clone() for p in algo.clip.parameters()]
    losses = []
    for _ in range(4):
        loss = algo.step_loss(x, seed=0, epoch=0, start=0)  # the same draws every step
        opt.zero_grad()
        loss.backward()
        assert algo.prompts.ctx.grad.abs().sum() > 0 and algo.prompts.image_prompt.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in algo.clip.parameters())
    assert all(torch.equal(a, b) for a, b in zip(start, algo.clip.parameters()))


def test_fit_records_history_and_repeats_with_the_same_seed():
    x = images(6, seed=2)

    def run() -> tuple[list[dict], np.ndarray]:
        algo = tiny_ppad(epochs=2, batch_size=3)
        torch.manual_seed(7)  # the runner's seed: draw_seed() reads it
        algo.fit([{"image": x[:3]}, {"image": x[3:]}])
        return algo.history, algo.predict_map(x).scores

    h1, s1 = run()
    h2, s2 = run()
    assert [h["epoch"] for h in h1] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in h1)
    assert h1[1]["lr"] < h1[0]["lr"]  # cosine decay, stepped per epoch
    assert h1 == h2 and np.array_equal(s1, s2)


def test_trainable_parameters_at_tiny_size(ppad):
    counts = ppad.parameter_counts()
    assert counts["trainable"] == 16 * 64 + 49 * 64
    assert counts["total"] == counts["trainable"] + sum(p.numel() for p in ppad.clip.parameters())


def test_trainable_parameters_at_full_size():
    """CheXzero's architecture with random weights (the numbers the paper reports: 0.046M)."""
    torch.manual_seed(0)
    clip = build_clip("ViT-B-32-quickgelu", None)
    assert sum(p.numel() for p in clip.parameters()) == 151_277_313
    tok = tokenizer_for("ViT-B-32-quickgelu")
    ppad = PositionPrompts(clip, tok, VIEW_NAMES)
    coop = PositionPrompts(clip, tok, ("",), image_prompt=False)
    assert sum(p.numel() for p in ppad.parameters()) == 16 * 512 + 49 * 768 == 45_824
    assert sum(p.numel() for p in coop.parameters()) == 8_192
    assert ppad.image_prompt.std().item() == pytest.approx(0.2, rel=0.05)  # N(0, 0.02) x 10
    assert ppad.ctx.std().item() == pytest.approx(0.02, rel=0.1)


# -- the runner -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=6, n_valid=(1, 1), n_test=(4, 4), size=32)


def run_tiny(name: str, bench: Path, results: Path, **params) -> dict:
    return run_record(name, bench, results, {"clip_model": TINY_CLIP, **params})


def test_ppad_trains_and_predicts_through_the_runner_repeatably(toy_bench, tmp_path):
    first = run_tiny("ppad", toy_bench, tmp_path / "a", epochs=2)
    again = run_tiny("ppad", toy_bench, tmp_path / "b", epochs=2)
    assert first["config"]["views"] == list(VIEW_NAMES) and first["config"]["pretrained"] is False
    assert [h["epoch"] for h in first["history"]] == [1, 2]
    assert first["params"]["trainable"] == 16 * 64 + 49 * 64
    assert first["sizes"]["input"] == [SIZE, SIZE] and first["sizes"]["batch_size"] == 64
    assert first["metrics"]["pixel_auroc"] is None and 0 <= first["metrics"]["image_auroc"] <= 1
    assert first["history"] == again["history"] and first["metrics"] == again["metrics"]


def test_registered_with_the_papers_defaults():
    algo = registry.create("ppad", pretrained=False)
    cfg = algo.get_config()
    assert cfg["clip_model"] == "ViT-B-32-quickgelu" and cfg["views"] == VIEW_NAMES
    assert (cfg["n_ctx"], cfg["epochs"], cfg["lr"], cfg["momentum"], cfg["batch_size"]) == (16, 100, 1e-3, 0.9, 64)
    assert (cfg["anomaly_prob"], cfg["threshold"], cfg["image_size"]) == (0.5, 0.8, 224)
    assert PPAD.mean == (0.39799,) * 3 and PPAD.std == (0.32721,) * 3 and PPAD.channels == 1


# -- CheXzero weights -------------------------------------------------------------------
def test_missing_chexzero_weights_fail_at_construction_naming_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv("BMAD_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match=CHEXZERO_FILE.replace(".", r"\.")) as err:
        PPAD()
    assert "CheXzero" in str(err.value) or "chexzero" in str(err.value)
    monkeypatch.setenv("BMAD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match=str(tmp_path / CHEXZERO_FILE).replace(".", r"\.")):
        PPAD(clip_model=TINY_CLIP)


def saved_tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    clip = build_clip(TINY_CLIP, None)
    with torch.no_grad():
        clip.logit_scale.fill_(4.0)  # CheXzero keeps its own logit scale
    return {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}


def assert_loaded(algo: PPAD, state: dict[str, torch.Tensor]) -> None:
    clip = algo.build()
    for key, value in clip.state_dict().items():
        assert torch.equal(value.cpu(), state[key]), key
    assert float(clip.logit_scale) == 4.0


def test_chexzero_weights_load_from_the_weights_folder_and_from_a_file(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    state = saved_tiny_state()
    folder = tmp_path / "weights"
    (folder / "chexzero").mkdir(parents=True)
    torch.save(state, folder / CHEXZERO_FILE)
    monkeypatch.setenv("BMAD_WEIGHTS", str(folder))
    assert_loaded(PPAD(clip_model=TINY_CLIP), state)

    monkeypatch.delenv("BMAD_WEIGHTS")
    single = tmp_path / "chexzero.safetensors"
    save_file(state, str(single))
    assert_loaded(PPAD(clip_model=TINY_CLIP, weights=str(single)), state)
