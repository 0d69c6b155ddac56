"""The gradient-trained anomalib baselines (CFA, CFLOW, CS-Flow, DRAEM, GANomaly, RD4AD):
the wrapper changes nothing but the plumbing.

For each model, with random initialisation and small inputs:

- one training step through the wrapper gives the same weights as the same step done
  by hand the Lightning way on the plain anomalib module (its own pre-processor,
  ``training_step``, ``backward``, optimiser step; CFA's ``on_train_start`` centroid;
  CS-Flow's gradient clipping; CFLOW's and GANomaly's manual optimisation), and the
  trained wrapper scores (and maps) test images like that plain module's own forward;
- each trains and predicts end to end through the runner on a small generated bench
  and, run again with the same seed, gives the same record (the three costly models'
  reruns are marked slow: CI runs them);
- names, defaults and constraints; import stays cheap.

CS-Flow gets "pretrained" weights made here (a random EfficientNet-B5 whose BatchNorm
statistics are calibrated on normal noise): with torchvision's raw random init its
features are ~1e-12, every score ties, and denormal arithmetic makes it very slow.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bmad import registry
from tests.conftest import make_bench, run_record, same_record

# Small settings per model: resnet18 where the model takes a backbone, the smallest legal size.
SMALL: dict[str, dict[str, Any]] = {
    "cfa": dict(backbone="resnet18", input_size=64),
    "cflow": dict(backbone="resnet18", input_size=128, coupling_blocks=2, condition_vector=32),
    "csflow": dict(cross_conv_hidden_channels=32, n_coupling_blocks=2, input_size=128),
    "draem": dict(input_size=32),
    "ganomaly": dict(n_features=16, latent_vec_size=16, input_size=32),
    "rd4ad": dict(backbone="resnet18", input_size=64),
}
NAMES = list(SMALL)
N_TRAIN, N_TEST = 4, 4


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def smooth_images(n: int, size: int, rng: np.random.Generator, blob: bool = False) -> torch.Tensor:
    """Smooth 'tissue' backgrounds in [0, 1] (3 channels), optionally with a bright blob."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b = rng.uniform(0, 2 * np.pi, 2)
        img = 0.4 + 0.1 * np.sin(2 * np.pi * xx + a) * np.cos(2 * np.pi * yy + b) + rng.normal(0, 0.01, xx.shape)
        if blob:
            cy, cx = rng.uniform(0.3, 0.7, 2)
            img += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.08**2))
        out.append(np.clip(img, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)


def create(name: str, **params: Any):
    """``name`` with random initialisation (unless a weights file is given)."""
    cls = registry.algorithms.get(name).cls
    if "pretrained" in cls.param_names() and params.get("weights") is None:
        params["pretrained"] = False
    return registry.create(name, **params)


def small(name: str, effnet: Path) -> dict[str, Any]:
    """SMALL[name], with the calibrated weights for CS-Flow."""
    return dict(SMALL[name], weights=str(effnet)) if name == "csflow" else dict(SMALL[name])


# -- the plain anomalib modules, built the documented way -------------------------------
def plain_module(name: str, size: int, texture_dir: Path) -> torch.nn.Module:
    """The anomalib Lightning module with its own pre-processor (resize + normalisation as
    anomalib configures it for the model), no post-processing; random initialisation."""
    import anomalib.models as am
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode

    from bmad.weights import offline_random_init

    p = SMALL[name]
    if name == "cfa":
        cls, kw = am.Cfa, dict(backbone=p["backbone"], gamma_c=1, gamma_d=1, num_nearest_neighbors=3,
                               num_hard_negative_features=3, radius=1e-5)
    elif name == "cflow":
        cls, kw = am.Cflow, dict(backbone=p["backbone"], layers=["layer2", "layer3", "layer4"], pre_trained=False,
                                 condition_vector=p["condition_vector"], coupling_blocks=p["coupling_blocks"],
                                 clamp_alpha=1.9, lr=1e-4)
    elif name == "csflow":
        cls, kw = am.Csflow, dict(cross_conv_hidden_channels=p["cross_conv_hidden_channels"],
                                  n_coupling_blocks=p["n_coupling_blocks"], clamp=3)
    elif name == "draem":
        cls, kw = am.Draem, dict(dtd_dir=texture_dir)  # an existing empty folder: Perlin noise, no download
    elif name == "ganomaly":
        cls, kw = am.Ganomaly, dict(batch_size=N_TRAIN, n_features=p["n_features"],
                                    latent_vec_size=p["latent_vec_size"], wadv=1, wcon=50, wenc=1, lr=2e-4,
                                    beta1=0.5, beta2=0.999)
    else:
        cls, kw = am.ReverseDistillation, dict(backbone=p["backbone"], layers=["layer1", "layer2", "layer3"],
                                               anomaly_map_mode=AnomalyMapGenerationMode.MULTIPLY,
                                               pre_trained=False)
    with offline_random_init():  # CFA and CS-Flow would download torchvision weights
        return cls(**kw, pre_processor=cls.configure_pre_processor(image_size=(size, size)),
                   post_processor=False, evaluator=False, visualizer=False)


def lightning_step_by_hand(name: str, lm: torch.nn.Module, images: torch.Tensor) -> None:
    """One training step the Lightning way: on_train_start, training_step, backward
    (automatic optimisation: zero_grad, the module's backward, the Trainer's gradient
    clipping, step; manual: the module steps its own optimisers)."""
    import warnings

    from anomalib.data import ImageBatch

    from algorithms.anomalib_adapter import _split_optimizers

    batch = ImageBatch(image=lm.pre_processor.transform(images))  # what the pre-processor callback does
    # no lm.train(): Lightning 2.x trains a module in the modes it was built in
    optimizers, _ = _split_optimizers(lm.configure_optimizers())
    if name == "cfa":  # Cfa.on_train_start, with the train loader
        lm.model.initialize_centroid(data_loader=[batch])
    if not lm.automatic_optimization:  # what Lightning hands a manual-optimisation module
        lm.optimizers = lambda use_pl_optimizer=True: optimizers[0] if len(optimizers) == 1 else optimizers
        lm.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    seed_all(1)
    with warnings.catch_warnings():  # self.log() without a Trainer
        warnings.simplefilter("ignore")
        out = lm.training_step(batch, 0)
    if lm.automatic_optimization:
        for opt in optimizers:
            opt.zero_grad()
        lm.backward(out["loss"])
        clip = lm.trainer_arguments.get("gradient_clip_val") or 0
        for opt in optimizers:
            if clip:
                torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], clip)
            opt.step()


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory, effnet_weights) -> dict[str, Any]:
    """One training step through the wrapper and by hand on the plain module, from the same state."""
    name = request.param
    size = SMALL[name]["input_size"]
    rng = np.random.default_rng(0)
    train = smooth_images(N_TRAIN, size, rng)
    test = torch.cat([smooth_images(N_TEST // 2, size, rng), smooth_images(N_TEST // 2, size, rng, blob=True)])

    seed_all(0)
    algo = create(name, **small(name, effnet_weights), epochs=1, batch_size=N_TRAIN)
    initial = {k: v.clone() for k, v in algo.build().state_dict().items()}
    seed_all(1)
    algo.fit([{"image": train}])
    pred = algo.predict_map(test)

    seed_all(0)
    lm = plain_module(name, size, tmp_path_factory.mktemp("no_textures"))
    lm.load_state_dict(initial)
    lightning_step_by_hand(name, lm, train)
    lm.eval()
    return {"name": name, "algo": algo, "lm": lm, "test": test, "pred": pred, "initial": initial}


def as_maps(anomaly_map: torch.Tensor, n: int) -> np.ndarray:
    return anomaly_map.detach().reshape(n, *anomaly_map.shape[-2:]).numpy()


def test_one_training_step_equals_lightning_by_hand(trained):
    wrapped = trained["algo"].build().state_dict()
    plain = trained["lm"].state_dict()
    assert wrapped.keys() == plain.keys()
    changed = 0
    for key, value in plain.items():
        torch.testing.assert_close(wrapped[key], value, rtol=1e-5, atol=1e-6, msg=key)
        changed += int(not torch.equal(value, trained["initial"][key]))
    assert changed > 0  # the step did update weights
    assert trained["algo"].history[0]["epoch"] == 1 and np.isfinite(trained["algo"].history[0]["train_loss"])


def test_predictions_equal_plain_anomalib(trained):
    """The wrapper (ImageNet normalisation by hand, lm.model on raw outputs) vs the plain
    module's own forward (its pre-processor, then its model)."""
    name, lm, test, pred = trained["name"], trained["lm"], trained["test"], trained["pred"]
    with torch.no_grad():
        if name == "cflow":  # the wrapper scores each image on its own (predict_batch_size=1)
            outs = [lm(test[i : i + 1]) for i in range(len(test))]
            ref_scores = torch.cat([o.pred_score.reshape(-1) for o in outs]).numpy()
            ref_maps = np.concatenate([as_maps(o.anomaly_map, 1) for o in outs])
        else:
            out = lm(test)
            ref_scores = out.pred_score.reshape(-1).numpy()
            ref_maps = None if out.anomaly_map is None else as_maps(out.anomaly_map, len(test))
    assert pred.scores.shape == (len(test),) and np.isfinite(pred.scores).all()
    np.testing.assert_allclose(pred.scores, ref_scores, rtol=0, atol=1e-5)
    if trained["algo"].pixel_level:
        assert pred.maps.shape == (len(test), *test.shape[-2:]) and pred.maps.dtype == np.float32
        np.testing.assert_allclose(pred.maps, ref_maps, rtol=0, atol=1e-5)
    else:
        assert pred.maps is None  # image-level only (CS-Flow, GANomaly)


@pytest.mark.parametrize("trained", ["cflow"], indirect=True)
def test_cflow_prediction_does_not_depend_on_the_batch(trained):
    algo, lm, test = trained["algo"], trained["lm"], trained["test"]
    whole, halves = algo.predict_map(test), [algo.predict_map(test[:2]), algo.predict_map(test[2:])]
    np.testing.assert_array_equal(whole.scores, np.concatenate([h.scores for h in halves]))
    algo.predict_batch_size = None  # anomalib's own behaviour: the batch max is shared
    try:
        together = algo.predict_map(test)
    finally:
        algo.predict_batch_size = 1
    with torch.no_grad():
        out = lm(test)
    np.testing.assert_allclose(together.scores, out.pred_score.reshape(-1).numpy(), rtol=0, atol=1e-5)
    assert not np.allclose(together.scores, whole.scores)  # why it is fixed: the batch moves the scores


# -- end to end through the runner ------------------------------------------------------
E2E: dict[str, dict[str, Any]] = {name: dict(SMALL[name], epochs=2, eval_every=1, batch_size=4) for name in NAMES}
# what "it learned something" means per model on the toy bench after 2 epochs (measured, deterministic):
ABOVE_CHANCE = {"cfa", "cflow", "csflow", "draem", "ganomaly"}  # test image AUROC > 0.5
LOSS_FALLS = {"cflow", "draem", "ganomaly", "rd4ad"}  # CFA's hard-negative loss is not monotone; CS-Flow's
# moves by ~1e-5 in 2 steps at lr 2e-4; RD4AD's random-init teacher is not discriminative yet
COSTLY = {"cflow", "csflow", "draem"}
_first_records: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    # one training batch of 4 per epoch; 2 + 2 valid, 4 + 4 test images; 32 px (resized to each input size)
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=4, n_valid=(2, 2), n_test=(4, 4), size=32)


def run_through_runner(name: str, bench: Path, results: Path, effnet: Path) -> dict[str, Any]:
    """One run of ``name`` through the harness (random init; CS-Flow: the calibrated weights)."""
    weights = str(effnet) if name == "csflow" else None
    return run_record(name, bench, results, E2E[name], weights=weights)


def first_record(name: str, bench: Path, results: Path, effnet: Path) -> dict[str, Any]:
    if name not in _first_records:
        _first_records[name] = run_through_runner(name, bench, results, effnet)
    return _first_records[name]


@pytest.mark.parametrize("name", NAMES)
def test_trains_and_predicts_through_the_runner(name, toy_bench, tmp_path, effnet_weights):
    record = first_record(name, toy_bench, tmp_path, effnet_weights)
    cls = registry.algorithms.get(name).cls
    assert record["config"]["epochs"] == 2 and record["sizes"]["batch_size"] == 4
    side = E2E[name]["input_size"]
    assert record["sizes"]["input"] == [side, side]
    epochs, selected = record["history"][:-1], record["history"][-1]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_image_auroc"] <= 1 for h in epochs)
    assert selected["selected_epoch"] in (1, 2)
    assert selected["val_image_auroc"] == max(h["val_image_auroc"] for h in epochs)
    metrics = record["metrics"]
    assert (metrics["pixel_auroc"] is not None) == cls.pixel_level
    params = record["params"]
    assert 0 < params["trainable"] < params["total"] or name in ("draem", "ganomaly")  # frozen backbones
    losses = [h["train_loss"] for h in epochs]
    if name == "ganomaly":  # train_loss is the generator's; the discriminator's is recorded beside it
        assert all(np.isfinite(h["discriminator_loss"]) for h in epochs)
    print(f"{name}: image AUROC {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']}, "
          f"train_loss {losses}, val AUROC {[h['val_image_auroc'] for h in epochs]}")
    if name in LOSS_FALLS:
        assert losses[1] < losses[0]
    if name in ABOVE_CHANCE:
        assert metrics["image_auroc"] > 0.5


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in COSTLY else n for n in NAMES])
def test_same_seed_same_record(name, toy_bench, tmp_path, effnet_weights):
    first = first_record(name, toy_bench, tmp_path / "a", effnet_weights)
    again = run_through_runner(name, toy_bench, tmp_path / "b", effnet_weights)
    same_record(first, again)


