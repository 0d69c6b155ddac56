"""Helpers of the algorithm contract shared by the built-in algorithms."""

from __future__ import annotations

import torch

from bmad.algorithm import Algorithm, Prediction, valid_image_auroc


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
