"""The shared CLIP machinery: encoders equal open_clip's own, prompts, caching, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from algorithms.clip import (
    TINY_CLIP,
    ClipAlgorithm,
    TextCache,
    build_clip,
    encode_image,
    encode_text_embeddings,
    encode_text_layers,
    project_tokens,
    prompt_ids,
    tokenizer_for,
    with_context,
)
from algorithms.clip.encode import batch_first
from bmad.errors import WeightsError
from bmad.weights import file_spec

SPEC = file_spec("test/tiny-clip.safetensors", obtain="the test writes it")


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_clip(TINY_CLIP, None)


def test_encode_image_equals_open_clip(tiny: torch.nn.Module) -> None:
    x = torch.randn(3, 3, 224, 224)
    out = encode_image(tiny, x, keep=(0, 2, 3))
    torch.testing.assert_close(out.pooled, tiny.encode_image(x), rtol=0, atol=1e-6)
    assert out.tokens.shape == (3, 50, 64)  # batch-first: class token + 7x7 patches

    # the kept tokens are each block's output, read with forward hooks in open_clip's own forward
    seen: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
             for i, blk in enumerate(tiny.visual.transformer.resblocks)]
    try:
        tiny.encode_image(x)
    finally:
        for h in hooks:
            h.remove()
    for i in (0, 2, 3):
        ref = seen[i] if batch_first(tiny.visual.transformer) else seen[i].transpose(0, 1)
        torch.testing.assert_close(out.intermediates[i], ref, rtol=0, atol=1e-6)
    # the last block's tokens, projected, give the pooled embedding at the class token
    torch.testing.assert_close(project_tokens(tiny, out.intermediates[3])[:, 0], out.pooled, rtol=0, atol=1e-6)


def test_patch_fn_and_block_hook_change_what_they_should(tiny: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 224, 224)
    base = encode_image(tiny, x)
    same = encode_image(tiny, x, patch_fn=lambda e: e, before_block=lambda i, t: t)
    torch.testing.assert_close(same.pooled, base.pooled, rtol=0, atol=0)
    zeroed = encode_image(tiny, x, patch_fn=torch.zeros_like)
    assert not torch.allclose(zeroed.pooled, base.pooled)
    # a hook that appends tokens before block 1 lengthens the sequence for the later blocks
    grown = encode_image(tiny, x, before_block=lambda i, t: torch.cat([t, t[:, :2]], 1) if i == 1 else t, keep=(3,))
    assert grown.intermediates[3].shape[1] == 52


def test_text_from_embeddings_equals_encode_text(tiny: torch.nn.Module) -> None:
    tok = tokenizer_for(TINY_CLIP)
    ids = tok(["a photo of a brain.", "pneumonia."])
    emb = tiny.token_embedding(ids)
    torch.testing.assert_close(encode_text_embeddings(tiny, emb, ids), tiny.encode_text(ids), rtol=0, atol=1e-6)
    assert not torch.allclose(encode_text_embeddings(tiny, emb, ids, causal=False), tiny.encode_text(ids))
    first, last = encode_text_layers(tiny, emb, ids, (0, 1))
    torch.testing.assert_close(last, tiny.encode_text(ids), rtol=0, atol=1e-6)
    assert first.shape == last.shape and not torch.allclose(first, last)


def test_learned_context_rows(tiny: torch.nn.Module) -> None:
    tok = tokenizer_for(TINY_CLIP)
    ids, starts = prompt_ids(tok, ["left lung", ""], 4, ["pneumonia .", "normal ."])
    assert starts.tolist() == [3, 1]  # [sot] left lung X X X X ... / [sot] X X X X ...
    x_id = int(tok("X")[0, 1])
    assert (ids[0, 3:7] == x_id).all() and (ids[1, 1:5] == x_id).all()
    emb = tiny.token_embedding(ids).detach()
    ctx = torch.randn(4, 64, requires_grad=True)
    filled = with_context(emb, ctx, starts)
    torch.testing.assert_close(filled[0, 3:7], ctx.detach())
    torch.testing.assert_close(filled[1, 1:5], ctx.detach())
    torch.testing.assert_close(filled[0, :3], emb[0, :3])
    torch.testing.assert_close(filled[1, 5:], emb[1, 5:])
    encode_text_embeddings(tiny, filled, ids).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    per_prompt = torch.randn(2, 4, 64)
    torch.testing.assert_close(with_context(emb, per_prompt, starts)[1, 1:5], per_prompt[1])
    with pytest.raises(ValueError, match="context length"):
        prompt_ids(tok, ["word " * 80], 4, [""])


def test_text_cache() -> None:
    cache, calls = TextCache(), []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.ones(2, requires_grad=True) * 2

    a, b = cache.get("view", compute), cache.get("view", compute)
    assert a is b and len(calls) == 1 and not a.requires_grad
    cache.clear()
    cache.get("view", compute)
    assert len(calls) == 2 and len(cache) == 1


# -- weights -----------------------------------------------------------------------------
def test_offline_error_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BMAD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        build_clip(TINY_CLIP, SPEC)
    text = str(err.value) + str(err.value.hint)
    assert "file/test/tiny-clip.safetensors not found offline" in text
    assert str(tmp_path / "test" / "tiny-clip.safetensors") in text and "--random-init" in text
    with pytest.raises(WeightsError, match="open_clip has no weights 'nope'"):
        build_clip("ViT-B-32", "nope")
    with pytest.raises(WeightsError, match="unknown open_clip model"):
        build_clip("ViT-Q-99", None)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_from_local_file(tiny: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              fmt: str) -> None:
    state = {k: v.clone().contiguous() for k, v in tiny.state_dict().items()}
    if fmt == "pt":
        path = tmp_path / "tiny.pt"
        torch.save({"state_dict": state}, path)  # a wrapped state dict, as training scripts save
    else:
        from safetensors.torch import save_file

        path = tmp_path / "test" / "tiny-clip.safetensors"
        path.parent.mkdir()
        save_file(state, str(path))
        monkeypatch.setenv("BMAD_WEIGHTS", str(tmp_path))  # found in the weights folder by its name
    torch.manual_seed(123)  # another random init: only the file can make them equal
    loaded = build_clip(TINY_CLIP, SPEC, weights=path if fmt == "pt" else None)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # at another image size the positional embedding is resized (7x7 -> 8x8 grid)
    bigger = build_clip(TINY_CLIP, SPEC, weights=path, image_size=256)
    assert bigger.visual.positional_embedding.shape == (65, 64)
    torch.testing.assert_close(bigger.visual.positional_embedding[0], state["visual.positional_embedding"][0])


def test_torchscript_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(WeightsError, match="TorchScript archive"):
        build_clip(TINY_CLIP, SPEC, weights=path)
    with pytest.raises(WeightsError, match="do not fit the model"):  # read when allowed; a Linear is no CLIP
        build_clip(TINY_CLIP, SPEC, weights=path, allow_torchscript=True)


def test_pickled_code_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "f": print}, path)
    with pytest.raises(WeightsError, match="refusing to load"):
        build_clip(TINY_CLIP, SPEC, weights=path)


class _Probe(ClipAlgorithm):
    def __init__(self, clip_model: str = TINY_CLIP, pretrained: bool = True, weights: str | None = None) -> None:
        self._init_clip(clip_model=clip_model, clip_weights=SPEC, image_size=224, pretrained=pretrained,
                        weights=weights)


def test_clip_algorithm_fails_fast_and_freezes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BMAD_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match="not found offline"):
        _Probe()  # at construction, before any data is read
    algo = _Probe(pretrained=False)
    assert algo.clip is None and algo.input_size == (224, 224)
    algo.to("cpu")
    assert algo.clip is not None and not any(p.requires_grad for p in algo.clip.parameters())
    counts = algo.parameter_counts()
    assert counts["trainable"] == 0 and counts["total"] == sum(p.numel() for p in algo.clip.parameters())
    x = algo.prepare(torch.full((1, 1, 224, 224), 0.5))
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x[0, :, 0, 0], (0.5 - torch.tensor(algo.mean)) / torch.tensor(algo.std))


def test_local_dir_model_and_tokenizer(tiny: torch.nn.Module, tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    cfg = json.loads((Path(__file__).parents[1] / "algorithms" / "clip" / f"{TINY_CLIP}.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    torch.manual_seed(7)
    loaded = build_clip(f"local-dir:{tmp_path}", "hub")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, tiny.state_dict()[k], rtol=0, atol=0)
    tok = tokenizer_for(f"local-dir:{tmp_path}")
    torch.testing.assert_close(tok(["a brain"]), tokenizer_for(TINY_CLIP)(["a brain"]))
    with pytest.raises(WeightsError, match="no open_clip_config.json"):
        build_clip(f"local-dir:{tmp_path / 'missing'}", "hub")