# -- registry, defaults, cheap import ----------------------------------------------------
DEFAULTS = {
    "cfa": dict(backbone="wide_resnet50_2", gamma_c=1, gamma_d=1, num_nearest_neighbors=3,
                num_hard_negative_features=3, radius=1e-5, lr=1e-3, weight_decay=5e-4, epochs=30,
                input_size=(224, 224)),
    "cflow": dict(backbone="wide_resnet50_2", layers=("layer2", "layer3", "layer4"), condition_vector=128,
                  coupling_blocks=8, clamp_alpha=1.9, fiber_batch_size=64, lr=1e-4, epochs=50,
                  predict_batch_size=1, input_size=(224, 224)),
    "csflow": dict(cross_conv_hidden_channels=1024, n_coupling_blocks=4, clamp=3, lr=2e-4, weight_decay=1e-5,
                   epochs=240, input_size=(256, 256)),
    "draem": dict(dtd_dir=None, beta=(0.1, 1.0), enable_sspcab=False, lr=1e-4, epochs=700, input_size=(224, 224)),
    "ganomaly": dict(n_features=64, latent_vec_size=100, wadv=1, wcon=50, wenc=1, lr=2e-4, beta1=0.5,
                     beta2=0.999, epochs=100, input_size=(224, 224)),
    "rd4ad": dict(backbone="wide_resnet50_2", layers=("layer1", "layer2", "layer3"), anomaly_map_mode="multiply",
                  lr=0.005, betas=(0.5, 0.99), epochs=200, input_size=(224, 224)),
}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_config_round_trip(name):
    algo = create(name)
    config = algo.get_config()
    assert {k: config[k] for k in DEFAULTS[name]} == DEFAULTS[name]
    assert config["batch_size"] == 32 and config["eval_every"] == 10 and config["patience"] is None
    assert set(config) == set(type(algo).param_names())  # every argument is stored under its name
    again = registry.create(name, **config)
    assert again.get_config() == config
    as_json = json.loads(json.dumps(config))  # tuples become lists in a run record
    assert registry.create(name, **as_json).get_config() == config
    assert type(algo).channels == 3


