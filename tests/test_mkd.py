"""MKD: the direction and distance losses, the teacher / cloner taps, loading torchvision's
VGG16 file, guided backpropagation, the gradient and feature-difference maps, training,
and end-to-end runs through the runner (random-init VGG16 teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation, binary_erosion, grey_opening

from algorithms.mkd import Mkd
from algorithms.mkd.torch_model import (
    OPENING_FOOTPRINT,
    Cloner,
    GuidedReLU,
    Teacher,
    distillation_loss,
    saliency_map,
)
from bmad.errors import WeightsError
from tests.conftest import make_bench, run_record, same_record


def test_direction_loss_is_one_minus_cosine_per_image():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    torch.testing.assert_close(distillation_loss([student], [teacher], 0.01, direction_only=True),
                               torch.tensor([1.0, 0.0, 2.0]))
    # + 0.01 x mean squared difference per image: 1, 1 and 2
    torch.testing.assert_close(distillation_loss([student], [teacher], 0.01), torch.tensor([1.01, 0.01, 2.02]))
    # summed over taps; the cosine is over the whole flattened per-image tensor
    cube_s, cube_t = student.reshape(3, 2, 1, 1), teacher.reshape(3, 2, 1, 1)
    torch.testing.assert_close(distillation_loss([student, cube_s], [teacher, cube_t], 0.01),
                               torch.tensor([2.02, 0.02, 4.04]))


def test_total_loss_identities():
    torch.manual_seed(0)
    taps = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    assert torch.allclose(distillation_loss(taps, taps, 0.01), torch.zeros(2), atol=1e-6)
    doubled = distillation_loss([2 * t for t in taps], taps, 0.01)  # same direction: only the distance remains
    expected = 0.01 * sum(t.pow(2).flatten(1).mean(1) for t in taps)
    torch.testing.assert_close(doubled, expected)


def test_cloner_taps_match_the_teachers_and_sizes_are_the_papers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    teacher, cloner = Teacher(), Cloner()
    shapes = [tuple(t.shape) for t in teacher(x)]
    assert shapes == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 2, 2)]
    assert [tuple(t.shape) for t in cloner(x)] == shapes
    assert sum(p.numel() for p in cloner.parameters()) == 343_984  # the official configuration B
    assert not any(m.bias is not None for m in cloner.modules() if isinstance(m, torch.nn.Conv2d))


def test_pretrained_teacher_loads_torchvision_vgg16_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    reference = make_layers(cfgs["D"])  # torchvision's VGG16 features, same module indices
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # ignored
    path = tmp_path / "torchvision" / "vgg16-397923af.pth"
    path.parent.mkdir()
    torch.save(state, path)
    teacher, _ = Mkd(weights=str(tmp_path), input_size=64).build()
    for key, value in reference.state_dict().items():
        assert torch.equal(teacher.features.state_dict()[key], value)
    assert not any(p.requires_grad for p in teacher.parameters())
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="vgg16-397923af"):
        Mkd(weights=str(tmp_path / "empty"))


def test_training_moves_only_the_cloner_and_lowers_the_loss():
    torch.manual_seed(0)
    algo = Mkd(input_size=32, pretrained=False)
    teacher, _ = algo.build()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = algo.make_optimizer()
    images = torch.rand(4, 3, 32, 32)
    losses = [algo.training_step(images, optimizer) for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_guided_relu_passes_only_positive_gradients_where_the_output_was_positive():
    relu = GuidedReLU()
    for guided, expected in ((True, [0.0, 0.0, 4.0]), (False, [0.0, -1.0, 4.0])):
        relu.guided = guided
        x = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
        relu(x).backward(torch.tensor([5.0, -1.0, 4.0]))
        assert x.grad.tolist() == expected


def test_grey_opening_of_the_map_equals_opening_each_thresholded_map():
    grad = np.random.default_rng(0).normal(size=(3, 40, 40))
    m = saliency_map(grad, sigma=1.0, opening=False)
    opened = saliency_map(grad, sigma=1.0)
    assert np.array_equal(opened, grey_opening(m, footprint=OPENING_FOOTPRINT, mode="nearest"))
    assert not np.array_equal(opened, m)
    for t in np.quantile(m, [0.2, 0.5, 0.8, 0.95]):  # OpenCV's opening: the border neither erodes nor dilates
        eroded = binary_erosion(m >= t, structure=OPENING_FOOTPRINT, border_value=1)
        assert np.array_equal(opened >= t, binary_dilation(eroded, structure=OPENING_FOOTPRINT, border_value=0))


def test_maps_and_scores():
    torch.manual_seed(0)
    algo = Mkd(input_size=64, pretrained=False)
    images = torch.rand(3, 3, 64, 64)
    images[0, :, 20:30, 20:30] = 1.0
    preds = {loc: Mkd.predict_map(_with(algo, localization=loc), images) for loc in ("gbp", "gradients",
                                                                                       "feature_diff")}
    for loc, pred in preds.items():
        assert pred.maps.shape == (3, 64, 64) and np.isfinite(pred.maps).all(), loc
        np.testing.assert_allclose(pred.scores, preds["gbp"].scores, rtol=1e-6)
    for loc in ("gbp", "gradients"):
        assert preds[loc].maps.min() >= 0 and preds[loc].maps.max() <= 1
    assert not np.allclose(preds["gbp"].maps, preds["gradients"].maps)
    np.testing.assert_allclose(algo.image_scores(images), preds["gbp"].scores, rtol=1e-6)


def _with(algo: Mkd, **changes: Any) -> Mkd:
    for key, value in changes.items():
        setattr(algo, key, value)
    return algo


def test_defaults_and_checks():
    config = Mkd(pretrained=False).get_config()
    expected = dict(lamda=0.01, direction_only=False, lr=1e-3, epochs=201, batch_size=64, input_size=(224, 224),
                    localization="gbp", sigma=4.0, gaussian_passes=1, opening=True, selection="last")
    assert {k: config[k] for k in expected} == expected
    with pytest.raises(ValueError, match="multiples of 32"):
        Mkd(input_size=100, pretrained=False)
    with pytest.raises(ValueError, match="localization"):
        Mkd(localization="smooth", pretrained=False)


# -- end to end --------------------------------------------------------------------------
E2E = dict(input_size=32, epochs=3, batch_size=4)


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory) -> Path:
    return make_bench(tmp_path_factory.mktemp("bench") / "Toy", n_train=8, n_valid=(2, 2), n_test=(6, 6), size=32)


def run(bench: Path, results: Path, **params: Any) -> dict[str, Any]:
    return run_record("mkd", bench, results, dict(E2E, **params))


@pytest.fixture(scope="module")
def first(toy_bench, tmp_path_factory) -> dict[str, Any]:
    """The first run's record (made once per module, reused by the rerun test)."""
    return run(toy_bench, tmp_path_factory.mktemp("first"))


def test_runs_through_the_runner(first):
    assert [h["epoch"] for h in first["history"]] == [1, 2, 3]  # "last": no selection record
    assert first["metrics"]["image_auroc"] >= 0.8, first["metrics"]
    assert first["metrics"]["pixel_auroc"] is not None
    assert first["params"]["trainable"] == 343_984


@pytest.mark.slow
def test_same_seed_same_record(first, toy_bench, tmp_path):
    again = run(toy_bench, tmp_path)
    same_record(first, again)


@pytest.mark.slow
def test_validation_selection_keeps_the_best_epoch(toy_bench, tmp_path):
    record = run(toy_bench, tmp_path, selection="val_auroc", eval_every=1, localization="feature_diff")
    epochs, selected = record["history"][:-1], record["history"][-1]
    assert selected["val_image_auroc"] == max(h["val_image_auroc"] for h in epochs)
    assert record["metrics"]["image_auroc"] >= 0.8, record["metrics"]
