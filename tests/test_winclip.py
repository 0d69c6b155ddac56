"""WinCLIP: the wrapper drives anomalib 2.7's own ``WinClipModel`` around an injected, offline CLIP.

- With the same tiny CLIP, reference images and inputs, the wrapper's scores and maps
  equal those of anomalib's class built by its own constructor (its download replaced, in
  that test only, by handing it the same CLIP).
- Reference images are drawn from the whole training set with the run's seed.
- Zero- and few-shot runs go through the harness with sockets blocked and an empty HOME.
"""

from __future__ import annotations

import copy
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.clip import TINY_CLIP
from algorithms.winclip import CLASS_NAMES, WinClip, class_name_for
from algorithms.winclip.algorithm import bench_relative
from bmad import registry
from bmad.benches import BENCHES
from tests.conftest import make_bench, run_record

TINY = dict(clip_model=TINY_CLIP, image_size=224, pretrained=False)


def images(n: int, seed: int, blob: bool = False) -> torch.Tensor:
    """Smooth grayscale 'tissue' in [0, 1], [n, 1, 224, 224], optionally with a bright blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224
    out = []
    for _ in range(n):
        a, b = rng.uniform(0, 2 * np.pi, 2)
        img = 0.4 + 0.1 * np.sin(2 * np.pi * xx + a) * np.cos(2 * np.pi * yy + b) + rng.normal(0, 0.02, xx.shape)
        if blob:
            cy, cx = rng.uniform(0.3, 0.7, 2)
            img += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.08**2))
        out.append(np.clip(img, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)[:, None]


def batches(x: torch.Tensor, size: int = 4, bench: str = "Brain") -> list[dict]:
    paths = [f"/data/{bench}/train/good/img/{i:03d}.png" for i in range(x.shape[0])]
    return [{"image": x[i : i + size], "path": paths[i : i + size]} for i in range(0, x.shape[0], size)]


def tiny(seed: int = 0, **params) -> WinClip:
    torch.manual_seed(seed)
    return WinClip(**{**TINY, **params})


def test_defaults_and_class_names():
    algo = registry.create("winclip", pretrained=False)
    cfg = algo.get_config()
    assert cfg["clip_model"] == "ViT-B-16-plus-240" and cfg["clip_weights"] == "laion400m_e31"
    assert cfg["image_size"] == 240 and algo.input_size == (240, 240)
    assert cfg["k_shot"] == 0 and cfg["scales"] == (2, 3) and cfg["temperature"] == 0.07
    assert cfg["class_name"] == "auto" and algo.pixel_level and algo.clip is None
    expected = {"Brain": "Brain", "Liver": "Liver", "Retina_RESC": "retinal OCT", "Retina_OCT2017": "retinal OCT",
                "Chest": "Chest X-ray film", "Histopathology": "histopathological image",
                "ZhangLab": "Chest X-ray film", "CheXpert": "Chest X-ray film", "VinDr": "Chest X-ray film",
                "BrainMRI": "Brain", "BUSI": "breast ultrasound"}
    assert {b.folder for b in BENCHES.values()} - {"demo/Brain"} == set(expected)  # every bench has its word
    for folder, word in expected.items():
        assert class_name_for(f"/d/{folder}/train/good/img/a.png") == word
        assert class_name_for(f"/d/{folder}/test/Ungood/a.png") == word
    assert class_name_for("/d/demo/Brain/train/good/img/a.png") == "Brain"
    assert class_name_for("/d/Toy/train/good/a.png") == class_name_for("a.png") == "object"
    assert set(CLASS_NAMES.values()) == set(expected.values())
    assert bench_relative("/d/Brain/train/good/img/a.png") == "train/good/img/a.png"


@pytest.mark.parametrize("k_shot", [0, 2])
def test_matches_anomalib_winclip_model(k_shot, monkeypatch):
    """Same CLIP, same references, same inputs: anomalib's class (its constructor) gives the same output."""
    import anomalib.models.image.winclip.torch_model as anomalib_winclip
    from anomalib.models.image.winclip.lightning_model import WinClip as AnomalibWinClip
    from torchvision.transforms.v2 import Normalize

    train, test = images(6, 1), torch.cat([images(2, 2), images(2, 3, blob=True)])
    algo = tiny(k_shot=k_shot, class_name="Brain")
    algo.fit(batches(train))
    ours = algo.predict_map(test)

    # anomalib's own constructor, its download replaced by a copy of the same CLIP (this module's name only)
    calls = []

    def create_model_and_transforms(name, pretrained):
        calls.append((name, pretrained))
        return copy.deepcopy(algo.clip), None, None

    monkeypatch.setattr(anomalib_winclip, "open_clip", types.SimpleNamespace(
        create_model_and_transforms=create_model_and_transforms))
    normalize = next(t for t in AnomalibWinClip.configure_pre_processor().transform.transforms
                     if isinstance(t, Normalize))  # anomalib's pre-processor (its resize to 240 is a no-op
    # for 240 inputs; the tiny CLIP takes 224)
    by_path = {p: img for b in batches(train) for p, img in zip(b["path"], b["image"])}
    refs = None
    if k_shot:
        assert len(algo.reference_paths) == k_shot
        refs = normalize(torch.stack([by_path["/data/Brain/" + p] for p in algo.reference_paths]).expand(-1, 3, -1, -1))
    reference = anomalib_winclip.WinClipModel(class_name="Brain", reference_images=refs, scales=(2, 3)).eval()
    assert calls == [("ViT-B-16-plus-240", "laion400m_e31")]  # our defaults are anomalib's backbone and tag
    assert reference.k_shot == k_shot and reference.temperature == algo.temperature
    out = reference(normalize(test.expand(-1, 3, -1, -1)))

    assert ours.maps.shape == (4, 224, 224)
    np.testing.assert_allclose(ours.scores, out.pred_score.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.maps, out.anomaly_map.numpy(), atol=1e-5, rtol=0)
    assert np.ptp(ours.maps) > 0 and np.ptp(ours.scores) > 0  # not a constant output