def test_class_attributes_declare_the_constraints():
    cls = {name: registry.algorithms.get(name).cls for name in NAMES}
    assert {n for n in NAMES if not cls[n].pixel_level} == {"csflow", "ganomaly"}
    assert cls["rd4ad"].size_multiple == 32 and cls["draem"].size_multiple == 32
    assert cls["csflow"].fixed_sizes[:3] == (128, 256, 384) and 224 not in cls["csflow"].fixed_sizes
    assert cls["cfa"].square and not cls["rd4ad"].square
    assert not cls["draem"].imagenet_normalize and cls["csflow"].grad_clip_norm == 1.0
    assert {cls[n].family for n in NAMES} >= {"memory bank", "flow", "reconstruction", "teacher-student"}
    # the harness's size rules give the model-building size
    assert create("rd4ad", input_size=200).model_input_size() == (224, 224)
    assert create("csflow", input_size=224).model_input_size() == (256, 256)
    assert create("cfa", input_size=(96, 128)).model_input_size() == (128, 128)
    for name in ("rd4ad", "csflow", "ganomaly"):  # they build their network for one size
        with pytest.raises(ValueError, match="input_size"):
            create(name, input_size=None)


def test_import_and_construction_do_not_import_anomalib():
    code = textwrap.dedent(
        f"""
        import sys
        import algorithms
        from bmad import registry
        names = registry.names()
        for name in {NAMES!r}:
            assert name in names, names
            cls = registry.algorithms.get(name).cls
            registry.create(name, **({{"pretrained": False}} if "pretrained" in cls.param_names() else {{}}))
        heavy = [m for m in ("anomalib", "timm", "lightning") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- specifics ---------------------------------------------------------------------------
def test_draem_never_downloads_textures(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not download"):
        create("draem", dtd_dir=str(tmp_path / "missing"))
    assert create("draem", dtd_dir=str(tmp_path)).get_config()["dtd_dir"] == str(tmp_path)


def test_cflow_skips_batches_too_small_for_one_fibre_batch():
    algo = create("cflow", **SMALL["cflow"], epochs=1)
    # layer4 of a 128 px input is 4x4: 4 images give 64 fibres, 3 give 48 < fiber_batch_size
    assert algo.accepts_train_batch(torch.zeros(4, 3, 128, 128))
    assert not algo.accepts_train_batch(torch.zeros(3, 3, 128, 128))
    with pytest.raises(ValueError, match="1 skipped as too small"):
        algo.fit([{"image": torch.rand(3, 3, 128, 128)}])


def test_cfa_rejects_non_square_input():
    algo = create("cfa", **SMALL["cfa"])
    with pytest.raises(ValueError, match="square"):
        algo.predict_map(torch.rand(1, 3, 64, 96))


def test_pretrained_weights_go_into_the_backbones(tmp_path, monkeypatch, effnet_weights):
    """CFA: torchvision V1 weights into its feature extractor; RD4AD, CFLOW: timm weights
    into the encoder; CS-Flow: torchvision EfficientNet-B5 into its extractor."""
    import huggingface_hub.constants
    import timm
    import torchvision
    from safetensors.torch import save_file

    from bmad.errors import WeightsError

    weights = tmp_path / "weights"
    monkeypatch.setenv("BMAD_WEIGHTS", str(weights))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))

    torch.manual_seed(123)
    tv = torchvision.models.resnet18().state_dict()
    (weights / "torchvision").mkdir(parents=True)
    torch.save(tv, weights / "torchvision" / "resnet18-f37072fd.pth")
    tm = timm.create_model("resnet18", pretrained=False).state_dict()
    (weights / "timm").mkdir()
    save_file(tm, str(weights / "timm" / "resnet18.a1_in1k.safetensors"))

    def same(module: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
        own = module.state_dict()
        matched = [k for k in own if k in source]
        assert len(matched) > 10
        for key in matched:
            torch.testing.assert_close(own[key], source[key], rtol=0, atol=0)

    seed_all(0)
    same(registry.create("cfa", **SMALL["cfa"]).build().model.feature_extractor, tv)
    same(registry.create("rd4ad", **SMALL["rd4ad"]).build().model.encoder.feature_extractor, tm)
    same(registry.create("cflow", **SMALL["cflow"]).build().model.encoder.feature_extractor, tm)

    csflow = registry.create("csflow", **small("csflow", effnet_weights))
    assert csflow.weights_spec().name == "torchvision/EfficientNet_B5_Weights.IMAGENET1K_V1"
    effnet = torch.load(effnet_weights, weights_only=True)
    same(csflow.build().model.feature_extractor.feature_extractor.feature_extractor, effnet)
    with pytest.raises(WeightsError, match="EfficientNet_B5_Weights.IMAGENET1K_V1"):
        registry.create("csflow")  # none in BMAD_WEIGHTS or the caches
