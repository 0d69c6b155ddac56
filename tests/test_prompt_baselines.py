"""PPAD's baselines on the tiny CLIP (random weights): CoOp, MaPLe and zero-shot CheXzero.

MaPLe's deep prompts are checked at the blocks themselves (forward pre-hooks read what each
block receives); the parameter count is checked on a random full-size ViT-B-32 (about 3 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.clip import TINY_CLIP, batch_first, build_clip, normalize, tokenizer_for
from algorithms.maple import MaPLe, MultiModalPrompts
from algorithms.ppad import CHEXZERO_FILE, PPAD
from algorithms.zeroshot_clip import CheXzeroZeroShot
from bmad import registry
from bmad.errors import WeightsError
from tests.conftest import make_bench, run_record

SIZE = 224


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, SIZE).view(1, 1, SIZE, 1)
    return (ramp + 0.05 * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0, 1)


def tiny(name: str, **kw):
    torch.manual_seed(0)
    algo = registry.create(name, clip_model=TINY_CLIP, pretrained=False, **kw)
    algo.build()
    return algo


def block_inputs(transformer: torch.nn.Module, run) -> list[torch.Tensor]:
    """The (N, L, D) tokens each block of ``transformer`` receives while ``run()`` executes."""
    seen: list[torch.Tensor] = []
    bf = batch_first(transformer)

    def grab(module, args, kwargs):
        x = args[0] if args else kwargs["q_x"]
        seen.append((x if bf else x.transpose(0, 1)).detach().clone())

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in transformer.resblocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


# -- CoOp -------------------------------------------------------------------------------
def test_coop_is_ppad_with_the_whole_image_view_and_no_image_prompt():
    algo = tiny("coop")
    assert isinstance(algo, PPAD) and algo.views == ("",) and algo.image_prompt is False
    assert algo.prompts.image_prompt is None and algo.prompts.patch_fn(torch.zeros(2, dtype=torch.long)) is None
    assert algo.parameter_counts()["trainable"] == 16 * 64
    tok = tokenizer_for(TINY_CLIP)
    texts = [tok.decode([int(i) for i in row if i > 0]).strip() for row in algo.prompts.token_ids.cpu()]
    ctx = " ".join(["x"] * 16)
    assert texts == [f"<start_of_text>{ctx} normal . <end_of_text>", f"<start_of_text>{ctx} pneumonia . <end_of_text>"]
    x = images(3)
    probs = algo.view_probabilities(x)
    assert probs.shape == (3, 1)
    assert np.allclose(algo.predict_map(x).scores, probs[:, 0].numpy())  # one view: the probability itself
    with torch.no_grad():  # the image branch is plain CLIP
        prepared = algo.prepare(x)
        assert torch.allclose(algo.image_features(prepared, torch.zeros(3, dtype=torch.long)),
                              algo.clip.encode_image(prepared), atol=1e-5)


# -- MaPLe ------------------------------------------------------------------------------
def test_maple_defaults():
    cfg = registry.create("maple", pretrained=False).get_config()
    assert (cfg["n_ctx"], cfg["ctx_init"], cfg["prompt_depth"]) == (2, "a photo of a", 9)
    assert cfg["clip_model"] == "ViT-B-32-quickgelu" and cfg["classes"] == ("normal", "pneumonia")
    assert (cfg["epochs"], cfg["lr"], cfg["momentum"], cfg["batch_size"], cfg["anomaly_prob"]) == (100, 1e-3, 0.9, 64, 0.5)
    assert MaPLe.pixel_level is False and MaPLe.channels == 1


def test_maple_trainable_parameters_at_full_size():
    torch.manual_seed(0)
    clip = build_clip("ViT-B-32-quickgelu", None)
    prompts = MultiModalPrompts(clip, tokenizer_for("ViT-B-32-quickgelu"))
    assert prompts.depth == 9 and len(prompts.couplers) == 9 and len(prompts.deep_text) == 8
    ctx, deep, couplers = 2 * 512, 8 * 2 * 512, 9 * (512 * 768 + 768)
    assert sum(p.numel() for p in prompts.parameters()) == ctx + deep + couplers == 3_555_072


def test_maple_text_prompt_starts_from_a_photo_of_a():
    algo = tiny("maple", prompt_depth=1)
    clip, prompts = algo.clip, algo.prompts
    tok = tokenizer_for(TINY_CLIP)
    texts = [tok.decode([int(i) for i in row if i > 0]).strip() for row in prompts.token_ids.cpu()]
    assert texts == ["<start_of_text>a photo of a normal . <end_of_text>",
                     "<start_of_text>a photo of a pneumonia . <end_of_text>"]
    with torch.no_grad():
        assert torch.equal(prompts.ctx, clip.token_embedding(tok(["a photo"])[0, 1:3]))
        # no deep prompts and the initial context: exactly CLIP's text features of the prompt
        assert torch.allclose(algo.text_features()[0], clip.encode_text(prompts.token_ids), atol=1e-5)


def test_maple_deep_prompts_enter_every_block_up_to_the_depth():
    algo = tiny("maple")  # prompt depth 9, capped at the tiny CLIP's 2 text blocks
    clip, prompts = algo.clip, algo.prompts
    assert prompts.depth == 2 and algo.parameter_counts()["trainable"] == 2 * 64 + 64 * 2 + 2 * (64 * 64 + 64)
    with torch.no_grad():
        prompts.deep_text[0].normal_()
        visual = [p.detach().clone() for p in prompts.visual_prompts()]
    x = algo.prepare(images(2))
    seen = block_inputs(clip.visual.transformer, lambda: algo.image_features(x, torch.zeros(2, dtype=torch.long)))
    assert [s.shape[1] for s in seen] == [50 + 2] * 4
    with torch.no_grad():
        assert torch.allclose(seen[0][:, -2:], clip.visual.ln_pre(visual[0]).expand(2, -1, -1), atol=1e-6)
    assert torch.equal(seen[1][:, -2:], visual[1].expand(2, -1, -1))
    assert not torch.allclose(seen[2][:, -2:], visual[1].expand(2, -1, -1))  # block 2 is past the depth
    text = block_inputs(clip.transformer, algo.text_features)
    assert torch.equal(text[1][:, 1:3], prompts.deep_text[0].detach().expand(2, -1, -1))


def test_maple_gradients_reach_every_prompt_and_coupler_only():
    algo = tiny("maple")
    loss = algo.step_loss(images(4), seed=0, epoch=0, start=0)
    loss.backward()
    prompts = algo.prompts
    assert prompts.ctx.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in prompts.deep_text)
    assert all(c.weight.grad.abs().sum() > 0 and c.bias.grad.abs().sum() > 0 for c in prompts.couplers)
    assert all(p.grad is None for p in algo.clip.parameters())


def test_maple_rejects_a_context_longer_than_its_init():
    with pytest.raises(ValueError, match="fewer than n_ctx"):
        tiny("maple", n_ctx=5)


# -- zero-shot CheXzero -----------------------------------------------------------------
def test_chexzero_zero_shot_texts_and_scores():
    algo = tiny("chexzero_zeroshot")
    assert algo.texts == ("normal.", "pneumonia.") and CheXzeroZeroShot.pixel_level is False
    assert algo.parameter_counts()["trainable"] == 0
    clip = algo.clip
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    algo.fit([{"image": images(2)}])
    assert algo.history == [] and all(torch.equal(v, clip.state_dict()[k]) for k, v in before.items())
    x = images(3)
    with torch.no_grad():
        img = normalize(clip.encode_image(algo.prepare(x)))
        txt = normalize(clip.encode_text(tokenizer_for(TINY_CLIP)(["normal.", "pneumonia."])))
        expected = (clip.logit_scale.exp() * img @ txt.T).softmax(-1)[:, 1]
    pred = algo.predict_map(x)
    assert pred.maps is None and np.allclose(pred.scores, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["maple", "chexzero_zeroshot", "coop"])
def test_baselines_need_the_chexzero_file(name, monkeypatch):
    monkeypatch.delenv("BMAD_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match=CHEXZERO_FILE.replace(".", r"\.")):
        registry.create(name)


# -- determinism and the runner ---------------------------------------------------------
@pytest.mark.parametrize("name", ["coop", "maple"])
def test_same_seed_same_scores(name):
    x = images(4, seed=5)

    def run() -> np.ndarray:
        algo = tiny(name, epochs=2)
        torch.manual_seed(11)
        algo.fit([{"image": x}])
        assert [h["epoch"] for h in algo.history] == [1, 2]
        return algo.predict_map(x).scores

    assert np.array_equal(run(), run())


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=4, n_valid=(1, 1), n_test=(3, 3), size=32)


def run_tiny(name: str, bench: Path, results: Path, params: dict) -> dict:
    return run_record(name, bench, results, {"clip_model": TINY_CLIP, **params})


TRAINABLE = {"coop": 16 * 64, "maple": 2 * 64 + 64 * 2 + 2 * (64 * 64 + 64), "chexzero_zeroshot": 0}


@pytest.mark.parametrize("name", ["coop", "maple", "chexzero_zeroshot"])
def test_trains_and_predicts_through_the_runner(name, toy_bench, tmp_path):
    """One run each (the runner's repeatability is checked on ppad in test_ppad.py, the scores'
    above)."""
    params = {} if name == "chexzero_zeroshot" else {"epochs": 2}
    record = run_tiny(name, toy_bench, tmp_path, params)
    history = record["history"]
    assert [h["epoch"] for h in history] == ([] if name == "chexzero_zeroshot" else [1, 2])
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert record["params"]["trainable"] == TRAINABLE[name]
    assert record["config"]["pretrained"] is False and record["sizes"]["input"] == [SIZE, SIZE]
    assert record["metrics"]["pixel_auroc"] is None and 0 <= record["metrics"]["image_auroc"] <= 1