def test_reference_images_follow_the_seed():
    train = batches(images(20, 4))

    def drawn(seed: int) -> list[str]:
        algo = tiny(seed, k_shot=3)
        torch.manual_seed(seed)  # the runner seeds before fit
        return algo.draw_references(train)[1]

    draws = {seed: drawn(seed) for seed in range(4)}
    assert drawn(0) == draws[0] and drawn(3) == draws[3]
    assert len({tuple(sorted(d)) for d in draws.values()}) == 4  # different seeds, different images
    assert all(len(set(d)) == 3 for d in draws.values())  # without replacement
    first_k = [f"train/good/img/{i:03d}.png" for i in range(3)]
    assert any(sorted(d) != first_k for d in draws.values())
    assert any(int(Path(p).stem) >= 12 for d in draws.values() for p in d)  # the whole set, not the first batches
    algo = tiny(k_shot=30)  # more shots than images: all of them
    assert sorted(algo.draw_references(train)[1]) == sorted(p for b in train for p in map(bench_relative, b["path"]))


# -- through the harness, offline ----------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Brain", n_train=8, n_valid=(1, 1), n_test=(4, 4), size=64)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: every socket connection fails; HOME and the caches are empty folders."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BMAD_WEIGHTS", raising=False)
    return home


def run_winclip(bench: Path, results: Path, seed: int = 0, **params) -> dict:
    params = dict(clip_model=TINY_CLIP, image_size=224, **params)
    return run_record("winclip", bench, results, params, seed=seed)


def test_zero_shot_through_the_runner_offline(toy_bench, tmp_path, offline):
    record = run_winclip(toy_bench, tmp_path / "r")
    assert record["config"]["pretrained"] is False and record["sizes"]["input"] == [224, 224]
    assert record["history"] == [{"epoch": 0, "class_name": "Brain", "reference_images": []}]
    assert record["params"]["trainable"] == 0
    m = record["metrics"]
    assert m["pixel_auroc"] is not None and 0 <= m["pixel_auroc"] <= 1
    assert not any(offline.iterdir())  # nothing was written to the (empty) caches
    print(f"winclip zero-shot tiny random-init: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}")


def test_k_shot_through_the_runner_offline_and_seeded(toy_bench, tmp_path, offline):
    first = run_winclip(toy_bench, tmp_path / "a", k_shot=2, class_name="retinal OCT")
    refs = first["history"][0]["reference_images"]
    assert first["history"][0]["class_name"] == "retinal OCT"
    assert len(refs) == 2 and all(r.startswith("train/good/") for r in refs)
    m = first["metrics"]
    assert m["pixel_auroc"] is not None and np.isfinite(m["image_auroc"])
    print(f"winclip 2-shot tiny random-init: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}")
    again = run_winclip(toy_bench, tmp_path / "b", k_shot=2, class_name="retinal OCT")
    assert again["metrics"] == first["metrics"] and again["history"] == first["history"]
    other = run_winclip(toy_bench, tmp_path / "c", seed=1, k_shot=2, class_name="retinal OCT")
    assert sorted(other["history"][0]["reference_images"]) != sorted(refs)
