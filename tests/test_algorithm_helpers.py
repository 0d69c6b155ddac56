"""Helpers of the algorithm contract shared by the built-in algorithms."""

from __future__ import annotations

import torch

from bmad.algorithm import Algorithm, Prediction, valid_image_auroc
from bmad.training import BestCheckpoint


class _Brightness(Algorithm):
    """Scores an image by its mean intensity."""

    def predict_map(self, images: torch.Tensor) -> Prediction:
        return Prediction(scores=images.mean(dim=(1, 2, 3)))


def _batch(values: list[float], labels: list[int]) -> dict:
    images = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    return {"image": images, "label": torch.tensor(labels)}


def test_valid_image_auroc() -> None:
    algo = _Brightness()
    batches = [_batch([0.1, 0.9], [0, 1]), _batch([0.2, 0.3], [0, 1])]
    # pairs (normal, anomalous): (0.1, 0.9) (0.1, 0.3) (0.2, 0.9) (0.2, 0.3) all ranked right
    assert valid_image_auroc(algo, batches) == 1.0
    assert valid_image_auroc(algo, [_batch([0.9, 0.1], [0, 1])]) == 0.0
    assert valid_image_auroc(algo, [_batch([0.1, 0.2], [0, 0])]) is None  # one class only
    assert valid_image_auroc(algo, []) is None


def test_best_checkpoint_keeps_restores_and_stops() -> None:
    net = torch.nn.Linear(2, 1)
    best = BestCheckpoint({"net": net}, patience=2)
    weights = {}
    for epoch, value in enumerate([0.5, None, 0.7, 0.7, 0.6], start=1):
        with torch.no_grad():
            net.weight.fill_(epoch)
        weights[epoch] = net.weight.clone()
        kept = best.check(value, epoch)
        assert kept == (epoch in (1, 3))
        assert best.stop == (epoch == 5)  # 0.7 tied then 0.6: two checks without improvement
    assert best.stale == 2 and best.value == 0.7
    assert best.restore() == {"selected_epoch": 3}
    assert torch.equal(net.weight, weights[3])


def test_best_checkpoint_without_a_verdict_keeps_nothing() -> None:
    net = torch.nn.Linear(2, 1)
    before = net.weight.clone()
    best = BestCheckpoint(net)
    assert best.check(None, 1) is False
    assert best.restore() is None and not best.stop
    assert torch.equal(net.weight, before)
