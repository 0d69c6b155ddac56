"""The anomalib-backed algorithms: registration, cheap import, equivalence with plain anomalib.

All models are randomly initialised (no weights are downloaded); inputs are 64x64.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from algorithms import anomalib_adapter
from bmad import registry
from bmad.errors import WeightsError
from tests.conftest import REPO

SIZE = 64


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def smooth_images(n: int, rng: np.random.Generator, blob: bool = False) -> torch.Tensor:
    """Smooth 'tissue' backgrounds in [0, 1], optionally with one bright Gaussian blob."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        img = 0.4 + 0.1 * np.sin(2 * np.pi * xx + a) * np.cos(2 * np.pi * yy + b)
        img += 0.05 * np.sin(4 * np.pi * (xx + yy) + c) + rng.normal(0, 0.01, img.shape)
        if blob:
            cy, cx = rng.uniform(0.25, 0.75, 2)
            r = rng.uniform(0.06, 0.1)
            img += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        out.append(np.clip(img, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {
        "train": smooth_images(12, rng),
        "normal": smooth_images(6, rng),
        "anomalous": smooth_images(6, rng, blob=True),
    }


def batches(images: torch.Tensor, size: int = 4) -> list[dict]:
    """Runner-style dict batches."""
    return [
        {"image": images[i : i + size], "label": torch.zeros(len(images[i : i + size]))}
        for i in range(0, len(images), size)
    ]


def fit_predict(name: str, data: dict[str, torch.Tensor], seed: int = 0, **params) -> tuple[np.ndarray, np.ndarray]:
    seed_all(seed)
    algo = registry.create(name, pretrained=False, input_size=SIZE, **params)
    algo.fit(batches(data["train"]))
    test = torch.cat([data["normal"], data["anomalous"]])
    pred = algo.predict_map(test)
    return pred.scores, pred.maps


@pytest.fixture
def isolated_weights(tmp_path, monkeypatch):
    """No weights anywhere: empty BMAD_WEIGHTS, HF cache and torch hub."""
    import huggingface_hub.constants

    monkeypatch.setenv("BMAD_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    return tmp_path / "weights"


# -- registration and import cost ------------------------------------------------------
def test_import_and_construction_do_not_import_anomalib():
    code = textwrap.dedent(
        """
        import sys
        import algorithms
        from bmad import registry
        names = registry.names()
        for name in ("patchcore", "patchcore_r18", "padim", "padim_r18"):
            assert name in names, names
            registry.create(name, pretrained=False)
        heavy = [m for m in ("anomalib", "timm", "lightning") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("patchcore", dict(backbone="wide_resnet50_2", layers=("layer2", "layer3"),
                           coreset_sampling_ratio=0.1, num_neighbors=9)),
        ("patchcore_r18", dict(backbone="resnet18", layers=("layer2", "layer3"))),
        ("padim_r18", dict(backbone="resnet18", layers=("layer1", "layer2", "layer3"), n_features=100)),
        ("padim", dict(backbone="wide_resnet50_2", n_features=550)),
    ],
)
def test_defaults_and_config_round_trip(name, expected):
    algo = registry.create(name, pretrained=False)
    config = algo.get_config()
    assert {k: config[k] for k in expected} == expected
    assert config["input_size"] == (224, 224) and config["weights"] is None
    assert type(algo).family == "memory bank" and algo.pixel_level and algo.channels == 3
    again = registry.create(name, **config)
    assert again.get_config() == config
    # a JSON round trip turns tuples into lists; the resolved config is unchanged
    assert registry.create(name, **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}).get_config() == config


# -- the wrapper changes nothing but the plumbing --------------------------------------
def plain_anomalib(name: str, data: dict[str, torch.Tensor], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same model driven the anomalib way: its own pre-processor, training_step, fit, forward."""
    from anomalib.data import ImageBatch
    from anomalib.models import Padim, Patchcore

    seed_all(seed)
    if name == "patchcore_r18":
        cls, kwargs = Patchcore, dict(backbone="resnet18", layers=["layer2", "layer3"],
                                      coreset_sampling_ratio=0.1, num_neighbors=9)
    else:
        cls, kwargs = Padim, dict(backbone="resnet18", layers=["layer1", "layer2", "layer3"], n_features=100)
    lm = cls(**kwargs, pre_trained=False, pre_processor=cls.configure_pre_processor(image_size=(SIZE, SIZE)),
             post_processor=False, evaluator=False, visualizer=False)
    transform = lm.pre_processor.transform  # what the Engine applies to each training batch
    lm.train()
    for batch in batches(data["train"]):
        lm.training_step(ImageBatch(image=transform(batch["image"])), 0)
    lm.fit()
    lm.eval()
    with torch.no_grad():
        out = lm(torch.cat([data["normal"], data["anomalous"]]))  # forward applies the pre-processor
    return out.pred_score.reshape(-1).numpy(), out.anomaly_map.squeeze(1).numpy()


@pytest.mark.parametrize("name", ["patchcore_r18", "padim_r18"])
def test_equivalent_to_plain_anomalib(name, data):
    scores, maps = fit_predict(name, data)
    ref_scores, ref_maps = plain_anomalib(name, data)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, ratio", [((500, 40), 0.1), ((3000, 384), 0.02), ((300, 4, 5), 0.1)])
def test_coreset_selects_what_anomalib_selects(shape, ratio):
    from anomalib.models.components import KCenterGreedy

    from algorithms.patchcore.coreset import coreset

    embedding = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    seed_all(0)  # the projection draws from numpy's global generator, the first point from torch's
    expected = KCenterGreedy(embedding, ratio).sample_coreset()
    seed_all(0)
    ours = coreset(embedding, ratio)
    assert ours.shape[0] == int(shape[0] * ratio)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("loop", ["ours", pytest.param("anomalib", marks=pytest.mark.slow)])
def test_coreset_allocates_no_temporary_per_point(loop):
    """anomalib's loop allocates a new N x d difference per selected point: with glibc's default malloc
    that fragmented the heap past 12 GB in one fit, with a fixed mmap threshold it page-faults every
    temporary in afresh (6x slower). Under a fixed threshold each fresh allocation shows as page faults,
    so a loop that allocates its buffers once faults in about one copy of the features, whatever the
    number of points."""
    imports, select = (
        ("from algorithms.patchcore.coreset import k_center_greedy", "k_center_greedy(x, 150)") if loop == "ours"
        else ("from anomalib.models.components import KCenterGreedy",
              "s = KCenterGreedy(x, 0.0075); s.features = x; s.reset_distances(); i = torch.tensor(0)\n"
              "for _ in range(149):\n"
              "    s.update_distances(i); i = s.get_new_idx(); s.min_distances.scatter_(0, i.view(1, 1), 0.0)"))
    code = (f"import resource, torch\n{imports}\ntorch.manual_seed(0); x = torch.randn(20000, 200)\n"  # 16 MB
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            f"{select}\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    if loop == "ours":
        assert faults < 3 * 3_900, f"{faults} page faults: the loop allocates per point"
    else:  # the control: the same measurement sees anomalib's per-point temporaries
        assert faults > 100 * 3_900, faults


@pytest.mark.parametrize("name", ["patchcore_r18", "padim_r18"])
def test_deterministic_shapes_and_sanity(name, data):
    scores, maps = fit_predict(name, data)
    scores2, maps2 = fit_predict(name, data)
    np.testing.assert_array_equal(scores, scores2)
    np.testing.assert_array_equal(maps, maps2)

    n = len(data["normal"]) + len(data["anomalous"])
    assert scores.shape == (n,) and np.isfinite(scores).all()
    assert maps.shape == (n, SIZE, SIZE) and maps.dtype == np.float32
    normal, anomalous = scores[: len(data["normal"])], scores[len(data["normal"]) :]
    assert anomalous.mean() > normal.mean(), (normal, anomalous)


def test_grayscale_and_tensor_batches(data):
    seed_all(0)
    algo = registry.create("padim_r18", pretrained=False, input_size=SIZE)
    algo.fit([data["train"][:, :1]])  # plain tensors, one channel
    pred = algo.predict_map(data["normal"][:, :1])
    assert pred.maps.shape == (len(data["normal"]), SIZE, SIZE)


def test_parameter_counts_and_to():
    seed_all(0)
    algo = registry.create("patchcore_r18", pretrained=False, input_size=SIZE).to("cpu")
    counts = algo.parameter_counts()
    assert counts["total"] > 1_000_000 and counts["trainable"] == 0


# -- pretrained weights ------------------------------------------------------------------
def test_pretrained_weights_are_loaded_from_bmad_weights(isolated_weights, data):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    source = timm.create_model("resnet18", pretrained=False)
    path = isolated_weights / "timm" / "resnet18.a1_in1k.safetensors"
    path.parent.mkdir(parents=True)
    save_file(source.state_dict(), str(path))

    seed_all(0)
    algo = registry.create("patchcore_r18", input_size=SIZE)  # pretrained=True by default
    extractor = algo.build().model.feature_extractor.feature_extractor
    for key, value in extractor.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)

    explicit = registry.create("patchcore_r18", input_size=SIZE, weights=str(path))
    assert explicit.get_config()["weights"] == str(path)


def test_missing_weights_fail_at_construction(isolated_weights):
    with pytest.raises(WeightsError) as err:
        registry.create("patchcore")
    message = str(err.value)
    assert "timm/wide_resnet50_2.racm_in1k.safetensors" in message
    assert "--random-init" in message and "bmad weights fetch" in message
    assert err.value.exit_code == 2


# -- gradient-trained: STFPM -------------------------------------------------------------
def test_stfpm_training_equals_anomalib_trained_by_hand(data):
    """Same initial weights, same batches, BMAD's SGD: the wrapper's trained model scores
    exactly like the plain anomalib module trained the Lightning way (training_step ->
    backward -> step) for the epoch the wrapper selected on the valid split."""
    from anomalib.data import ImageBatch
    from anomalib.models import Stfpm

    from bmad.weights import offline_random_init

    test = torch.cat([data["normal"], data["anomalous"]])
    labels = torch.tensor([0] * len(data["normal"]) + [1] * len(data["anomalous"]))
    val = [{"image": test[i : i + 4], "label": labels[i : i + 4]} for i in range(0, len(test), 4)]
    seed_all(0)
    algo = registry.create("stfpm_r18", pretrained=False, input_size=SIZE, epochs=3, eval_every=1, batch_size=4)
    algo.fit(batches(data["train"]), val)
    history = algo.history
    assert [h["epoch"] for h in history[:-1]] == [1, 2, 3]
    assert all(h["train_loss"] > 0 and 0 <= h["val_image_auroc"] <= 1 for h in history[:-1])
    selected = history[-1]["selected_epoch"]
    assert history[-1]["val_image_auroc"] == max(h["val_image_auroc"] for h in history[:-1])
    pred = algo.predict_map(test)

    seed_all(0)
    with offline_random_init():
        lm = Stfpm(backbone="resnet18", layers=["layer1", "layer2", "layer3"],
                   pre_processor=Stfpm.configure_pre_processor(image_size=(SIZE, SIZE)),
                   post_processor=False, evaluator=False, visualizer=False)
    opt = torch.optim.SGD(lm.model.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0,
                          weight_decay=1e-4)
    transform = lm.pre_processor.transform
    for _ in range(selected):
        lm.train()
        for batch in batches(data["train"]):
            loss = lm.training_step(ImageBatch(image=transform(batch["image"])), 0)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    lm.eval()
    with torch.no_grad():
        out = lm(test)
    np.testing.assert_allclose(pred.scores, out.pred_score.reshape(-1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred.maps, out.anomaly_map.squeeze(1).numpy(), rtol=1e-5, atol=1e-5)


def test_stfpm_early_stopping_restores_the_best_epoch(data, monkeypatch):
    seed_all(0)
    algo = registry.create("stfpm_r18", pretrained=False, input_size=SIZE, epochs=10, eval_every=1, patience=2,
                           batch_size=6)
    aurocs = iter([0.6, 0.8, 0.7, 0.75, 0.9])  # the best so far is not beaten twice in a row after epoch 2
    monkeypatch.setattr(anomalib_adapter, "valid_image_auroc", lambda algo, val: next(aurocs))
    algo.fit(batches(data["train"]), val=[{"image": data["normal"], "label": torch.zeros(6)}])
    assert [h.get("val_image_auroc") for h in algo.history[:-1]] == [0.6, 0.8, 0.7, 0.75]
    assert algo.history[-1] == {"selected_epoch": 2, "val_image_auroc": 0.8}


def test_stfpm_without_a_usable_valid_split_trains_every_epoch(data):
    seed_all(0)
    algo = registry.create("stfpm_r18", pretrained=False, input_size=SIZE, epochs=2, eval_every=1, patience=1,
                           batch_size=6)
    algo.fit(batches(data["train"]), val=[{"image": data["normal"], "label": torch.zeros(6)}])  # one class only
    assert [h["epoch"] for h in algo.history] == [1, 2] and algo.history[-1]["val_image_auroc"] is None


def test_stfpm_config():
    algo = registry.create("stfpm", pretrained=False)
    config = algo.get_config()
    assert config["backbone"] == "wide_resnet50_2" and config["epochs"] == 100 and config["eval_every"] == 10
    assert (config["lr"], config["momentum"], config["weight_decay"]) == (0.4, 0.9, 1e-4)
    assert registry.create("stfpm_r18", pretrained=False).backbone == "resnet18"
    assert type(algo).family == "teacher-student" and algo.pixel_level
